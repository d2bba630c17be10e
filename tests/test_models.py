"""Fusion, training, checkpoint, registry and device: tiny, seeded, no encoder weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmbatch.contract import MODALITIES
from mmbatch.scoring import scores as _scores
from models import (
    FeatureSet,
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
from models.device import pick_device
from models.registry import SPECS, build_encoder
from models.spec import EncoderSpec
from models.training import drop_modalities

DIMS = {"image": 12, "text": 8, "audio": 6}
CLASSES = ["cat", "dog", "bird"]


def tiny_cfg(**kw: object) -> FusionConfig:
    base: dict[str, object] = dict(input_dims=dict(DIMS), num_classes=3, proj_dim=8, hidden_dim=16)
    base.update(kw)
    return FusionConfig(**base)  # type: ignore[arg-type]


def random_inputs(
    cfg: FusionConfig, n: int, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, d, generator=g) for m, d in cfg.input_dims.items()}
    mask = torch.rand(n, len(cfg.input_dims), generator=g) < 0.7
    return feats, mask


def synthetic(
    n_per_class: int = 20, seed: int = 0, missing: float = 0.2
) -> tuple[FeatureSet, list[str]]:
    """Separable toy data: each class has its own centroid in every modality; some modalities
    missing (zeros + False), never all of an item's."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)  # (N,)
    n = labels.shape[0]
    feats = {}
    for m, d in DIMS.items():
        centroids = 2.0 * torch.randn(len(CLASSES), d, generator=g)
        feats[m] = centroids[labels] + 0.7 * torch.randn(n, d, generator=g)
    mask = torch.rand(n, len(DIMS), generator=g) >= missing
    mask[~mask.any(1), 0] = True
    for i, m in enumerate(DIMS):
        feats[m][~mask[:, i]] = 0.0
    return FeatureSet(feats, mask, labels), [CLASSES[i] for i in labels.tolist()]


# --- registry and device ---------------------------------------------------------------------


def test_specs_cover_every_modality() -> None:
    assert tuple(SPECS) == MODALITIES == ("image", "text", "audio", "video")
    assert {m: s.dim for m, s in SPECS.items()} == {"image": 1280, "text": 384, "audio": 256,
                                                    "video": 2560}
    for modality, spec in SPECS.items():
        assert spec.modality == modality and spec.name and spec.version


def test_spec_and_registry_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="modality"):
        EncoderSpec("smell", "x", "x-v1", 3)
    with pytest.raises(ValueError, match="dim"):
        EncoderSpec("image", "x", "x-v1", 0)
    with pytest.raises(ValueError, match="unknown modality"):
        build_encoder("smell")
    with pytest.raises(ValueError, match="image encoder"):  # a clip's frames take the image one
        build_encoder("video")


def test_importing_models_does_not_import_encoder_libraries() -> None:
    heavy = "{'timm', 'transformers', 'flask', 'celery', 'sqlalchemy'}"
    code = f"import sys, models; bad = {heavy} & set(sys.modules); assert not bad, bad"
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__))
    )


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "", "tpu:0"):
        with pytest.raises(ValueError):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            pick_device("cuda")
    else:
        with pytest.raises(ValueError, match="only"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


# --- fusion ----------------------------------------------------------------------------------


def test_fusion_shapes() -> None:
    cfg = tiny_cfg()
    model = FusionClassifier(cfg).eval()
    feats, mask = random_inputs(cfg, 5)
    logits, fused = model(feats, mask)
    assert logits.shape == (5, 3)
    assert fused.shape == (5, 3 * 8 + 3) == (5, model.fused_dim)
    # The mask rides along as indicators at the end of the fused vector.
    assert torch.equal(fused[:, -3:], mask.float())


def test_fusion_ignores_features_of_missing_modalities() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = FusionClassifier(cfg).eval()
    feats, _ = random_inputs(cfg, 4)
    mask = torch.tensor(
        [[True, False, True], [False, True, True], [True, True, False], [True, False, False]]
    )
    logits, fused = model(feats, mask)
    changed = {m: x.clone() for m, x in feats.items()}
    for i, m in enumerate(cfg.modalities):
        changed[m][~mask[:, i]] = 100.0 * torch.randn(int((~mask[:, i]).sum()), cfg.input_dims[m])
    logits2, fused2 = model(changed, mask)
    assert torch.equal(logits, logits2) and torch.equal(fused, fused2)
    changed["audio"][3] = float("nan")
    assert torch.equal(model(changed, mask)[0], logits)
    # ...while a present modality's features do matter.
    changed["image"][0] += 1.0
    assert not torch.allclose(model(changed, mask)[0][0], logits[0])


def test_fusion_single_modality_and_any_input_order() -> None:
    cfg = FusionConfig(input_dims={"audio": 4, "image": 3}, num_classes=2, proj_dim=4, hidden_dim=4)
    assert cfg.modalities == ("image", "audio")  # canonical MODALITIES order
    model = FusionClassifier(cfg)
    logits, fused = model(
        {"image": torch.randn(2, 3), "audio": torch.randn(2, 4)}, torch.ones(2, 2, dtype=torch.bool)
    )
    assert logits.shape == (2, 2) and fused.shape == (2, 10)
    with pytest.raises(ValueError, match="mask"):
        model(
            {"image": torch.randn(2, 3), "audio": torch.randn(2, 4)},
            torch.ones(2, 3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="lack"):
        model({"image": torch.randn(2, 3)}, torch.ones(2, 2, dtype=torch.bool))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"input_dims": {}}, "input_dims"),
        ({"input_dims": {"smell": 3}}, "unknown modalities"),
        ({"input_dims": {"image": 0}}, "positive"),
        ({"input_dims": {"image": 2.5}}, "positive"),
        ({"num_classes": 1}, "num_classes"),
        ({"strategy": "sum"}, "strategy"),
        ({"proj_dim": 0}, "proj_dim"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_fusion_config_rejects_bad_values(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_cfg(**kw)


def test_fusion_config_dict_round_trip() -> None:
    cfg = tiny_cfg(dropout=0.1)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert FusionConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown"):
        FusionConfig.from_dict({**d, "heads": 4})
    with pytest.raises(ValueError, match="missing"):
        FusionConfig.from_dict({"input_dims": DIMS})
    # The config keeps its own copy of input_dims.
    dims = {"image": 3}
    frozen = FusionConfig(input_dims=dims, num_classes=2)
    dims["image"] = 99
    assert frozen.input_dims == {"image": 3}
    # Variants made with replace() are validated again.
    assert replace(cfg, proj_dim=4).proj_dim == 4
    with pytest.raises(ValueError, match="strategy"):
        replace(cfg, strategy="sum")


# --- training --------------------------------------------------------------------------------


def test_stratified_split_properties() -> None:
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["d"]
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(train + val) == list(range(len(labels)))
    assert not set(train) & set(val)
    for cls in "abc":
        assert any(labels[i] == cls for i in train) and any(labels[i] == cls for i in val)
    assert [labels[i] for i in val].count("a") == 2
    assert labels.index("d") in train
    assert stratified_split(labels, 0.2, seed=3) == (train, val)
    assert stratified_split(labels, 0.2, seed=4) != (train, val)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError):
            stratified_split(labels, bad, seed=0)


def test_drop_modalities_never_hides_everything() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(500, 3, generator=g) < 0.6
    dropped = drop_modalities(mask, 0.5, g)
    assert not (dropped & ~mask).any()  # never invents a modality
    assert torch.equal(dropped.any(1), mask.any(1))  # an item keeps at least one
    assert dropped.sum() < mask.sum()
    assert torch.equal(drop_modalities(mask, 0.0, g), mask)


def test_fit_separates_a_toy_problem_reproducibly() -> None:
    data, names = synthetic()
    train_idx, val_idx = stratified_split(names, 0.25, seed=0)
    train, val = data.subset(train_idx), data.subset(val_idx)
    cfg = tiny_cfg()
    tcfg = TrainConfig(epochs=80, patience=15, batch_size=16, seed=1)
    state = torch.random.get_rng_state()
    model, metrics = fit(train, val, cfg, tcfg)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert not model.training
    assert metrics["val_accuracy"] >= 0.9 and metrics["train_accuracy"] >= 0.9
    assert metrics["train_size"] == len(train_idx) and metrics["val_size"] == len(val_idx) == 15
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] <= tcfg.epochs
    assert set(metrics) >= {
        "train_accuracy",
        "val_accuracy",
        "val_macro_f1",
        "epochs",
        "best_epoch",
        "train_size",
        "val_size",
        "seconds",
    }

    model2, metrics2 = fit(train, val, cfg, tcfg)
    for timing in ("seconds", "seconds_per_epoch"):
        metrics.pop(timing), metrics2.pop(timing)
    assert metrics == metrics2
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k

    report = evaluate(model, val, CLASSES)
    assert report["accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert report["macro_f1"] == pytest.approx(metrics["val_macro_f1"])
    assert sum(map(sum, report["confusion"])) == len(val)
    assert [report["per_class"][c]["support"] for c in CLASSES] == [5, 5, 5]
    with pytest.raises(ValueError, match="class names"):
        evaluate(model, val, CLASSES[:2])


def test_fit_without_validation_runs_every_epoch() -> None:
    data, _ = synthetic(n_per_class=6)
    model, metrics = fit(data, None, tiny_cfg(), TrainConfig(epochs=5, seed=0))
    assert metrics["epochs"] == metrics["best_epoch"] == 5
    assert metrics["val_accuracy"] is None and metrics["val_size"] == 0
    # Standardisation statistics come from present training items and live in the model.
    present = data.features["text"][data.mask[:, 1]]
    assert torch.allclose(model.state_dict()["norms.text.mean"], present.mean(0), atol=1e-6)


def test_fit_rejects_mismatched_data() -> None:
    data, _ = synthetic(n_per_class=3)
    with pytest.raises(ValueError, match="dim"):
        fit(data, None, tiny_cfg(input_dims={**DIMS, "text": 9}), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="labels"):
        fit(data, None, tiny_cfg(num_classes=2), TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="mask"):
        FeatureSet({}, torch.ones(3, 2), torch.zeros(3, dtype=torch.long))


def test_scores_match_hand_computation() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    confusion, table, macro = _scores(y_true, y_pred, 4)  # class 3 never occurs
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    precision, recall, f1, support = table.T
    assert precision[:3] == pytest.approx([1.0, 0.5, 0.5])
    assert recall[:3] == pytest.approx([2 / 3, 0.5, 1.0])
    assert f1[:3] == pytest.approx([0.8, 0.5, 2 / 3])
    assert support.tolist() == [3, 2, 1, 0]
    assert macro == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # absent class not averaged in


def test_predict_probabilities_and_temperature() -> None:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = FusionClassifier(cfg).train()
    feats, mask = random_inputs(cfg, 6)
    probs, fused = predict(model, feats, mask)
    assert model.training  # mode restored
    assert probs.shape == (6, 3) and fused.shape == (6, model.fused_dim)
    assert torch.allclose(probs.sum(1), torch.ones(6))
    hot, _ = predict(model, feats, mask, temperature=10.0)
    entropy = lambda p: -(p * p.log()).sum(1)  # noqa: E731
    assert (entropy(hot) > entropy(probs)).all()
    probs[0, 0] = 0.0  # an ordinary tensor, not an inference tensor
    with pytest.raises(ValueError, match="temperature"):
        predict(model, feats, mask, temperature=0.0)


# --- checkpoint ------------------------------------------------------------------------------


def test_checkpoint_round_trip() -> None:
    data, _ = synthetic(n_per_class=5)
    model, _ = fit(data, None, tiny_cfg(), TrainConfig(epochs=3))
    blob, config = save_checkpoint(model)
    assert isinstance(blob, bytes) and json.loads(json.dumps(config)) == config
    restored = load_checkpoint(blob, json.loads(json.dumps(config)))
    assert not restored.training and restored.cfg == model.cfg
    expected = predict(model, data.features, data.mask)
    actual = predict(restored, data.features, data.mask)
    assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])


def test_checkpoint_rejects_bad_input() -> None:
    model = FusionClassifier(tiny_cfg())
    blob, config = save_checkpoint(model)
    with pytest.raises(ValueError, match="format_version"):
        load_checkpoint(blob, {**config, "format_version": 99})
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(blob, {"fusion": config["fusion"]})
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(b"not safetensors", config)
    other = {**config, "fusion": {**config["fusion"], "proj_dim": 4}}
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(blob, other)
    with pytest.raises(ValueError):
        save_checkpoint(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
