"""The vector index of one (tenant, aligner): per modality, the aligned unit vectors of the items
that have it, searched by inner product (= cosine) with FAISS.

Exact (``IndexFlatIP``) while a modality holds at most ``exact_limit`` vectors, HNSW
(``IndexHNSWFlat``, inner product) past it: bench/search.py measured where exact search stops
meeting the latency target and what HNSW's recall is (docs/search.md). Item ids live beside the
FAISS index in an array (FAISS labels are positions in it), so filters become a bitmap over
positions that FAISS applies inside the search, and a filter that keeps few items is answered
exactly over just those items' vectors: k results whatever the filter keeps.

Serialised without pickle: segments and bases are ``.npz`` files of plain arrays (a base holds
each modality's FAISS index as the bytes ``faiss.serialize_index`` makes).
"""

from __future__ import annotations

import io
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


@dataclass(frozen=True)
class Hit:
    item: int
    modality: str
    score: float


def segment_bytes(vectors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Per modality (item ids (n,), unit vectors (n, D)) as an npz file's bytes, in a stable
    order, so that the same vectors give the same bytes (and blob)."""
    arrays = {}
    for m in sorted(vectors):
        ids, vecs = vectors[m]
        order = np.argsort(ids, kind="stable")
        arrays[f"{m}.ids"] = np.asarray(ids, dtype="<i8")[order]
        arrays[f"{m}.vectors"] = np.asarray(vecs, dtype="<f4")[order]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_segment(data: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        names = {k.rsplit(".", 1)[0] for k in npz.files}
        return {m: (npz[f"{m}.ids"], npz[f"{m}.vectors"]) for m in names}


class ModalityIndex:
    """One modality's vectors: a FAISS index over positions, and the item id of each."""

    def __init__(self, dim: int, hnsw: bool = False) -> None:
        self.dim = dim
        self.hnsw = hnsw
        self.index = self._new(hnsw)
        self.ids = np.zeros(0, dtype=np.int64)

    def _new(self, hnsw: bool) -> faiss.Index:
        if hnsw:
            index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = HNSW_EF_SEARCH
            return index
        return faiss.IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Add the vectors of ids not present yet; how many were added."""
        ids = np.asarray(ids, dtype=np.int64)
        fresh = ~np.isin(ids, self.ids)
        ids, vectors = ids[fresh], vectors[fresh]
        _, first = np.unique(ids, return_index=True)  # a segment with an id twice: once
        ids, vectors = ids[np.sort(first)], vectors[np.sort(first)]
        if len(ids):
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            self.ids = np.concatenate([self.ids, ids])
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
        """The ``k`` best (item ids, scores) for a unit ``query`` (D,), best first, among the
        ids in ``allowed`` (sorted int64) when given."""
        n = len(self)
        k = min(k, n)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if allowed is None:
            scores, pos = self.index.search(q, k)
            keep = pos[0] >= 0
            return self.ids[pos[0][keep]], scores[0][keep]
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
                return self.ids[pos[0][keep]], scores[0][keep]
        # exact over the vectors the filter keeps
        where = np.flatnonzero(mask)
        sims = self.vectors()[where] @ q[0]
        k = min(k, len(where))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return self.ids[where[top]], sims[top]

    def to_bytes(self) -> np.ndarray:
        return faiss.serialize_index(self.index)  # uint8 array

    @classmethod
    def from_arrays(cls, dim: int, ids: np.ndarray, serialized: np.ndarray) -> ModalityIndex:
        out = cls(dim)
        out.index = faiss.deserialize_index(serialized)
        out.hnsw = isinstance(out.index, faiss.IndexHNSW)
        if out.hnsw:
            out.index.hnsw.efSearch = HNSW_EF_SEARCH
        out.ids = ids.astype(np.int64)
        return out


class VectorIndex:
    """Every modality's :class:`ModalityIndex` of one (tenant, aligner); a search answers one
    hit per item, the modality that matched best. ``lock`` guards adds against searches."""

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

    def add(self, segment: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
        """Add a segment's vectors (ids already present are kept as they were)."""
        added = 0
        with self.lock:
            for m, (ids, vecs) in segment.items():
                if vecs.ndim != 2 or vecs.shape[1] != self.dim:
                    raise ValueError(f"{m} vectors of width {vecs.shape[-1]}; the index holds "
                                     f"{self.dim}")
                index = self.modalities.setdefault(m, ModalityIndex(self.dim))
                added += index.add(ids, vecs)
        return added

    def compact(self) -> None:
        """Make each modality exact or HNSW as its size says (a merge calls it)."""
        with self.lock:
            for index in self.modalities.values():
                index.convert(len(index) > self.exact_limit)

    def search(self, query: np.ndarray, k: int, modality: str = "any",
               allowed: np.ndarray | None = None, exclude: Iterable[int] = ()) -> list[Hit]:
        """The ``k`` best items (one hit each, its best modality), best first."""
        banned = set(exclude)
        names = list(self.modalities) if modality == "any" else [modality]
        best: dict[int, Hit] = {}
        with self.lock:
            for m in names:
                index = self.modalities.get(m)
                if index is None:
                    continue
                ids, scores = index.search(query, k + len(banned), allowed)
                for item, score in zip(ids.tolist(), scores.tolist(), strict=True):
                    if item in banned:
                        continue
                    if item not in best or score > best[item].score:
                        best[item] = Hit(int(item), m, float(score))
        return sorted(best.values(), key=lambda h: (-h.score, h.item))[:k]

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {"dim": np.array([self.dim], dtype="<i8")}
        with self.lock:
            for m, index in sorted(self.modalities.items()):
                arrays[f"{m}.ids"] = index.ids.astype("<i8")
                arrays[f"{m}.faiss"] = index.to_bytes()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, exact_limit: int = EXACT_LIMIT) -> VectorIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            out = cls(int(npz["dim"][0]), exact_limit)
            names = {k.rsplit(".", 1)[0] for k in npz.files if k != "dim"}
            for m in names:
                out.modalities[m] = ModalityIndex.from_arrays(out.dim, npz[f"{m}.ids"],
                                                              npz[f"{m}.faiss"])
        return out
