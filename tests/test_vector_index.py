"""The FAISS index of one (tenant, aligner) (worker.vector_index): exact search is exact, HNSW
finds nearly what exact search finds on clustered vectors, filters apply inside the search (k
results even when a filter keeps a few items), one hit per item with its best modality, and
bases and segments round-trip through bytes (no pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store.blobs import BlobStore
from worker import vector_index
from worker.index_merge import load_index
from worker.vector_index import (
    ModalityIndex,
    VectorIndex,
    read_segment,
    segment_bytes,
)

DIM = 64


def clustered(n: int, seed: int, clusters: int = 50) -> np.ndarray:
    """Unit vectors from a mixture of anisotropic Gaussians, as embeddings cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    scales = rng.uniform(0.2, 1.0, size=(clusters, DIM))
    which = rng.integers(0, clusters, size=n)
    x = centres[which] + rng.normal(size=(n, DIM)) * scales[which]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(vectors @ q), kind="stable")[:k]


def test_exact_search_is_exact_and_hnsw_recall_is_high() -> None:
    n, k = 4000, 10
    vectors = clustered(n, 0)
    ids = np.arange(1, n + 1, dtype=np.int64) * 7  # item ids are not positions
    queries = clustered(50, 1)
    exact, hnsw = ModalityIndex(DIM), ModalityIndex(DIM)
    exact.add(ids, vectors)
    hnsw.add(ids, vectors)
    hnsw.convert(True)
    assert hnsw.hnsw and not exact.hnsw and len(hnsw) == n
    found = 0
    for q in queries:
        truth = ids[brute(vectors, q, k)]
        got_exact, scores = exact.search(q, k, None)
        assert list(got_exact) == list(truth)
        assert np.all(np.diff(scores) <= 1e-6)  # best first
        got_hnsw, _ = hnsw.search(q, k, None)
        found += len(set(got_hnsw.tolist()) & set(truth.tolist()))
    recall = found / (k * len(queries))
    assert recall >= 0.95, recall


@pytest.mark.parametrize("hnsw", [False, True])
def test_a_filter_keeping_few_items_still_gives_k_results(hnsw: bool) -> None:
    n, k = 3000, 10
    vectors = clustered(n, 2)
    ids = np.arange(1, n + 1, dtype=np.int64)
    index = ModalityIndex(DIM)
    index.add(ids, vectors)
    index.convert(hnsw)
    rng = np.random.default_rng(3)
    allowed = np.sort(rng.choice(ids, size=30, replace=False))  # 1 % of the items
    q = clustered(1, 4)[0]
    got, scores = index.search(q, k, allowed)
    assert len(got) == k and np.all(np.diff(scores) <= 1e-6)
    assert set(got.tolist()) <= set(allowed.tolist())
    truth = allowed[np.argsort(-(vectors[allowed - 1] @ q), kind="stable")[:k]]
    assert list(got) == list(truth)
    assert len(index.search(q, k, np.array([ids[5]], dtype=np.int64))[0]) == 1
    assert len(index.search(q, k, np.zeros(0, dtype=np.int64))[0]) == 0


def test_hnsw_applies_a_wide_filter_inside_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    # past SUBSET_EXACT allowed vectors, HNSW searches with FAISS's bitmap selector
    monkeypatch.setattr(vector_index, "SUBSET_EXACT", 100)
    n, k = 3000, 10
    vectors = clustered(n, 9)
    ids = np.arange(1, n + 1, dtype=np.int64)
    index = ModalityIndex(DIM)
    index.add(ids, vectors)
    index.convert(True)
    allowed = ids[ids % 3 == 0]
    found = 0
    for q in clustered(20, 10):
        got, _ = index.search(q, k, allowed)
        assert len(got) == k and set(got.tolist()) <= set(allowed.tolist())
        truth = allowed[np.argsort(-(vectors[allowed - 1] @ q), kind="stable")[:k]]
        found += len(set(got.tolist()) & set(truth.tolist()))
    assert found / (20 * k) >= 0.9


def test_one_hit_per_item_with_its_best_modality() -> None:
    rng = np.random.default_rng(5)
    text = clustered(20, 6)
    image = clustered(20, 7)
    ids = np.arange(1, 21, dtype=np.int64)
    index = VectorIndex(DIM)
    index.add({"text": (ids, text), "image": (ids, image)})
    q = image[3] * 0.9 + rng.normal(size=DIM).astype(np.float32) * 0.01
    q /= np.linalg.norm(q)
    hits = index.search(q, 5)
    assert len(hits) == 5 and len({h.item for h in hits}) == 5
    assert hits[0].item == 4 and hits[0].modality == "image"
    assert [h.item for h in index.search(q, 5, modality="text")] == \
        [int(i) + 1 for i in brute(text, q, 5)]
    assert 4 not in {h.item for h in index.search(q, 5, exclude=[4])}
    with pytest.raises(ValueError, match="width"):
        index.add({"text": (ids[:1], np.zeros((1, DIM + 1), np.float32))})


def test_base_and_segments_round_trip_and_deduplicate(tmp_path: Path) -> None:
    vectors = clustered(200, 8)
    ids = np.arange(1, 201, dtype=np.int64)
    base = VectorIndex(DIM, exact_limit=100)
    base.add({"image": (ids[:150], vectors[:150])})
    base.compact()  # 150 > 100: HNSW
    assert base.kinds == {"image": "hnsw"}
    again = VectorIndex.from_bytes(base.to_bytes(), exact_limit=100)
    assert again.kinds == {"image": "hnsw"} and len(again) == 150
    seg = segment_bytes({"image": (ids[100:], vectors[100:])})  # overlaps the base by 50
    assert segment_bytes({"image": (ids[100:][::-1], vectors[100:][::-1])}) == seg
    parsed = read_segment(seg)
    np.testing.assert_array_equal(parsed["image"][0], ids[100:])
    assert again.add(parsed) == 50  # only the new ids
    q = vectors[180]
    assert again.search(q, 1)[0].item == 181

    blobs = BlobStore(tmp_path)
    base_blob, seg_blob = blobs.put_bytes(base.to_bytes()), blobs.put_bytes(seg)
    loaded = load_index(blobs, base_blob, [seg_blob, seg_blob], DIM, 100)
    assert len(loaded) == 200
    empty = load_index(blobs, None, [seg_blob], DIM, 100)
    assert len(empty) == 100 and empty.kinds == {"image": "exact"}
