"""The search side of a worker machine: a process that keeps the encoders, the aligners and the
tenants' indexes warm, turns a query (text, an image, audio, video or text file, or an item)
into an aligned vector and searches the index with the query's filters inside the search.

:class:`Searcher` is plain Python (tests and the bench call it directly); ``worker.search_service``
serves it over HTTP to the API, which never loads torch. A background thread refreshes the
loaded indexes (new segments, a new base after a merge) and loads every tenant's active index
ahead of its first query, so a model switch finds the new index warm.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from media.decode import MediaError, modality_of
from media.video import Frame
from mmbatch.contract import DERIVED_MODALITIES, MODALITIES, SEARCH_MODALITIES
from mmbatch.settings import Settings
from models.align import Aligner, embed_items
from models.video import pool_frames
from store import search as search_store
from store.registry import ModelNotFound, ModelRow, get_model
from store.schema import MAX_ID
from worker.frame_index import FRAME_SIDE, clip_query
from worker.index_merge import load_index
from worker.model_cache import ModelCache, models_of
from worker.runtime import Runtime
from worker.vector_index import VectorIndex, read_segment

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0
MAX_K = 1000  # offset + k a search may reach


class SearchError(Exception):
    """A query the searcher cannot answer: ``status`` and ``code`` for the API's answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Loaded:
    """An index as this process holds it: its base, and the segments applied over it."""

    index_id: int
    base_blob: str | None
    applied: set[int]
    index: VectorIndex
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Query:
    """What the API asks: the aligner (resolved by the API), the tenant, one of text, file or
    item, and the filters."""

    model: int
    tenant: int | None
    k: int = 10
    offset: int = 0
    modality: str = "any"
    text: str | None = None
    item: int | None = None
    jobs: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    min_score: float | None = None

    @classmethod
    def of(cls, body: dict[str, Any]) -> Query:
        try:
            q = cls(model=int(body["model"]), tenant=body.get("tenant"),
                    k=int(body.get("k", 10)), offset=int(body.get("offset", 0)),
                    modality=str(body.get("modality") or "any"), text=body.get("text"),
                    item=body.get("item"),
                    jobs=tuple(body["jobs"]) if body.get("jobs") is not None else None,
                    labels=tuple(body["labels"]) if body.get("labels") is not None else None,
                    min_score=body.get("min_score"))
        except (KeyError, TypeError, ValueError) as exc:
            raise SearchError(400, "invalid_request", f"not a search request: {exc}") from None
        if q.modality not in SEARCH_MODALITIES or not 1 <= q.k <= MAX_K or q.offset < 0 \
                or q.offset + q.k > MAX_K:
            raise SearchError(400, "invalid_request", "modality, k or offset out of range")
        return q


class Searcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rt = Runtime(settings)
        self.models: ModelCache = models_of(self.rt)
        self._indexes: dict[int, Loaded] = {}
        self._load_lock = threading.Lock()
        self._encode_locks = {m: threading.Lock() for m in MODALITIES}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def warm(self) -> None:
        """Load every tenant's active index now, not on the first query, and the encoders once
        there is an index to query (a deployment, or a test stack, with no aligner does not pay
        for three encoders in one more process)."""
        self.refresh()
        if self._indexes:
            for m in MODALITIES:
                if m not in DERIVED_MODALITIES:  # a clip's frames take the image encoder
                    self.models.encoder(m)

    def start(self) -> None:
        """Warm up and keep the indexes fresh in a background thread."""
        self._thread = threading.Thread(target=self._run, name="search-refresh", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.warm()
        except Exception:
            log.exception("search_warm_failed")
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.warm()
            except Exception:
                log.exception("search_refresh_failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.rt.close()

    def refresh(self) -> None:
        """Bring every loaded index up to date, and load the active ones not yet loaded."""
        with self.rt.db.session() as s:
            wanted = set(search_store.active_indexes(s)) | set(self._indexes)
        for index_id in sorted(wanted):
            self.index(index_id)

    # --- indexes -----------------------------------------------------------------------------

    def index(self, index_id: int) -> VectorIndex | None:
        """The index with its newest base and segments applied (None: not ready)."""
        with self.rt.db.session() as s:
            state = search_store.index_state(s, index_id)
            dim = search_store.index_width(s, index_id)
        if state is None or state.state != "ready":
            return None
        with self._load_lock:
            loaded = self._indexes.get(index_id)
            segments = dict(state.segments)
            if loaded is None or loaded.base_blob != state.base_blob:
                started = time.perf_counter()
                index = load_index(self.rt.blobs, state.base_blob, list(segments.values()), dim,
                                   self.settings.index_exact_limit)
                self._indexes[index_id] = Loaded(index_id, state.base_blob, set(segments), index)
                log.info("index_loaded index=%s vectors=%d kinds=%s seconds=%.2f", index_id,
                         len(index), index.kinds, time.perf_counter() - started)
                return index
            for seg_id in sorted(set(segments) - loaded.applied):
                loaded.index.add(read_segment(self.rt.blobs.read(segments[seg_id])))
                loaded.applied.add(seg_id)
            return loaded.index

    # --- queries -----------------------------------------------------------------------------

    def search(self, q: Query, file: tuple[bytes, str] | None = None) -> dict[str, Any]:
        """One page of hits: ``{"hits": [{"item", "modality", "score"}], "more", "query"}``."""
        started = time.perf_counter()
        with self.rt.db.session() as s:
            try:
                row = get_model(s, q.model, -1 if q.tenant is None else q.tenant)
            except ModelNotFound:
                raise SearchError(400, "unknown_model", f"no model version {q.model}") from None
            model = ModelRow.of(row)
            if model.kind != "aligner" or model.tenant_id != q.tenant:
                raise SearchError(400, "not_an_aligner", f"model {q.model} is not an aligner")
            index_row = search_store.index_of(s, model.id)
            index_id = index_row.id if index_row is not None else None
            allowed = None
            if q.jobs is not None or q.labels is not None:
                allowed = search_store.filtered_item_ids(s, q.tenant, q.jobs, q.labels)
        index = self.index(index_id) if index_id is not None else None
        if index is None:
            raise SearchError(409, "index_not_ready",
                              f"the index of aligner {model.id} is still being built")
        vector, query_modality, exclude = self.query_vector(model, q, file)
        encoded = time.perf_counter()
        hits = index.search(vector, q.offset + q.k + 1, q.modality, allowed, exclude)
        if q.min_score is not None:
            hits = [h for h in hits if h.score >= q.min_score]
        page = hits[q.offset:q.offset + q.k]
        return {"hits": [{"item": h.item, "modality": h.modality, "score": round(h.score, 6)}
                         | ({"time": h.time} if h.time is not None else {}) for h in page],
                "more": len(hits) > q.offset + q.k,
                "query": {"modality": query_modality},
                "seconds": {"encode": round(encoded - started, 4),
                            "search": round(time.perf_counter() - encoded, 4)}}

    def query_vector(self, model: ModelRow, q: Query, file: tuple[bytes, str] | None
                     ) -> tuple[np.ndarray, str, tuple[int, ...]]:
        """The query's aligned vector, its modality, and the items to leave out (an item's
        own when asking for items like it)."""
        aligner = self.models.aligner(model)
        if q.item is not None:
            item = int(q.item)
            if not 0 < item <= MAX_ID:
                raise SearchError(404, "not_found", f"no item {item}")
            with self.rt.db.session() as s:
                if search_store.item_of(s, q.tenant, item) is None:
                    raise SearchError(404, "not_found", f"no item {item}")
                raw = search_store.embedding_of(s, item, model.id)
            if raw is None:
                raise SearchError(409, "not_indexed",
                                  f"item {item} has not been embedded with aligner {model.id} "
                                  "yet")
            return np.frombuffer(raw, dtype="<f4"), "item", (item,)
        if file is not None:
            data, name = file
            modality = modality_of(name)
            if modality is None:
                raise SearchError(400, "unsupported_file",
                                  f"{name!r} is not an image, audio, video or text file by its "
                                  "name")
            try:
                raw_media = self.models.decoder(modality)(data, name)
            except (MediaError, ValueError, OSError) as exc:
                raise SearchError(400, "undecodable_file", f"{name}: {exc}") from None
            if modality == "video":
                return self.clip_vector(model, aligner, raw_media.frames, name), modality, ()
        else:
            modality, raw_media = "text", " ".join(str(q.text or "").split())
            if not raw_media:
                raise SearchError(400, "empty_query", "the query text is empty")
        if modality not in aligner.modalities:
            raise SearchError(400, "modality_not_aligned",
                              f"aligner {model.id} does not embed {modality}")
        encoder = self.models.encoder(modality)
        with self._encode_locks[modality]:
            features = encoder.encode([encoder.preprocess(raw_media)])[0].numpy()
        return embed_items(aligner, [{modality: features}])[0][modality], modality, ()

    def clip_vector(self, model: ModelRow, aligner: Aligner, frames: list[Frame], name: str
                    ) -> np.ndarray:
        """An uploaded clip's query vector: its sampled frames (decoded in the sandbox as the
        worker decodes them) through the image encoder and the aligner's image side, averaged
        (worker.frame_index.clip_query); an aligner without an image side but with a video
        one takes the frames pooled as a clip's ``video`` features are."""
        if not frames:
            raise SearchError(400, "undecodable_file", f"{name}: no video frames")
        if FRAME_SIDE not in aligner.modalities and "video" not in aligner.modalities:
            raise SearchError(400, "modality_not_aligned",
                              f"aligner {model.id} embeds neither images nor video")
        encoder = self.models.encoder("image")
        with self._encode_locks["image"]:
            features = encoder.encode([encoder.preprocess(Image.fromarray(f.rgb))
                                       for f in frames]).numpy()  # (K, D)
        vector = clip_query(aligner, features)
        if vector is None:
            vector = embed_items(aligner, [{"video": pool_frames(features)}])[0]["video"]
        return vector
