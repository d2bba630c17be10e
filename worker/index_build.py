"""Building a (tenant, aligner) index beside the one that serves, then switching to it.

A new aligner (an align job's, or one promoted) gets its index from the tenant's items whose
frozen features are cached for its encoders: no encoder runs, only the aligner's heads over the
feature cache, a page of items at a time. Each item indexed gets an ok result under the aligner
(so the nightly reprocess leaves it alone); items whose features are not cached are embedded by
the nightly reprocess (or ``POST /api/v1/reprocess`` with the aligner). A clip's cached frames
are indexed as separate ``video`` vectors with their times (``worker.frame_index``). The base goes to blob
storage, and one transaction marks the index ready and, when the aligner is its tenant's
default, makes it the one that answers (the old index serves until that commit, the new one
from it: never none, never both). Segments that batches appended meanwhile stay unmerged: every
reader applies them over the new base.
"""

from __future__ import annotations

import logging
import time

from models.align import embed_items, item_vector
from models.registry import SPECS
from store import features as feature_cache
from store import search as search_store
from store.registry import ModelRow, get_model
from worker.frame_index import FRAME_SIDE, IndexEntry, cached_frames, index_vectors
from worker.model_cache import models_of
from worker.runtime import Runtime
from worker.vector_index import VectorIndex

log = logging.getLogger(__name__)

PAGE = 1000


def build_index(rt: Runtime, model_id: int) -> int | None:
    """Build the aligner's index (if it has no ready one); its id, or None for no aligner."""
    started = time.perf_counter()
    with rt.db.session() as s:
        row = get_model(s, model_id)
        if row.kind != "aligner":
            return None
        model = ModelRow.of(row)
        index_id = search_store.ensure_index(s, model.id, model.tenant_id)
        state = search_store.index_state(s, index_id)
        if state is not None and state.state == "ready":
            search_store.activate_default(s, model.id)
            return index_id
    aligner = models_of(rt).aligner(model)
    index = VectorIndex(aligner.dim, rt.settings.index_exact_limit)
    after, items, missing = 0, 0, 0
    while True:
        with rt.db.session() as s:
            page = search_store.tenant_items(s, model.tenant_id, after, PAGE)
            cached = {m: feature_cache.get_features(
                s, SPECS[m].version, [r.media[m]["blob"] for r in page if m in r.media])
                for m in aligner.modalities}
            clips = [r.media["video"]["blob"] for r in page if "video" in r.media]
            frames = (cached_frames(s, clips) if clips and FRAME_SIDE in aligner.modalities
                      else {})
        if not page:
            break
        after = page[-1].item_id
        feats = [{m: cached[m][r.media[m]["blob"]] for m in aligner.modalities
                  if m in r.media and r.media[m]["blob"] in cached[m]} for r in page]
        # an item with something to index: a feature the aligner embeds, or a clip's frames
        kept = [(r, f) for r, f in zip(page, feats, strict=True)
                if f or (r.media.get("video") or {}).get("blob") in frames]
        if not kept:
            continue
        aligned = embed_items(aligner, [f for _, f in kept])
        entries = [IndexEntry(r.item_id, vectors, (r.media.get("video") or {}).get("blob"))
                   for (r, _), vectors in zip(kept, aligned, strict=True)]
        built = index_vectors(aligner, entries, frames)
        missing += built.missing
        results = []
        for (r, _), vectors in zip(kept, aligned, strict=True):
            mean = item_vector(built.item_vectors(r.item_id, vectors))
            if mean is not None:
                results.append((r.item_id, r.job_id, mean.astype("<f4").tobytes()))
        index.add(built.arrays)
        items += len(results)
        with rt.db.session() as s:
            search_store.write_results(s, model.id, results)
    index.compact()
    blob = rt.blobs.put_bytes(index.to_bytes())
    with rt.db.session() as s:
        search_store.record_base(s, index_id, blob, len(index), [], ready=True)
        switched = search_store.activate_default(s, model.id)
    log.info("index_built index=%s model=%s items=%d vectors=%d kinds=%s active=%s "
             "frames_missing=%d seconds=%.2f", index_id, model.id, items, len(index),
             index.kinds, switched, missing, time.perf_counter() - started)
    return index_id
