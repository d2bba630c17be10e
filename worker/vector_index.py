"""The vector index of one (tenant, aligner): per modality, the aligned unit vectors of the items
that have it, searched by inner product (= cosine) with FAISS.

Exact (``IndexFlatIP``) while a modality holds at most ``exact_limit`` vectors, HNSW
(``IndexHNSWFlat``, inner product) past it: bench/search.py measured where exact search stops
meeting the latency target and what HNSW's recall is (docs/search.md). Item ids live beside the
FAISS index in an array (FAISS labels are positions in it), so filters become a bitmap over
positions that FAISS applies inside the search, and a filter that keeps few items is answered
exactly over just those items' vectors: k results whatever the filter keeps.

A vector may carry a time: a clip's sampled frames are indexed as separate vectors of the
``video`` modality, each with its item's id and the frame's time in seconds (a float array
parallel to the ids; NaN for a vector that is a whole item's). A search answers each item once,
its best vector, with that vector's time.

Serialised without pickle: segments and bases are ``.npz`` files of plain arrays (a base holds
each modality's FAISS index as the bytes ``faiss.serialize_index`` makes, and its times where
any vector has one).
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import faiss
import numpy as np

EXACT_LIMIT = 50_000  # vectors of one modality past which the index is HNSW (bench/search.py)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
SUBSET_EXACT = 20_000  # a filter keeping at most this many vectors: exact over them

# One modality's vectors in a segment: (item ids (n,), unit vectors (n, D)), and optionally
# their times (n,) in seconds (NaN: a whole item's vector).
Vectors = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Hit:
    item: int
    modality: str
    score: float
    time: float | None = None  # the matching frame's time in its clip, seconds


def _times(ids: np.ndarray, vectors: Vectors) -> np.ndarray:
    """The times of a segment's vectors (NaN where it gives none)."""
    if len(vectors) > 2 and vectors[2] is not None:
        return np.asarray(vectors[2], dtype=np.float32)
    return np.full(len(ids), np.nan, dtype=np.float32)


def _keys(ids: np.ndarray, times: np.ndarray) -> np.ndarray:
    """One int64 per (item, time to the millisecond), for de-duplication: item ids fit 31 bits
    (store.schema.MAX_ID), so the id takes the high half and the time (+1; 0: none) the low."""
    ms = np.where(np.isfinite(times), np.round(np.nan_to_num(times) * 1000) + 1, 0)
    return (ids.astype(np.int64) << 32) | np.clip(ms, 0, 2**32 - 1).astype(np.int64)


def segment_bytes(vectors: Mapping[str, Vectors]) -> bytes:
    """Per modality (item ids (n,), unit vectors (n, D)[, times (n,)]) as an npz file's bytes,
    in a stable order, so that the same vectors give the same bytes (and blob)."""
    arrays = {}
    for m in sorted(vectors):
        ids, vecs = np.asarray(vectors[m][0]), vectors[m][1]
        timed = len(vectors[m]) > 2 and vectors[m][2] is not None
        times = _times(ids, vectors[m])
        order = np.lexsort((times, ids)) if timed else np.argsort(ids, kind="stable")
        arrays[f"{m}.ids"] = np.asarray(ids, dtype="<i8")[order]
        arrays[f"{m}.vectors"] = np.asarray(vecs, dtype="<f4")[order]
        if timed:
            arrays[f"{m}.times"] = times.astype("<f4")[order]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_segment(data: bytes) -> dict[str, Vectors]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        names = {k.rsplit(".", 1)[0] for k in npz.files}
        return {m: (npz[f"{m}.ids"], npz[f"{m}.vectors"])
                + ((npz[f"{m}.times"],) if f"{m}.times" in npz.files else ())
                for m in names}


class ModalityIndex:
    """One modality's vectors: a FAISS index over positions, and the item id and time of
    each (an item has one vector, or a clip one per sampled frame)."""

    def __init__(self, dim: int, hnsw: bool = False) -> None:
        self.dim = dim
        self.hnsw = hnsw
        self.index = self._new(hnsw)
        self.ids = np.zeros(0, dtype=np.int64)
        self.times = np.zeros(0, dtype=np.float32)  # NaN: a whole item's vector

    def _new(self, hnsw: bool) -> faiss.Index:
        if hnsw:
            index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
            return index
        return faiss.IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def timed(self) -> bool:
        """Whether any vector carries a time (a clip's frames)."""
        return bool(np.isfinite(self.times).any())

    def add(self, ids: np.ndarray, vectors: np.ndarray, times: np.ndarray | None = None) -> int:
        """Add the vectors of (id, time) pairs not present yet (without times: of ids not
        present yet); how many were added."""
        ids = np.asarray(ids, dtype=np.int64)
        times = _times(ids, (ids, vectors, times))
        keys = _keys(ids, times)
        fresh = ~np.isin(keys, _keys(self.ids, self.times))
        ids, vectors, times, keys = ids[fresh], vectors[fresh], times[fresh], keys[fresh]
        _, first = np.unique(keys, return_index=True)  # a segment with a pair twice: once
        first = np.sort(first)
        ids, vectors, times = ids[first], vectors[first], times[first]
        if len(ids):
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            self.ids = np.concatenate([self.ids, ids])
            self.times = np.concatenate([self.times, times])
        return len(ids)

    def vectors(self) -> np.ndarray:
        """All vectors (n, D), in position order, without copying."""
        flat = faiss.downcast_index(self.index.storage) if self.hnsw else self.index
        n = flat.ntotal
        return faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def convert(self, hnsw: bool) -> None:
        """Rebuild as exact or HNSW over the same vectors."""
        if hnsw == self.hnsw:
            return
        vectors = np.array(self.vectors())
        self.hnsw = hnsw
        self.index = self._new(hnsw)
        if len(vectors):
            self.index.add(vectors)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best (item ids, scores) for a unit ``query`` (D,), best first, one per
        item, among the ids in ``allowed`` (sorted int64) when given."""
        ids, scores, _ = self.best(query, k, allowed)
        return ids, scores

    def best(self, query: np.ndarray, k: int, allowed: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``k`` best items (ids, scores, times of their best vectors), best first: an
        item with several vectors (a clip's frames) counts once, with its best one."""
        fetch = k
        while True:
            pos, scores = self._positions(query, fetch, allowed)
            _, first = np.unique(self.ids[pos], return_index=True)
            first = np.sort(first)[:k]  # positions come best first: each item's best
            if len(first) >= k or len(pos) < fetch or fetch >= len(self):
                return self.ids[pos[first]], scores[first], self.times[pos[first]]
            fetch = min(fetch * 4, len(self))  # items with many vectors filled the page

    def _positions(self, query: np.ndarray, k: int, allowed: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best vectors (positions, scores), best first, among those of the ids in
        ``allowed`` (sorted int64) when given."""
        n = len(self)
        k = min(k, n)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if allowed is None:
            scores, pos = self.index.search(q, k)
            keep = pos[0] >= 0
            return pos[0][keep], scores[0][keep]
        mask = np.isin(self.ids, allowed, assume_unique=False)
        count = int(mask.sum())
        if count == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.hnsw and count > SUBSET_EXACT:
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(HNSW_EF_SEARCH, k))
            scores, pos = self.index.search(q, k, params=params)
            keep = pos[0] >= 0
            if int(keep.sum()) >= min(k, count):
                return pos[0][keep], scores[0][keep]
        # exact over the vectors the filter keeps
        where = np.flatnonzero(mask)
        sims = self.vectors()[where] @ q[0]
        k = min(k, len(where))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return where[top], sims[top]

    def to_bytes(self) -> np.ndarray:
        return faiss.serialize_index(self.index)  # uint8 array

    @classmethod
    def from_arrays(cls, dim: int, ids: np.ndarray, serialized: np.ndarray,
                    times: np.ndarray | None = None) -> ModalityIndex:
        out = cls(dim)
        out.index = faiss.deserialize_index(serialized)
        out.hnsw = isinstance(out.index, faiss.IndexHNSW)
        if out.hnsw:
            out.index.hnsw.efSearch = HNSW_EF_SEARCH
        out.ids = ids.astype(np.int64)
        out.times = _times(out.ids, (out.ids, None, times))
        return out


class VectorIndex:
    """Every modality's :class:`ModalityIndex` of one (tenant, aligner); a search answers one
    hit per item, the modality (and for a clip's frames, the time) that matched best. ``lock``
    guards adds against searches."""

    def __init__(self, dim: int, exact_limit: int = EXACT_LIMIT) -> None:
        self.dim = dim
        self.exact_limit = exact_limit
        self.modalities: dict[str, ModalityIndex] = {}
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return sum(len(m) for m in self.modalities.values())

    @property
    def kinds(self) -> dict[str, str]:
        return {m: "hnsw" if x.hnsw else "exact" for m, x in self.modalities.items()}

    def add(self, segment: Mapping[str, Vectors]) -> int:
        """Add a segment's vectors (ids, or (id, time) pairs, already present are kept as they
        were)."""
        added = 0
        with self.lock:
            for m, vectors in segment.items():
                ids, vecs = vectors[0], vectors[1]
                if vecs.ndim != 2 or vecs.shape[1] != self.dim:
                    raise ValueError(f"{m} vectors of width {vecs.shape[-1]}; the index holds "
                                     f"{self.dim}")
                index = self.modalities.setdefault(m, ModalityIndex(self.dim))
                added += index.add(ids, vecs, _times(ids, vectors))
        return added

    def compact(self) -> None:
        """Make each modality exact or HNSW as its size says (a merge calls it)."""
        with self.lock:
            for index in self.modalities.values():
                index.convert(len(index) > self.exact_limit)

    def search(self, query: np.ndarray, k: int, modality: str = "any",
               allowed: np.ndarray | None = None, exclude: Iterable[int] = ()) -> list[Hit]:
        """The ``k`` best items (one hit each, its best modality and frame), best first."""
        banned = set(exclude)
        names = list(self.modalities) if modality == "any" else [modality]
        best: dict[int, Hit] = {}
        with self.lock:
            for m in names:
                index = self.modalities.get(m)
                if index is None:
                    continue
                ids, scores, times = index.best(query, k + len(banned), allowed)
                for item, score, t in zip(ids.tolist(), scores.tolist(), times.tolist(),
                                          strict=True):
                    if item in banned:
                        continue
                    if item not in best or score > best[item].score:
                        best[item] = Hit(int(item), m, float(score),
                                         None if math.isnan(t) else round(float(t), 3))
        return sorted(best.values(), key=lambda h: (-h.score, h.item))[:k]

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {"dim": np.array([self.dim], dtype="<i8")}
        with self.lock:
            for m, index in sorted(self.modalities.items()):
                arrays[f"{m}.ids"] = index.ids.astype("<i8")
                arrays[f"{m}.faiss"] = index.to_bytes()
                if index.timed:
                    arrays[f"{m}.times"] = index.times.astype("<f4")
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, exact_limit: int = EXACT_LIMIT) -> VectorIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            out = cls(int(npz["dim"][0]), exact_limit)
            names = {k.rsplit(".", 1)[0] for k in npz.files if k != "dim"}
            for m in names:
                out.modalities[m] = ModalityIndex.from_arrays(
                    out.dim, npz[f"{m}.ids"], npz[f"{m}.faiss"],
                    npz[f"{m}.times"] if f"{m}.times" in npz.files else None)
        return out
