"""Feature-shift summaries and warnings (models.shift): zero-ish for data from the training
distribution, large for moved data; stored and read back through safetensors. The
nearest-neighbour ratio: about 1 on the training distribution, high for data off it whose means
and spreads match; and the worker's report (worker.shift) carrying it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load, save

from models.shift import KNN_SAMPLE, MIN_ITEMS, FeatureSummary, compare, summarize, warning


def _data(n: int, d: int = 32, seed: int = 0, shift: float = 0.0, scale: float = 1.0
          ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d)) * np.linspace(0.5, 3.0, d) + np.arange(d)
    return base * scale + shift * np.linspace(0.5, 3.0, d)


def test_same_distribution_scores_near_zero_and_moved_data_does_not() -> None:
    reference = summarize(_data(2000))
    same = compare(reference, _data(40, seed=1))
    moved = compare(reference, _data(40, seed=1, shift=0.8))
    wider = compare(reference, _data(40, seed=1, scale=2.0))
    assert same is not None and moved is not None and wider is not None
    assert same["mean_shift"] < 0.1 and same["scale_shift"] < 0.2
    assert moved["mean_shift"] == pytest.approx(0.8, abs=0.1)
    assert wider["scale_shift"] == pytest.approx(np.log(2.0), abs=0.15)
    assert same["items"] == 40


def test_the_noise_correction_keeps_small_samples_near_zero() -> None:
    reference = summarize(_data(5000))
    scores = [compare(reference, _data(8, seed=s)) for s in range(10, 20)]
    assert np.mean([sc["mean_shift"] for sc in scores if sc]) < 0.15


def test_too_few_items_give_no_scores_and_bad_shapes_raise() -> None:
    reference = summarize(_data(100))
    assert compare(reference, _data(MIN_ITEMS - 1)) is None
    with pytest.raises(ValueError, match="expected"):
        compare(reference, _data(10, d=8))
    with pytest.raises(ValueError, match="N >= 1"):
        summarize(np.zeros((0, 4)))


def test_constant_features_do_not_divide_by_zero() -> None:
    x = _data(50)
    x[:, 3] = 7.0
    summary = summarize(x)
    assert summary.std[3] == 1.0
    scores = compare(summary, x)
    assert scores is not None and np.isfinite(list(scores.values())).all()


def test_rotated_features_show_in_the_spectrum() -> None:
    rng = np.random.default_rng(0)
    low_rank = rng.normal(size=(400, 2)) @ rng.normal(size=(2, 16)) + 0.1 * rng.normal(
        size=(400, 16))
    reference = summarize(low_rank)
    iso = rng.normal(size=(400, 16)) * reference.std + reference.mean
    assert compare(reference, iso)["spectrum_shift"] > 0.5  # type: ignore[index]
    assert compare(reference, low_rank[:200])["spectrum_shift"] < 0.1  # type: ignore[index]


def test_round_trip_through_safetensors() -> None:
    summary = summarize(_data(30))
    back = FeatureSummary.from_tensors(load(save(summary.tensors("image"))), "image")
    assert back.n == 30
    np.testing.assert_array_equal(back.mean, summary.mean)
    np.testing.assert_array_equal(back.spectrum, summary.spectrum)


def test_warning_is_relative_to_validation() -> None:
    assert warning("text", None, None) is None
    assert warning("text", {"mean_shift": 0.2}, {"mean_shift": 0.05}) is None
    note = warning("text", {"mean_shift": 0.9}, {"mean_shift": 0.1})
    assert note is not None and note.startswith("text features differ")
    # A validation split that already moved that much: no warning.
    assert warning("text", {"mean_shift": 0.9}, {"mean_shift": 0.5}) is None


def _clusters(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    """Two tight clusters at ±(1 … 3) in every feature: the features move together."""
    rng = np.random.default_rng(seed)
    side = rng.choice([-1.0, 1.0], size=(n, 1))
    return side * np.linspace(1.0, 3.0, d) + 0.3 * rng.normal(size=(n, d))


def _scores(reference: FeatureSummary, x: np.ndarray) -> dict[str, Any]:
    scores = compare(reference, x)
    assert scores is not None
    return scores


def test_the_training_distribution_scores_a_knn_ratio_near_one() -> None:
    reference = summarize(_data(3000))
    assert reference.train_knn is not None
    ratios = [_scores(reference, _data(40, seed=s))["knn_ratio"] for s in range(1, 11)]
    assert all(0.9 < r < 1.1 for r in ratios), ratios
    scores = _scores(reference, _data(40, seed=1))
    assert scores["train_knn_distance"] == round(reference.train_knn, 4)
    assert warning("image", scores, compare(reference, _data(200, seed=2))) is None
    # The training items themselves sit on sampled neighbours: distance 0 for those sampled.
    small = _data(200)
    assert _scores(summarize(small), small)["knn_distance"] == 0.0


@pytest.mark.parametrize("off", ["shuffled", "midpoint"])
def test_data_off_the_training_manifold_warns_through_knn_not_mean(off: str) -> None:
    reference = summarize(_clusters(2000))
    validation = compare(reference, _clusters(200, seed=1))
    rng = np.random.default_rng(3)
    if off == "shuffled":  # each feature shuffled across items: the same means and spreads
        new = _clusters(200, seed=2)
        new = np.stack([rng.permutation(new[:, j]) for j in range(new.shape[1])], axis=1)
    else:  # between the clusters, drawn with the training means and spreads
        new = rng.normal(size=(200, 32)) * reference.std + reference.mean
    scores = _scores(reference, new)
    assert validation is not None
    assert validation["knn_ratio"] == pytest.approx(1.0, abs=0.05)
    assert scores["mean_shift"] < 0.1 and scores["scale_shift"] < 0.1
    assert scores["knn_ratio"] > 5
    note = warning("image", scores, validation)
    assert note is not None and note.startswith("image features differ")
    assert "nearest training item" in note and "mean shift" not in note
    # Without the kNN scores (the summaries of old models) the same data would pass unnoticed.
    assert warning("image", {**scores, "knn_ratio": None}, validation) is None


def test_knn_warning_is_relative_to_validation() -> None:
    moved = {"mean_shift": 0.0, "knn_ratio": 1.8}
    assert warning("audio", moved, None) is not None  # no validation: measured against 1
    assert warning("audio", moved, {"mean_shift": 0.0, "knn_ratio": 1.05}) is not None
    assert warning("audio", {**moved, "knn_ratio": 1.4}, {"mean_shift": 0.0,
                                                           "knn_ratio": 1.0}) is None
    # A validation split of new groups 1.5 times as far: the bar moves to 2.0.
    assert warning("audio", moved, {"mean_shift": 0.0, "knn_ratio": 1.5}) is None
    # A validation baseline stored before the kNN scores existed.
    assert warning("audio", moved, {"mean_shift": 0.0}) is not None
    both = warning("audio", {"mean_shift": 0.9, "knn_ratio": 3.0}, {"mean_shift": 0.1})
    assert both is not None and "mean shift" in both and "nearest training item" in both


def test_summaries_without_a_sample_still_load_and_compare() -> None:
    summary = summarize(_data(300))
    old = {k: v for k, v in summary.tensors("text").items()
           if not k.endswith((".sample", ".sample_knn"))}
    back = FeatureSummary.from_tensors(load(save(old)), "text")
    assert back.sample is None and back.train_knn is None
    scores = _scores(back, _data(40, seed=1, shift=0.8))
    assert scores["mean_shift"] > 0.5
    assert scores["knn_distance"] is None and scores["knn_ratio"] is None
    assert warning("text", scores, {"mean_shift": 0.05}) is not None
    # Too few training items for a sample: summarised and compared without one.
    tiny = summarize(_data(MIN_ITEMS - 1))
    assert tiny.sample is None and "text.sample" not in tiny.tensors("text")


def test_the_sample_is_seeded_bounded_and_survives_safetensors() -> None:
    x = _data(KNN_SAMPLE + 500, d=8)
    first, again, other = summarize(x, seed=1), summarize(x, seed=1), summarize(x, seed=2)
    assert first.sample is not None and other.sample is not None
    assert first.sample.shape == (KNN_SAMPLE, 8) and first.sample.dtype == np.float16
    assert again.sample is not None
    np.testing.assert_array_equal(first.sample, again.sample)
    assert first.train_knn == again.train_knn
    assert not np.array_equal(first.sample, other.sample)
    back = FeatureSummary.from_tensors(load(save(first.tensors("image"))), "image")
    assert back.sample is not None
    np.testing.assert_array_equal(back.sample, first.sample)
    assert back.train_knn == pytest.approx(first.train_knn, rel=1e-6)
    new = _data(60, d=8, seed=5)
    assert compare(back, new) == compare(first, new)
    # Rows of the standardised training data, not new values, and none twice.
    z = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32).astype(np.float16)
    rows = {row.tobytes() for row in z}
    assert all(row.tobytes() in rows for row in first.sample)
    assert len({row.tobytes() for row in first.sample}) == KNN_SAMPLE


def test_nearest_neighbour_distances_are_exact_across_chunks() -> None:
    from models.shift import KNN_CHUNK, _nearest

    rng = np.random.default_rng(0)
    sample = rng.normal(size=(50, 6)).astype(np.float32)
    z = rng.normal(size=(KNN_CHUNK + 7, 6)).astype(np.float32)
    brute = np.sqrt(((z[:, None, :] - sample[None, :, :]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(_nearest(z, sample), brute, rtol=1e-4, atol=1e-4)
    loo = np.sqrt(((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(loo, np.inf)
    np.testing.assert_allclose(_nearest(sample, sample, skip_within=0.0), loo.min(axis=1),
                               rtol=1e-4, atol=1e-4)


def test_duplicate_training_items_do_not_make_the_ratio_undefined() -> None:
    # Most items one vector (a frozen text encoder on unknown words), the rest spread out.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    x[:300] = x[0]
    summary = summarize(x)
    assert summary.train_knn is not None and summary.train_knn > 0.1
    same = _scores(summary, x[rng.permutation(400)[:60]])
    assert same["knn_ratio"] < 1.0  # most of them sit on the repeated vector
    far = _scores(summary, rng.normal(size=(40, 16)) + 5.0)
    assert far["knn_ratio"] > 2.0
    # All one vector: nothing to measure a distance against.
    assert summarize(np.ones((50, 4))).sample is None


def test_the_worker_stores_the_sample_and_reports_knn_on_jobs(tmp_path: Path) -> None:
    from safetensors.numpy import load as load_blob

    from store import jobs
    from store.features import put_features
    from store.migrate import upgrade
    from store.registry import ModelRow
    from tests.conftest import embedded_settings
    from worker.runtime import Runtime
    from worker.shift import record_job_shift, store_training_summary

    settings = embedded_settings(tmp_path)
    upgrade(settings.db_url)
    rt = Runtime(settings)
    try:
        shift = store_training_summary(rt, {"image": _clusters(300).astype(np.float32)},
                                       {"image": _clusters(60, seed=1).astype(np.float32)})
        assert shift is not None
        stored = load_blob(rt.blobs.read(shift["stats_blob"]))
        assert stored["image.sample"].shape == (300, 32)
        assert shift["validation"]["image"]["knn_ratio"] == pytest.approx(1.0, abs=0.2)
        rng = np.random.default_rng(4)
        off = rng.normal(size=(40, 32)) * stored["image.std"] + stored["image.mean"]
        model = ModelRow(1, None, "m", 1, ["a"], {"image": {"version": "enc-test", "dim": 32}},
                         {"shift": shift}, "0" * 64)
        with rt.db.session() as s:
            job_id = jobs.create_job(s, kind="classify", archive_blob="0" * 64,
                                     archive_name="a.tar", archive_bytes=1,
                                     model_version_id=None).id
            jobs.add_items(s, job_id, ({"key": f"k{i}", "media": {"image": {
                "blob": f"{i:064x}", "name": f"k{i}.png"}}} for i in range(len(off))))
            put_features(s, "enc-test", {f"{i:064x}": v.astype(np.float32)
                                         for i, v in enumerate(off)})
        report = record_job_shift(rt, job_id, model)
        assert report is not None
        scores = report["modalities"]["image"]
        assert scores["knn_ratio"] > 3 and scores["mean_shift"] < 0.3
        assert len(report["warnings"]) == 1 and "nearest training item" in report["warnings"][0]
        assert report["validation"]["image"]["knn_ratio"] is not None
        with rt.db.session() as s:
            assert jobs.get_job(s, job_id).report["shift"] == report
    finally:
        rt.close()
