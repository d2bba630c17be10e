"""Fusion strategies: shapes, masks, weights, training and checkpoints; tiny and seeded."""

from __future__ import annotations

import json

import pytest
import torch

from mmbatch.contract import STRATEGIES
from models import (
    FusionClassifier,
    FusionConfig,
    TrainConfig,
    evaluate,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
    stratified_split,
)
from models.fusion import masked_softmax
from tests.test_models import CLASSES, DIMS, random_inputs, synthetic, tiny_cfg

ALL_MASKS = torch.tensor(
    [
        [True, True, True],
        [True, True, False],
        [True, False, True],
        [False, True, True],
        [True, False, False],
        [False, True, False],
        [False, False, True],
    ]
)


def model_for(strategy: str, seed: int = 0, **kw: object) -> FusionClassifier:
    torch.manual_seed(seed)
    return FusionClassifier(tiny_cfg(strategy=strategy, **kw)).eval()


def test_strategies_are_the_documented_ones() -> None:
    assert STRATEGIES == ("concat", "weighted", "gated", "attention", "hierarchical", "late",
                          "stack")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shapes_and_weights(strategy: str) -> None:
    model = model_for(strategy)
    feats, _ = random_inputs(model.cfg, len(ALL_MASKS))
    out = model.forward_details(feats, ALL_MASKS)
    assert out.logits.shape == (7, 3)
    assert out.fused.shape == (7, model.fused_dim)
    logits, fused = model(feats, ALL_MASKS)
    assert torch.equal(logits, out.logits) and torch.equal(fused, out.fused)
    if strategy == "concat":
        assert out.weights is None
        return
    assert out.weights is not None and out.weights.shape == (7, 3)
    # Weights are exactly zero where missing, non-negative, and sum to one over the present.
    assert torch.equal(out.weights[~ALL_MASKS], torch.zeros(int((~ALL_MASKS).sum())))
    assert (out.weights >= 0).all()
    assert torch.allclose(out.weights.sum(1), torch.ones(7), atol=1e-6)
    assert (out.unimodal_logits is not None) == (strategy == "late")
    if out.unimodal_logits is not None:
        assert out.unimodal_logits.shape == (7, 3, 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_masked_modality_cannot_change_any_output(strategy: str) -> None:
    model = model_for(strategy)
    feats, _ = random_inputs(model.cfg, len(ALL_MASKS), seed=1)
    out = model.forward_details(feats, ALL_MASKS)
    changed = {m: x.clone() for m, x in feats.items()}
    for i, m in enumerate(model.modalities):
        hidden = ~ALL_MASKS[:, i]
        changed[m][hidden] = 100.0 * torch.randn(int(hidden.sum()), model.cfg.input_dims[m])
    changed["audio"][~ALL_MASKS[:, 2]] = float("nan")  # NaN in a missing modality too
    again = model.forward_details(changed, ALL_MASKS)
    assert torch.equal(out.logits, again.logits)
    assert torch.equal(out.fused, again.fused)
    if out.weights is not None:
        assert again.weights is not None and torch.equal(out.weights, again.weights)
    # ...while a present modality's features do matter.
    changed["image"][0] += 1.0
    assert not torch.allclose(model(changed, ALL_MASKS)[0][0], out.logits[0])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_item_with_nothing_present_gives_finite_outputs(strategy: str) -> None:
    model = model_for(strategy).train()  # gradients too, with dropout on
    feats, _ = random_inputs(model.cfg, 3)
    mask = torch.tensor([[False, False, False], [True, False, False], [False, False, False]])
    out = model.forward_details(feats, mask)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.fused).all()
    out.logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_modality_models(strategy: str) -> None:
    cfg = FusionConfig(input_dims={"audio": 4}, num_classes=2, strategy=strategy, proj_dim=8,
                       hidden_dim=8, num_heads=2)
    model = FusionClassifier(cfg).eval()
    logits, fused = model({"audio": torch.randn(5, 4)}, torch.ones(5, 1, dtype=torch.bool))
    assert logits.shape == (5, 2) and fused.shape == (5, model.fused_dim)


def test_gated_weights_depend_on_the_item_weighted_ones_do_not() -> None:
    feats, _ = random_inputs(tiny_cfg(), 4, seed=2)
    full = torch.ones(4, 3, dtype=torch.bool)
    weighted = model_for("weighted").forward_details(feats, full).weights
    gate_model = model_for("gated")
    assert torch.equal(gate_model.gate.weight, torch.zeros_like(gate_model.gate.weight))
    torch.nn.init.normal_(gate_model.gate.weight)  # zero at init (a plain average): perturb it
    gated = gate_model.forward_details(feats, full).weights
    assert weighted is not None and gated is not None
    assert torch.allclose(weighted, weighted[:1].expand(4, 3))
    assert not torch.allclose(gated, gated[:1].expand(4, 3))


def test_masked_softmax() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 2.0]])
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    w = masked_softmax(scores, mask)
    assert torch.allclose(w[0], torch.softmax(torch.tensor([1.0, 0.0, 3.0]).masked_fill(
        torch.tensor([False, True, False]), float("-inf")), dim=0))
    assert torch.equal(w[1], torch.zeros(3))
    assert torch.equal(w[2], torch.tensor([0.0, 1.0, 0.0]))


def test_attention_config_is_validated() -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny_cfg(strategy="attention", proj_dim=10, num_heads=4)
    tiny_cfg(strategy="concat", proj_dim=10, num_heads=4)  # heads only matter for attention
    for bad in ({"num_heads": 0}, {"num_layers": 0}, {"num_layers": 1.5}):
        with pytest.raises(ValueError):
            tiny_cfg(strategy="attention", **bad)


def test_configs_saved_before_the_strategies_existed_still_load() -> None:
    old = {"input_dims": dict(DIMS), "num_classes": 3, "strategy": "concat", "proj_dim": 8,
           "hidden_dim": 16, "dropout": 0.2}
    cfg = FusionConfig.from_dict(old)
    assert (cfg.num_heads, cfg.num_layers) == (4, 1)
    # A concat model's parameter names are those of the first checkpoints.
    names = set(FusionClassifier(cfg).state_dict())
    assert names == {n for n in names if n.split(".")[0] in ("norms", "projections", "head")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_on_a_tiny_problem_and_round_trips(strategy: str) -> None:
    data, names = synthetic(n_per_class=20)
    train_idx, val_idx = stratified_split(names, 0.25, seed=0)
    train, val = data.subset(train_idx), data.subset(val_idx)
    cfg = tiny_cfg(strategy=strategy, num_heads=2, num_layers=2)
    model, metrics = fit(train, val, cfg, TrainConfig(epochs=100, patience=25, batch_size=16,
                                                      seed=3))
    assert metrics["val_accuracy"] >= 0.9, metrics
    assert metrics["strategy"] == strategy
    blob, config = save_checkpoint(model)
    config = json.loads(json.dumps(config))
    assert config["fusion"]["strategy"] == strategy
    restored = load_checkpoint(blob, config)
    assert restored.cfg == model.cfg
    a, b = predict(model, val.features, val.mask), predict(restored, val.features, val.mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert evaluate(restored, val, CLASSES)["accuracy"] == metrics["val_accuracy"]


def test_a_checkpoint_cannot_be_loaded_as_another_strategy() -> None:
    blob, config = save_checkpoint(model_for("attention"))
    other = {**config, "fusion": {**config["fusion"], "strategy": "gated"}}
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(blob, other)
