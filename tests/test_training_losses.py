"""Imbalance (losses, balanced sampling), early stopping, reproducibility and evaluation."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models import TrainConfig, fit, stratified_split
from models.evaluation import (
    calibration,
    confusion_png,
    evaluation_report,
    expected_calibration_error,
    fit_temperature,
    modality_ablation,
)
from models.losses import ClassificationLoss, balanced_order, class_weights, focal_loss
from tests.test_models import CLASSES, synthetic, tiny_cfg


def test_class_weights_are_inverse_frequency() -> None:
    labels = torch.tensor([0] * 8 + [1] * 2 + [3] * 10)
    w = class_weights(labels, 4)
    assert w.tolist() == pytest.approx([20 / (3 * 8), 20 / (3 * 2), 0.0, 20 / (3 * 10)])
    assert float((w[labels]).mean()) == pytest.approx(1.0)


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_items() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 5, generator=g)
    target = torch.randint(0, 5, (32,), generator=g)
    assert focal_loss(logits, target, gamma=0.0) == pytest.approx(
        float(F.cross_entropy(logits, target)), rel=1e-5)
    w = torch.rand(5, generator=g)
    assert focal_loss(logits, target, 0.0, w) == pytest.approx(
        float(F.cross_entropy(logits, target, weight=w)), rel=1e-5)
    easy = torch.tensor([[8.0, 0.0]])
    hard = torch.tensor([[0.0, 0.5]])
    y = torch.tensor([0])
    ratio_easy = focal_loss(easy, y, 2.0) / F.cross_entropy(easy, y)
    ratio_hard = focal_loss(hard, y, 2.0) / F.cross_entropy(hard, y)
    assert ratio_easy < 1e-6 < ratio_hard < 1.0
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(logits, target, gamma=-1.0)


def test_classification_loss_choices() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.randn(4, 2)
    assert ClassificationLoss("ce", labels, 2).weight is None
    weighted = ClassificationLoss("weighted", labels, 2)
    assert weighted.weight is not None and weighted.weight[1] > weighted.weight[0]
    assert torch.isfinite(ClassificationLoss("focal", labels, 2, gamma=1.0)(logits, labels))
    with pytest.raises(ValueError, match="unknown loss"):
        ClassificationLoss("hinge", labels, 2)


def test_balanced_order_draws_classes_evenly() -> None:
    labels = torch.tensor([0] * 950 + [1] * 50)
    g = torch.Generator().manual_seed(0)
    drawn = labels[balanced_order(labels, g)]
    assert len(drawn) == 1000
    assert 0.4 < float(drawn.float().mean()) < 0.6


def test_train_config_validates_the_new_options() -> None:
    for bad in ({"loss": "hinge"}, {"gamma": -1.0}, {"gamma": 11.0}, {"balanced": 1},
                {"select": "best"}, {"aux_weight": -0.1}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [{"loss": "weighted"}, {"loss": "focal", "gamma": 1.0}, {"balanced": True},
     {"select": "full"}],
)
def test_every_training_option_trains_and_is_reproducible(options: dict[str, object]) -> None:
    data, names = synthetic(n_per_class=12)
    train_idx, val_idx = stratified_split(names, 0.25, seed=0)
    train, val = data.subset(train_idx), data.subset(val_idx)
    tcfg = replace(TrainConfig(epochs=30, patience=8, batch_size=16, seed=5), **options)
    runs = [fit(train, val, tiny_cfg(strategy="gated"), tcfg)[1] for _ in range(2)]
    for run in runs:
        for timing in ("seconds", "seconds_per_epoch"):
            run.pop(timing)
    assert runs[0] == runs[1]
    assert runs[0]["val_accuracy"] > 0.5
    assert runs[0]["loss"] == tcfg.loss and runs[0]["balanced"] == tcfg.balanced
    other = fit(train, val, tiny_cfg(strategy="gated"), replace(tcfg, seed=6))[1]
    assert other["train_accuracy"] != runs[0]["train_accuracy"] or \
        other["best_epoch"] != runs[0]["best_epoch"] or other["val_loss"] != runs[0]["val_loss"]


def test_early_stopping_stops_after_patience() -> None:
    data, names = synthetic(n_per_class=10)
    train_idx, val_idx = stratified_split(names, 0.3, seed=0)
    _, metrics = fit(data.subset(train_idx), data.subset(val_idx), tiny_cfg(),
                     TrainConfig(epochs=500, patience=5, seed=0))
    assert metrics["epochs"] < 500
    assert metrics["epochs"] - metrics["best_epoch"] == 5


def test_ece_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    # bins (0.8667, 0.9333]: conf 0.9, acc 0.5; (0.5333, 0.6]: 0.6 vs 1; (0.6667, 0.7333]: 0.7 vs 1
    expected = 0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_temperature_recovers_a_known_scale() -> None:
    g = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(4000, 4, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    # A model three times too confident: the fitted temperature undoes it.
    assert fit_temperature(3.0 * true_logits, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true_logits / 2.0, labels) == pytest.approx(0.5, rel=0.1)
    # Separable data with few items: the prior keeps T from collapsing to the grid's edge.
    easy = torch.tensor([[4.0, 0.0], [0.0, 4.0]] * 5)
    assert fit_temperature(easy, torch.tensor([0, 1] * 5)) > 0.2


def test_evaluation_report_and_png() -> None:
    data, names = synthetic(n_per_class=12)
    train_idx, val_idx = stratified_split(names, 0.25, seed=0)
    train, val = data.subset(train_idx), data.subset(val_idx)
    model, _ = fit(train, val, tiny_cfg(strategy="attention", num_heads=2),
                   TrainConfig(epochs=30, seed=0))
    report = evaluation_report(model, val, CLASSES)
    assert set(report) >= {"accuracy", "macro_f1", "per_class", "confusion", "calibration",
                           "ablation"}
    assert set(report["per_class"]["cat"]) == {"precision", "recall", "f1", "support"}
    cal = report["calibration"]
    assert cal["ece_after"] <= cal["ece_before"] and cal["temperature"] > 0
    assert cal == calibration(model, val)
    ablation = report["ablation"]
    assert ablation == modality_ablation(model, val)
    assert ablation["all"] == pytest.approx(report["accuracy"])
    assert set(ablation["alone"]) == set(ablation["without"]) == {"image", "text", "audio"}
    png = confusion_png(report["confusion"], CLASSES, title="val")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert confusion_png(report["confusion"], CLASSES, title="val") == png  # deterministic
    from PIL import Image

    assert Image.open(io.BytesIO(png)).size[0] > 200
    with pytest.raises(ValueError, match="confusion"):
        confusion_png([[1, 2]], CLASSES)
