"""The acceptance criteria of the fusion models, at model level, on the project's sample.

Frozen encoder features of a 480-item sample are extracted once for the module, then
bench.models_report computes every figure (the same code that prints the table in
docs/models.md); the tests assert the criteria on them.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.models_report import FILE_MODALITIES as MODALITIES
from bench.models_report import figures, sample_features
from models.fusion import STRATEGIES


@pytest.fixture(scope="module")
def fig(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ex = sample_features(n_train=480, seed=0, out_dir=tmp_path_factory.mktemp("acceptance"))
    assert ex.data.mask.all(0).tolist() == [False, False, False]  # some items lack a modality
    return figures(ex, seed=0)


def test_every_strategy_beats_the_best_single_modality_by_ten_points(fig: dict[str, Any]) -> None:
    best_single = max(fig["single"].values())
    assert best_single < 0.7  # each modality alone carries only part of the label
    for strategy in STRATEGIES:
        assert fig["strategies"][strategy]["accuracy"] >= best_single + 0.10, strategy


def test_a_missing_modality_leaves_at_least_the_best_remaining_one(fig: dict[str, Any]) -> None:
    single = fig["single"]
    for strategy in STRATEGIES:
        without = fig["strategies"][strategy]["without"]
        for dropped in MODALITIES:
            best_remaining = max(single[m] for m in MODALITIES if m != dropped)
            assert without[dropped] >= best_remaining, (strategy, dropped)


def test_class_weights_or_focal_loss_beat_plain_cross_entropy_at_1_to_20(
    fig: dict[str, Any],
) -> None:
    losses = fig["imbalance"]["losses"]
    plain = losses["ce"]["macro_f1"]
    assert max(losses["weighted"]["macro_f1"], losses["focal (gamma 2)"]["macro_f1"]) > plain
    assert losses["weighted"]["macro_f1"] > plain


def test_temperature_scaling_does_not_worsen_calibration(fig: dict[str, Any]) -> None:
    for strategy in STRATEGIES:
        row = fig["strategies"][strategy]
        assert row["ece_after"] <= row["ece_before"], strategy
    # Late fusion's geometric mean of per-modality distributions is underconfident: scaling
    # must fix most of it, not just avoid harm.
    late = fig["strategies"]["late"]
    assert late["temperature"] < 1.0 and late["ece_after"] < 0.5 * late["ece_before"]


def test_the_same_seed_gives_the_same_metrics(fig: dict[str, Any]) -> None:
    assert fig["reproducible"] is True
