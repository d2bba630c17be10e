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


def test_a_clip_is_one_hit_with_the_time_of_its_best_frame() -> None:
    # 30 clips of 8 frames each (240 vectors) beside 20 pictures: a clip's frames are separate
    # vectors of the video modality, each with its time; a search answers each clip once
    frames = clustered(240, 11)
    clip_ids = np.repeat(np.arange(101, 131, dtype=np.int64), 8)
    times = np.tile(np.arange(8, dtype=np.float32) * 0.5 + 0.25, 30)
    pictures = clustered(20, 12)
    index = VectorIndex(DIM)
    assert index.add({"video": (clip_ids, frames, times),
                      "image": (np.arange(1, 21, dtype=np.int64), pictures)}) == 260
    q = frames[8 * 7 + 5]  # clip 108's frame at 2.75 s
    hits = index.search(q, 10, modality="video")
    assert len(hits) == 10 and len({h.item for h in hits}) == 10  # not 10 frames of one clip
    assert (hits[0].item, hits[0].modality, hits[0].time) == (108, "video", 2.75)
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    truth = [int(clip_ids[i]) for i in brute(frames, q, 240)]
    assert [h.item for h in hits] == list(dict.fromkeys(truth))[:10]  # each clip's best frame
    both = index.search(q, 30)
    assert {h.modality for h in both} == {"image", "video"}
    assert all((h.time is None) == (h.modality == "image") for h in both)
    # a filter keeping two clips: those two, each once
    kept = index.search(q, 5, modality="video", allowed=np.array([103, 120], dtype=np.int64))
    assert sorted(h.item for h in kept) == [103, 120]
    # the same (clip, time) pairs again add nothing; a new time of a known clip is added
    assert index.add({"video": (clip_ids[:8], frames[:8], times[:8])}) == 0
    assert index.add({"video": (clip_ids[:1], frames[:1], np.array([9.0], np.float32))}) == 1


@pytest.mark.parametrize("hnsw", [False, True])
def test_frame_times_round_trip_through_segments_merges_and_bases(tmp_path: Path,
                                                                  hnsw: bool) -> None:
    frames = clustered(120, 13)
    ids = np.repeat(np.arange(1, 31, dtype=np.int64), 4)
    times = np.tile(np.array([0.125, 1.5, 2.875, 4.0], np.float32), 30)
    seg = segment_bytes({"video": (ids, frames, times)})
    order = np.arange(120)[::-1]  # the same vectors in another order: the same bytes
    assert segment_bytes({"video": (ids[order], frames[order], times[order])}) == seg
    parsed = read_segment(seg)
    assert len(parsed["video"]) == 3
    np.testing.assert_array_equal(parsed["video"][2][:4], times[:4])
    assert len(read_segment(segment_bytes({"image": (ids[:3], frames[:3])}))["image"]) == 2

    blobs = BlobStore(tmp_path)
    blob = blobs.put_bytes(seg)
    merged = load_index(blobs, None, [blob, blob], DIM, exact_limit=50 if hnsw else 1000)
    merged.compact()
    assert len(merged) == 120 and merged.kinds == {"video": "hnsw" if hnsw else "exact"}
    base = VectorIndex.from_bytes(merged.to_bytes(), exact_limit=50 if hnsw else 1000)
    again = load_index(blobs, blobs.put_bytes(base.to_bytes()), [blob], DIM, 1000)
    assert len(again) == 120  # the segment over its own base adds nothing
    for i in (6, 57, 118):
        hit = again.search(frames[i], 1, modality="video")[0]
        assert (hit.item, hit.time) == (int(ids[i]), float(times[i]))
