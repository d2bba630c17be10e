"""Train a fusion classifier from a train job's cached features and register it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sqlalchemy import select

from store import features as feature_cache
from store import jobs
from store.registry import register_model
from store.schema import NO_MODEL, Item, Result
from worker.adaptation import DEFAULT_BUDGET_SECONDS, encoder_modes, save_encoders, train_adapted
from worker.pipeline import MODALITIES, stack_features
from worker.runtime import Runtime
from worker.shift import store_training_summary

log = logging.getLogger(__name__)


class TrainingError(Exception):
    """The labelled data cannot train a model; the job fails with this message."""


def train_job(rt: Runtime, job_id: str) -> int | None:
    """Fit, evaluate and register a model for a train job in its training stage."""
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running" or job.stage != "training":
            return None
        rows = s.execute(
            select(Item.key, Item.media, Item.label, Item.split, Item.group)
            .join(Result, (Result.item_id == Item.id) & (Result.model_version_id == NO_MODEL))
            .where(Item.job_id == job_id, Result.status == "ok", Item.label.is_not(None))
            .order_by(Item.id)).all()
        name = str(job.options.get("name") or "fusion")
        epochs = int(job.options.get("epochs") or rt.settings.train_epochs)
        seed = int(job.options.get("seed") if job.options.get("seed") is not None
                   else rt.settings.train_seed)
        options = dict(job.options or {})
    try:
        model_id = _train(rt, job_id, rows, name=name, epochs=epochs, seed=seed,
                          options=options)
    except TrainingError as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, str(exc))
        return None
    return model_id


def model_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A train job's fusion and training options (as web/api.py ``_job_options`` validated
    them): FusionConfig keywords and TrainConfig keywords. Unknown keys are ignored; a bad
    ``stacking_folds`` (fit would reject it only after the split) raises TrainingError."""
    fusion: dict[str, Any] = {}
    training: dict[str, Any] = {}
    if options.get("strategy"):
        fusion["strategy"] = str(options["strategy"])
    if options.get("loss"):
        training["loss"] = str(options["loss"])
    if options.get("gamma") is not None:
        training["gamma"] = float(options["gamma"])
    if options.get("balanced") is not None:
        training["balanced"] = bool(options["balanced"])
    if options.get("modality_dropout") is not None:
        training["modality_dropout"] = float(options["modality_dropout"])
    if options.get("patience") is not None:
        training["patience"] = int(options["patience"])
    if options.get("stacking_folds") is not None:
        folds = options["stacking_folds"]
        if isinstance(folds, bool) or not isinstance(folds, int) or not (
                folds == 0 or 2 <= folds <= 10):
            raise TrainingError(f"bad training options: stacking_folds must be 0 or 2..10, "
                                f"got {folds!r}")
        if folds and fusion.get("strategy") != "late":
            raise TrainingError("bad training options: stacking_folds applies to "
                                "strategy=late only")
        if folds and any(options.get(f, "frozen") not in (None, "frozen") for f in
                         ("mode", "image_mode", "text_mode", "audio_mode")):
            # fit_adapted trains encoders and heads together: there is nothing to stack.
            raise TrainingError("bad training options: stacking_folds applies to frozen "
                                "encoders only (mode=frozen)")
        training["stacking_folds"] = folds
    return fusion, training


def _train(rt: Runtime, job_id: str, rows: list[Any], *, name: str, epochs: int,
           seed: int, options: dict[str, Any] | None = None) -> int:
    import torch

    from models.checkpoint import save_checkpoint
    from models.evaluation import confusion_png, evaluation_report
    from models.fusion import FusionConfig
    from models.training import FeatureSet, TrainConfig, fit

    if not rows:
        raise TrainingError("no labelled item could be decoded; nothing to train on")
    encoders = {m: rt.encoder(m).spec for m in MODALITIES}
    present = [m for m in MODALITIES if any(m in r.media for r in rows)]
    with rt.db.session() as s:
        vectors = {m: feature_cache.get_features(s, encoders[m].version,
                                                 [r.media[m]["blob"] for r in rows
                                                  if m in r.media])
                   for m in present}
    feats = [{m: vectors[m][r.media[m]["blob"]] for m in present if m in r.media} for r in rows]
    classes = sorted({r.label for r in rows})
    if len(classes) < 2:
        raise TrainingError(f"need at least two classes with decodable items; found {classes}")
    index = {c: i for i, c in enumerate(classes)}
    labels = [r.label for r in rows]

    train_idx, val_idx, split_source = choose_split(rows, labels, seed)
    if not train_idx:
        raise TrainingError("the train split is empty")

    input_dims = {m: encoders[m].dim for m in present}

    def subset(idx: list[int]) -> FeatureSet | None:
        if not idx:
            return None
        tensors, mask = stack_features(input_dims, [feats[i] for i in idx])
        return FeatureSet(tensors, mask, torch.tensor([index[labels[i]] for i in idx]))

    train_set, val_set = subset(train_idx), subset(val_idx)
    fusion_kw, train_kw = model_options(options or {})
    try:
        cfg = FusionConfig(input_dims=input_dims, num_classes=len(classes), **fusion_kw)
        tcfg = TrainConfig(epochs=epochs, seed=seed, **train_kw)
    except ValueError as exc:
        raise TrainingError(f"bad training options: {exc}") from exc
    try:
        modes = encoder_modes(options or {}, present)
    except ValueError as exc:
        raise TrainingError(f"bad training options: {exc}") from exc
    budget = float((options or {}).get("budget") or DEFAULT_BUDGET_SECONDS)
    if "auto" in modes.values() and val_set is None:
        raise TrainingError("mode auto chooses on the validation split, and it is empty")
    log.info("training job=%s items=%d train=%d val=%d classes=%d strategy=%s loss=%s "
             "balanced=%s modes=%s", job_id, len(rows), len(train_idx), len(val_idx),
             len(classes), cfg.strategy, tcfg.loss, tcfg.balanced,
             ",".join(f"{m}:{mode}" for m, mode in modes.items()))
    assert train_set is not None
    own_sections: dict[str, Any] = {}
    registry = {m: {"name": encoders[m].name, "version": encoders[m].version,
                    "dim": encoders[m].dim} for m in present}
    adaptation = None
    if all(mode == "frozen" for mode in modes.values()):
        try:
            model, fit_metrics = fit(train_set, val_set, cfg, tcfg)
        except ValueError as exc:  # e.g. fewer training items than stacking folds
            raise TrainingError(f"training failed: {exc}") from exc
    else:
        out = train_adapted(rt, job_id, rows, modes, input_dims, train_idx, val_idx, train_set,
                            val_set, len(classes), fusion_kw, tcfg, budget)
        model, fit_metrics = out["fusion"], out["metrics"]
        train_set, val_set = out["train"], out["val"]
        own_sections, own = save_encoders(rt, out["encoders"], out["configs"])
        registry.update(own)
        adaptation = out["report"]
    metrics: dict[str, Any] = dict(fit_metrics)
    metrics["encoder_modes"] = {m: registry[m].get("mode", "frozen") for m in present}
    if adaptation is not None:
        metrics["adaptation"] = {"budget_seconds": budget, "modalities": adaptation}
    metrics["split"] = split_source
    metrics["groups"] = split_groups(rows, train_idx, val_idx)
    temperature = 1.0
    if val_set is not None:
        report = evaluation_report(model, val_set, classes)
        metrics["validation"] = report
        # Scalars at the top level too: the model list shows only those.
        calibration = report["calibration"]
        temperature = calibration["temperature"]
        metrics.update(temperature=temperature, val_ece_before=calibration["ece_before"],
                       val_ece_after=calibration["ece_after"])
        png = confusion_png(report["confusion"], classes,
                            title=f"{name}: validation ({len(val_set)} items)")
        metrics["confusion_png"] = rt.blobs.put_bytes(png)
    shift = store_training_summary(rt, _present(train_set), _present(val_set))
    metrics["shift"] = shift
    data, config = save_checkpoint(model.cpu())
    config["temperature"] = temperature  # worker/pipeline.py classify applies it
    config["shift"] = shift  # worker/shift.py compares classify jobs with it
    # "scratch" and "finetune" sections: worker/adaptation.py loads them for inference
    config.update(own_sections)
    blob = rt.blobs.put_bytes(data)
    with rt.db.session() as s:
        mv = register_model(
            s, name=name, fusion=cfg.strategy, classes=classes,
            encoders=registry,
            metrics=_jsonable(metrics), config=config, checkpoint_blob=blob, job_id=job_id,
            tenant_id=jobs.get_job(s, job_id).tenant_id)
        jobs.get_job(s, job_id).model_version_id = mv.id
        s.flush()
        jobs.finish_job(s, job_id)
        model_id = mv.id
    log.info("model_registered job=%s model=%s val_accuracy=%s", job_id, model_id,
             metrics.get("val_accuracy"))
    return model_id


def _present(data: Any) -> dict[str, np.ndarray]:
    """Each modality's features (N_m, D_m) over the items of ``data`` (a FeatureSet or None)
    that have it."""
    if data is None:
        return {}
    return {m: x[data.mask[:, i]].numpy() for i, (m, x) in enumerate(data.features.items())}


def choose_split(rows: list[Any], labels: list[str], seed: int
                 ) -> tuple[list[int], list[int], str]:
    """(train, val, how): labels.csv's split where it gives one; else, where items have a
    group, a group-disjoint stratified split; else a stratified one. 20 % to validation."""
    from models.training import group_split, stratified_split

    if any(r.split for r in rows):
        train_idx = [i for i, r in enumerate(rows) if r.split != "val"]
        val_idx = [i for i, r in enumerate(rows) if r.split == "val"]
        return train_idx, val_idx, "labels.csv"
    if any(r.group for r in rows):
        train_idx, val_idx = group_split(labels, [r.group for r in rows], 0.2, seed)
        return train_idx, val_idx, f"group-disjoint stratified, seed {seed}"
    train_idx, val_idx = stratified_split(labels, 0.2, seed)
    return train_idx, val_idx, f"stratified, seed {seed}"


def split_groups(rows: list[Any], train_idx: list[int], val_idx: list[int]) -> dict[str, Any]:
    """How many groups each side has, and how many are on both (0 for a group-disjoint
    split; labels.csv's own split may share some, which flatters validation)."""
    train = {rows[i].group for i in train_idx if rows[i].group}
    val = {rows[i].group for i in val_idx if rows[i].group}
    return {"train": len(train), "val": len(val), "shared": len(train & val)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
