"""Merging an index's appended segments into a new base, in the background, torch-free.

Finished batches append segments (small blobs) rather than rewrite the whole index; a merge
reads the base and the unmerged segments, adds them, makes each modality exact or HNSW as its
size says, writes the new base as a blob, and in one transaction installs it and marks those
segments merged. Search processes see the new base on their next refresh. Only ready indexes
merge: a building one gets its base from its build (``worker.index_build``), and its segments
stay unmerged until then. A lease keeps two merges of one index apart.
"""

from __future__ import annotations

import logging
import time
import uuid

from store import leases
from store import search as search_store
from store.blobs import Blobs
from worker.runtime import Runtime
from worker.vector_index import VectorIndex, read_segment

log = logging.getLogger(__name__)

LEASE_SECONDS = 600


def load_index(blobs: Blobs, base_blob: str | None, segments: list[str], dim: int,
               exact_limit: int) -> VectorIndex:
    """An index from its base (None: empty) and segments, in that order."""
    index = (VectorIndex.from_bytes(blobs.read(base_blob), exact_limit) if base_blob
             else VectorIndex(dim, exact_limit))
    for blob in segments:
        index.add(read_segment(blobs.read(blob)))
    return index


def merge_index(rt: Runtime, index_id: int) -> int:
    """Fold the index's unmerged segments into a new base; how many segments it took in."""
    owner = uuid.uuid4().hex
    name = f"index-merge:{index_id}"
    with rt.db.session() as s:
        if not leases.acquire(s, name, owner, LEASE_SECONDS):
            return 0
    try:
        with rt.db.session() as s:
            state = search_store.index_state(s, index_id)
            dim = search_store.index_width(s, index_id)
        if state is None or state.state != "ready" or not state.segments:
            return 0
        started = time.perf_counter()
        index = load_index(rt.blobs, state.base_blob, [b for _, b in state.segments], dim,
                           rt.settings.index_exact_limit)
        index.compact()
        blob = rt.blobs.put_bytes(index.to_bytes())
        with rt.db.session() as s:
            search_store.record_base(s, index_id, blob, len(index),
                                     [i for i, _ in state.segments])
        log.info("index_merged index=%s segments=%d vectors=%d kinds=%s seconds=%.2f",
                 index_id, len(state.segments), len(index), index.kinds,
                 time.perf_counter() - started)
        return len(state.segments)
    finally:
        with rt.db.session() as s:
            leases.release(s, name, owner)


def merge_all(rt: Runtime) -> int:
    """Merge every index that has unmerged segments (the beat's periodic task)."""
    with rt.db.session() as s:
        ids = search_store.indexes_with_segments(s)
    return sum(merge_index(rt, i) for i in ids)
