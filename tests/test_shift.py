"""Feature-shift summaries and warnings (models.shift): zero-ish for data from the training
distribution, large for moved data; stored and read back through safetensors."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load, save

from models.shift import MIN_ITEMS, FeatureSummary, compare, summarize, warning


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
