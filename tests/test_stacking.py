"""Stacking for late fusion (models/training.py ``TrainConfig.stacking_folds``): the modality
weights fit on out-of-fold predictions; the option through the API and the worker."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from mmbatch.contract import OptionError, TrainOptions
from mmbatch.settings import Settings
from models import (
    FeatureSet,
    FusionConfig,
    TrainConfig,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
    stratified_split,
)
from models.fusion import combine_late
from models.losses import ClassificationLoss
from models.training import fit_late_weights, stratified_folds
from store import jobs
from store.db import Database
from store.keys import create_key
from store.migrate import upgrade
from tests.test_models import synthetic, tiny_cfg
from tests.util import tar_bytes
from web.app import create_app

# --- folds and the combination ---------------------------------------------------------------


def test_stratified_folds_partition_the_items_class_by_class() -> None:
    labels = [0] * 10 + [1] * 7 + [2] * 3
    folds = stratified_folds(labels, 3, seed=4)
    assert sorted(i for f in folds for i in f) == list(range(len(labels)))
    assert [len(f) for f in folds] in ([7, 7, 6], [7, 6, 7], [6, 7, 7])
    for c, n in ((0, 10), (1, 7), (2, 3)):
        per_fold = [sum(labels[i] == c for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n
    assert stratified_folds(labels, 3, seed=4) == folds
    assert stratified_folds(labels, 3, seed=5) != folds
    with pytest.raises(ValueError, match="k must be"):
        stratified_folds(labels, 1, seed=0)


def test_late_weights_trust_the_modality_that_predicts_held_out_items() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 200, 3
    labels = torch.randint(0, c, (n,), generator=g)
    good = torch.log_softmax(3.0 * torch.nn.functional.one_hot(labels, c).float()
                             + torch.randn(n, c, generator=g), dim=1)  # mostly right
    noise = torch.log_softmax(4.0 * torch.randn(n, c, generator=g), dim=1)  # confident, random
    log_probs = torch.stack([noise, good], dim=1)  # (N, 2, C)
    mask = torch.rand(n, 2, generator=g) < 0.8
    mask[~mask.any(1), 1] = True
    criterion = ClassificationLoss("ce", labels, c)
    a = fit_late_weights(log_probs, mask, labels, criterion)
    weights = torch.softmax(a, dim=0)
    assert weights[1] > 0.9
    # Fit as at inference: a masked modality's predictions cannot move the weights.
    changed = torch.where(mask[:, :, None], log_probs, torch.log_softmax(
        torch.randn(n, 2, c, generator=g), dim=2))
    assert torch.equal(fit_late_weights(changed, mask, labels, criterion), a)
    # ... and the fitted weights beat equal ones on the data they were fit on.
    fitted, _ = combine_late(log_probs, mask, a)
    equal, _ = combine_late(log_probs, mask, torch.zeros(2))
    assert criterion(fitted, labels) < criterion(equal, labels)


# --- fit with stacking -----------------------------------------------------------------------


def _toy() -> tuple[FeatureSet, FeatureSet]:
    data, names = synthetic(n_per_class=15)
    train_idx, val_idx = stratified_split(names, 0.25, seed=0)
    return data.subset(train_idx), data.subset(val_idx)


TOY = TrainConfig(epochs=15, patience=5, batch_size=16, seed=1)


def test_stacking_gives_an_ordinary_late_model_with_other_weights() -> None:
    train, val = _toy()
    cfg = tiny_cfg(strategy="late")
    joint, _ = fit(train, val, cfg, TOY)
    state = torch.random.get_rng_state()
    stacked, metrics = fit(train, val, cfg, replace(TOY, stacking_folds=3))
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert not stacked.training
    assert not torch.allclose(stacked.modality_logits, joint.modality_logits, atol=1e-3)
    section = metrics["stacking"]
    assert section["folds"] == 3
    assert list(section["modality_weights"]) == list(cfg.modalities)
    assert sum(section["modality_weights"].values()) == pytest.approx(1.0)
    assert torch.softmax(stacked.modality_logits, 0).tolist() == pytest.approx(
        list(section["modality_weights"].values()))
    assert 0.0 <= section["oof_accuracy"] <= 1.0
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] <= TOY.epochs
    assert metrics["val_accuracy"] is not None and metrics["train_size"] == len(train)
    # The same checkpoint format: it reloads to the same predictions, missing modalities too.
    data, config = save_checkpoint(stacked)
    again = load_checkpoint(data, config)
    probs, _ = predict(stacked, val.features, val.mask)
    probs2, _ = predict(again, val.features, val.mask)
    assert not val.mask.all() and torch.equal(probs, probs2)


def test_stacking_is_reproducible() -> None:
    train, val = _toy()
    cfg = tiny_cfg(strategy="late")
    tcfg = replace(TOY, stacking_folds=2)
    runs = [fit(train, val, cfg, tcfg) for _ in range(2)]
    for _, metrics in runs:
        metrics.pop("seconds"), metrics.pop("seconds_per_epoch")
    assert runs[0][1] == runs[1][1]
    for (k, a), (_, b) in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k


def test_stacking_options_are_checked() -> None:
    train, val = _toy()
    for bad in (1, -1, True, 2.0):
        with pytest.raises(ValueError, match="stacking_folds"):
            TrainConfig(stacking_folds=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="late strategy only"):
        fit(train, val, tiny_cfg(strategy="weighted"), replace(TOY, stacking_folds=3))
    with pytest.raises(ValueError, match="at least 5 training items"):
        fit(train.subset([0, 1, 2]), None, tiny_cfg(strategy="late"),
            replace(TOY, stacking_folds=5))


def _memorisable(seed: int, n_train: int = 60, n_val: int = 90) -> tuple[FeatureSet, FeatureSet]:
    """Three classes; ``text``: 8 informative dims (class centroid plus unit noise); ``image``:
    256 dims of pure noise, which a head memorises on 60 training items and which says nothing
    about held-out items."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    labels = torch.arange(3).repeat(n // 3 + 1)[:n][torch.randperm(n, generator=g)]
    centroids = torch.randn(3, 8, generator=g)
    text = centroids[labels] + torch.randn(n, 8, generator=g)
    image = torch.randn(n, 256, generator=g)
    data = FeatureSet({"image": image, "text": text}, torch.ones(n, 2, dtype=torch.bool), labels)
    return data.subset(range(n_train)), data.subset(range(n_train, n))


@pytest.mark.parametrize("seed", [0, 1])
def test_stacking_does_not_trust_a_modality_that_memorises(seed: int) -> None:
    # Measured over seeds 0-9 (epochs 60): joint training gives the noise modality 0.53-0.62 of
    # the weight and validates at 0.40-0.69; stacking (3 folds) gives it 0.01-0.09 and
    # validates at 0.62-0.97, 0.19-0.40 better on each seed.
    train, val = _memorisable(seed)
    cfg = FusionConfig(input_dims={"image": 256, "text": 8}, num_classes=3, strategy="late",
                       proj_dim=16, hidden_dim=16)
    tcfg = TrainConfig(epochs=60, patience=20, batch_size=16, seed=seed)
    joint, joint_metrics = fit(train, val, cfg, tcfg)
    stacked, stacked_metrics = fit(train, val, cfg, replace(tcfg, stacking_folds=3))
    joint_w = torch.softmax(joint.modality_logits.detach(), 0)  # (image, text)
    stacked_w = torch.softmax(stacked.modality_logits.detach(), 0)
    assert joint_metrics["train_accuracy"] == 1.0  # the memorised modality fits train
    assert joint_w[0] > 0.45  # ... and joint training trusts it about as much as text
    assert stacked_w[1] > 0.8
    assert stacked_w[1] > joint_w[1] + 0.3
    assert stacked_metrics["val_accuracy"] >= joint_metrics["val_accuracy"] + 0.1


# --- the option through the API and the worker -----------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Any:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    with db.session() as s:
        key = create_key(s, "mine")
    client = create_app(settings).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key.key}"
    yield client, db
    db.dispose()


def _post(client: Any, form: dict[str, str]) -> Any:
    return client.post("/api/v1/jobs", data={
        "kind": "train", **form, "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar")})


@pytest.mark.parametrize("form", [
    {"strategy": "late", "stacking_folds": "1"},
    {"strategy": "late", "stacking_folds": "11"},
    {"strategy": "late", "stacking_folds": "-2"},
    {"strategy": "late", "stacking_folds": "three"},
    {"strategy": "late", "stacking_folds": "2.5"},
    {"strategy": "gated", "stacking_folds": "3"},
    {"stacking_folds": "3"},  # the default strategy is stack
])
def test_bad_stacking_folds_are_400(api: Any, form: dict[str, str]) -> None:
    r = _post(api[0], form)
    assert r.status_code == 400, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == "invalid_stacking_folds" and "stacking_folds" in error["message"]


def test_stacking_folds_reach_the_job_and_the_trainer(api: Any) -> None:
    client, db = api
    r = _post(client, {"strategy": "late", "stacking_folds": "5"})
    assert r.status_code == 202, r.get_json()
    with db.session() as s:
        options = jobs.get_job(s, r.get_json()["id"]).options
    assert options == {"strategy": "late", "stacking_folds": 5}
    assert TrainOptions.from_dict(options) == TrainOptions(strategy="late", stacking_folds=5)
    TrainConfig(stacking_folds=TrainOptions.from_dict(options).stacking_folds or 0)
    r = _post(client, {"strategy": "concat", "stacking_folds": "0"})
    assert r.status_code == 202, r.get_json()
    for bad in ({"strategy": "late", "stacking_folds": 1},
                {"strategy": "concat", "stacking_folds": 3}):
        with pytest.raises(OptionError, match="stacking_folds"):
            TrainOptions.from_dict(bad)
