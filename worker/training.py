"""A train job's training stage: read its items and cached features, decode what encoder modes
other than frozen need, train (``models.adapt.train_classifier``: the ML policy), evaluate, store
the checkpoint and the trained encoders as blobs, and register the model version.

While it trains, a pulse every PULSE_SECONDS (from the training loop's epochs, and from the
decoding before them) writes the training's progress on the job (which also tells the sweeper it
is alive), stops the training when the job was cancelled (nothing is registered: the worker is
free at once), and gives the task back to the broker when the worker is asked to stop (a
restart goes on with it at once, instead of after the sweeper's wait).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from celery.worker import state as worker_state

from mmbatch.contract import (
    DEFAULT_STRATEGY,
    MODALITIES,
    OptionError,
    TrainOptions,
    column_modality,
    default_budget,
)
from mmbatch.scoring import score_labels
from models.adapt import (
    TrainedClassifier,
    TrainingData,
    TrainingPlan,
    raw_inputs_needed,
    train_classifier,
)
from models.checkpoint import save_checkpoint
from models.evaluation import confusion_png, evaluation_report
from models.families import BY_COLUMN, dense, families_of
from models.finetune import finetune_version, save_top
from models.fusion import FusionConfig
from models.label_issues import design_matrix, label_issues, out_of_fold_probabilities
from models.registry import SPECS
from models.scratch import encoder_version, save_encoder
from models.training import (
    FeatureSet,
    Progress,
    TrainConfig,
    choose_split,
    predict,
    split_groups,
    stack_features,
)
from store import features as feature_cache
from store import jobs
from store.jobs import ItemRow
from store.labels import store_label_issues
from store.registry import ModelRow, default_model, promote, register_model
from worker.batch import classify
from worker.model_cache import models_of
from worker.runtime import Runtime
from worker.shift import store_training_summary
from worker.training_inputs import decode_inputs

log = logging.getLogger(__name__)

# How often a training looks at its job: cancel reaches it within this (plus one epoch), and
# the job's progress is this fresh; well under MMBATCH_STALE_AFTER_SECONDS (600 by default).
PULSE_SECONDS = 2.0


class TrainingError(Exception):
    """The labelled data cannot train a model; the job fails with this message."""


class TrainingStopped(Exception):
    """The job left its training stage (cancelled): nothing is registered."""


class TrainingInterrupted(Exception):
    """The worker is stopping: the task goes back to the broker for the next worker."""


def train_job(rt: Runtime, job_id: str) -> int | None:
    """Fit, evaluate and register a model for a train job in its training stage; the model
    version's id, or None when the job was not there to train (or failed with a reason)."""
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running" or job.stage != "training":
            return None
        rows = jobs.labelled_items(s, job_id)
        stored = dict(job.options or {})
    try:
        return _train(rt, job_id, rows, stored)
    except TrainingError as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, str(exc))
        return None
    except TrainingStopped as exc:
        log.info("training_cancelled job=%s state=%s", job_id, exc)
        return None


def _train(rt: Runtime, job_id: str, rows: list[ItemRow], stored: dict[str, Any]) -> int:
    try:
        options = TrainOptions.from_dict(stored)
    except OptionError as exc:
        raise TrainingError(f"bad training options: {exc}") from exc
    if not rows:
        raise TrainingError("no labelled item could be decoded; nothing to train on")
    present = [m for m in MODALITIES if any(m in r.media for r in rows)]
    labels = [str(r.label) for r in rows]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise TrainingError(f"need at least two classes with decodable items; found {classes}")
    seed = options.seed if options.seed is not None else rt.settings.train_seed
    train_idx, val_idx, split_source = choose_split(labels, [r.split for r in rows],
                                                    [r.group for r in rows], seed)
    if not train_idx:
        raise TrainingError("the train split is empty")
    modes = options.encoder_modes(present)
    budget = options.budget or default_budget(len(rows))
    if "auto" in modes.values() and not val_idx:
        raise TrainingError("mode auto chooses on the validation split, and it is empty")
    strategy = options.strategy or DEFAULT_STRATEGY
    columns = {m: SPECS[m].dim for m in present}
    if strategy == "stack":  # the feature families of every present modality beside it
        columns.update({f.column: f.dim for m in present for f in families_of(m)})
    try:
        plan = TrainingPlan(
            FusionConfig(input_dims=columns, num_classes=len(classes), strategy=strategy,
                         count_columns=tuple(c for c in columns
                                             if c in BY_COLUMN and BY_COLUMN[c].sparse)),
            TrainConfig(epochs=options.epochs or rt.settings.train_epochs, seed=seed,
                        **_training_options(options)),
            modes, budget)
    except ValueError as exc:
        raise TrainingError(f"bad training options: {exc}") from exc
    pulse = Pulse(rt, job_id, plan.training.epochs)
    data = _training_data(rt, rows, [classes.index(label) for label in labels], plan,
                          train_idx, val_idx, pulse)
    data.groups = fold_groups(rows)
    log.info("training job=%s items=%d train=%d val=%d classes=%d strategy=%s loss=%s "
             "balanced=%s modes=%s", job_id, len(rows), len(train_idx), len(val_idx),
             len(classes), plan.fusion.strategy, plan.training.loss, plan.training.balanced,
             ",".join(f"{m}:{mode}" for m, mode in modes.items()))
    try:
        trained = train_classifier(data, plan, on_epoch=pulse)
    except ValueError as exc:  # e.g. fewer training items than stacking folds
        raise TrainingError(f"training failed: {exc}") from exc
    metrics: dict[str, Any] = dict(trained.metrics)
    metrics["encoder_modes"] = trained.modes
    if trained.adaptation is not None:
        metrics["adaptation"] = {"budget_seconds": budget, "modalities": trained.adaptation}
    metrics["split"] = split_source
    metrics["groups"] = split_groups([r.group for r in rows], train_idx, val_idx)
    try:
        issues = _label_issues(data, trained, rows, labels, classes, seed)
        metrics["label_issues"] = {"found": len(issues), "items": len(rows),
                                   "method": "confident learning (cleanlab) on " + (
                                       "the stack's out-of-fold predictions (validation items: "
                                       "the model's)" if trained.oof is not None else
                                       "out-of-fold logistic regression over the cached "
                                       "features")}
    except ValueError as exc:  # too few items per class for even two folds
        issues = []
        metrics["label_issues"] = {"found": None, "items": len(rows), "error": str(exc)}
    name = options.name or "fusion"
    config: dict[str, Any] = {}
    if trained.val is not None:
        report = evaluation_report(trained.fusion, trained.val, classes)
        metrics["validation"] = report
        # Scalars at the top level too: the model list shows only those.
        calibration = report["calibration"]
        metrics.update(temperature=calibration["temperature"],
                       val_ece_before=calibration["ece_before"],
                       val_ece_after=calibration["ece_after"])
        png = confusion_png(report["confusion"], classes,
                            title=f"{name}: validation ({len(trained.val)} items)")
        metrics["confusion_png"] = rt.blobs.put_bytes(png)
    # the encoders' features only: a family's columns can be wide (16,384 hashed n-grams)
    # and are summarised by the encoder of their modality; a stack that dropped an encoder's
    # column still watches its features
    metrics["shift"] = store_training_summary(rt, _encoder_features(trained.train, data.train),
                                              _encoder_features(trained.val, data.val))
    data_bytes, config = save_checkpoint(trained.fusion.cpu())
    gate = (_promotion_gate(rt, job_id, trained, data, classes, rows)
            if stored.get("holdout") == "verified" else None)
    if gate is not None:
        metrics["promotion"] = gate
    config["temperature"] = metrics.get("temperature", 1.0)  # worker.batch applies it
    config["shift"] = metrics["shift"]  # worker.shift compares classify jobs with it
    own_sections, registry = _save_encoders(rt, trained, present)
    config.update(own_sections)  # worker.model_cache loads them for inference
    blob = rt.blobs.put_bytes(data_bytes)
    with rt.db.session() as s:
        job = jobs.lock_job(s, job_id)  # a cancel that came meanwhile wins: nothing registered
        if job.state != "running" or job.stage != "training":
            raise TrainingStopped(job.state)
        mv = register_model(s, name=name, fusion=plan.fusion.strategy, classes=classes,
                            encoders=registry, metrics=jsonable(metrics), config=config,
                            checkpoint_blob=blob, job_id=job_id, tenant_id=job.tenant_id)
        job.model_version_id = mv.id
        s.flush()
        store_label_issues(s, mv.id, issues)
        if gate is not None and gate["gate"] == "passed":
            promote(s, mv.id, job.tenant_id)
        jobs.finish_job(s, job_id)
        model_id = mv.id
    log.info("model_registered job=%s model=%s val_accuracy=%s", job_id, model_id,
             metrics.get("val_accuracy"))
    return model_id


def _promotion_gate(rt: Runtime, job_id: str, trained: TrainedClassifier, data: TrainingData,
                    classes: list[str], rows: list[ItemRow]) -> dict[str, Any] | None:
    """Whether a version trained on a verified holdout should become the default by itself: it
    does when its macro F1 on the holdout is no worse than the current default's on the same
    items (over the union of both models' classes and the holdout's labels)."""
    with rt.db.session() as s:
        tenant = jobs.get_job(s, job_id).tenant_id
        current = default_model(s, tenant)
        current_row = ModelRow.of(current) if current is not None else None
    if current_row is None or trained.val is None or data.val is None:
        return None  # the first model is the default anyway; without a holdout, no gate
    adapted = sorted(m for m, e in current_row.encoders.items()
                     if e.get("mode", "frozen") not in ("frozen", "family"))
    if adapted:
        return {"gate": "skipped", "against": current_row.id,
                "why": f"the default model's {', '.join(adapted)} encoders are adapted: its "
                       "predictions on the holdout need them"}
    truth = [classes[int(t)] for t in data.val.labels]
    probs, _ = predict(trained.fusion, trained.val.features, trained.val.mask)
    mine = [classes[int(i)] for i in probs.argmax(dim=1)]
    # the default's own inputs for the holdout items, read from the cache: it may take
    # feature families this job did not compute, or not take some that it did
    feats = cached_inputs(rt, [rows[i] for i in data.val_idx],
                          {c: e["version"] for c, e in current_row.encoders.items()})
    theirs_probs, _, _ = classify(models_of(rt), current_row, feats)
    theirs = [current_row.classes[int(i)] for i in theirs_probs.argmax(axis=1)]
    union = sorted({*classes, *current_row.classes, *truth})
    new_f1 = score_labels([(t, p, None) for t, p in zip(truth, mine, strict=True)],
                          union)["macro_f1"]
    old_f1 = score_labels([(t, p, None) for t, p in zip(truth, theirs, strict=True)],
                          union)["macro_f1"]
    passed = new_f1 >= old_f1
    log.info("promotion_gate job=%s holdout=%d macro_f1=%.4f default=%s default_macro_f1=%.4f "
             "passed=%s", job_id, len(truth), new_f1, current_row.id, old_f1, passed)
    return {"gate": "passed" if passed else "failed", "against": current_row.id,
            "holdout_items": len(truth), "macro_f1": round(new_f1, 4),
            "default_macro_f1": round(old_f1, 4),
            "why": ("no worse than the default on the verified holdout: now the default"
                    if passed else "worse than the default on the verified holdout: a "
                                   "candidate; promote it by hand to use it anyway")}


def _label_issues(data: TrainingData, trained: TrainedClassifier, rows: list[ItemRow],
                  labels: list[str], classes: list[str], seed: int
                  ) -> list[tuple[int, str, str, float]]:
    """The rows whose given label looks wrong (``models.label_issues``), worst first: (item id,
    given label, suggested label, quality). A stacked model brings its training items'
    out-of-fold probabilities (computed once, by the stacking), and the validation items are
    out of sample for it anyway; otherwise a logistic regression is cross-fitted here."""
    order = data.train_idx + (data.val_idx if data.val is not None else [])
    targets = [classes.index(labels[i]) for i in order]
    if trained.oof is not None:
        parts = [trained.oof]
        if trained.val is not None:
            val_probs, _ = predict(trained.fusion, trained.val.features, trained.val.mask)
            parts.append(val_probs.numpy())
        probs = np.concatenate(parts)
    else:
        sets = [data.train] + ([data.val] if data.val is not None else [])
        primary = [m for m in data.train.features if m in MODALITIES]
        features = {m: np.concatenate([fs.features[m].numpy() for fs in sets])
                    for m in primary}
        present = np.concatenate([fs.mask.numpy()[:, [list(fs.features).index(m)
                                                       for m in primary]] for fs in sets])
        probs = out_of_fold_probabilities(design_matrix(features, present), targets,
                                          len(classes), [rows[i].group for i in order], seed)
    return [(rows[order[x.row]].id, labels[order[x.row]], classes[x.suggested], x.quality)
            for x in label_issues(targets, probs)]


def _training_options(options: TrainOptions) -> dict[str, Any]:
    """The TrainConfig keywords a train job's options set."""
    names = ("loss", "gamma", "balanced", "modality_dropout", "patience", "stacking_folds")
    return {n: getattr(options, n) for n in names if getattr(options, n) is not None}


def _training_data(rt: Runtime, rows: list[ItemRow], targets: list[int], plan: TrainingPlan,
                   train_idx: list[int], val_idx: list[int], pulse: Pulse) -> TrainingData:
    """The items' cached frozen features, split, and the raw inputs their modes need."""
    dims = plan.fusion.input_dims
    # a clip without a sound track has no audio features: the item trains without audio
    feats = cached_inputs(rt, rows, {c: column_version(c) for c in dims})

    def subset(idx: list[int]) -> FeatureSet | None:
        if not idx:
            return None
        tensors, mask = stack_features(dims, [feats[i] for i in idx])
        return FeatureSet(tensors, mask, torch.tensor([targets[i] for i in idx]))

    train = subset(train_idx)
    assert train is not None
    scratch, finetune = raw_inputs_needed(plan.modes)
    raw = decode_inputs(rt, models_of(rt), rows, scratch, finetune,
                        on_progress=pulse.decoded) if scratch or finetune else None
    if raw is None:
        return TrainingData(train, subset(val_idx), train_idx, val_idx)
    return TrainingData(train, subset(val_idx), train_idx, val_idx, raw.scratch,
                        raw.scratch_present, raw.finetune, raw.finetune_present)


def _save_encoders(rt: Runtime, trained: TrainedClassifier, present: list[str]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Store each trained encoder's weights (scratch encoders, finetuned tops). Returns the
    checkpoint config sections ({"scratch": ..., "finetune": ...}, empty ones left out) and the
    registry's record of every modality's encoder."""
    sections: dict[str, dict[str, Any]] = {"scratch": {}, "finetune": {}}
    registry = {m: {"name": SPECS[m].name, "version": SPECS[m].version, "dim": SPECS[m].dim}
                for m in present}
    registry.update({c: {"name": BY_COLUMN[c].name, "version": BY_COLUMN[c].version,
                         "dim": BY_COLUMN[c].dim, "mode": "family"}
                     for c in trained.fusion.modalities if c in BY_COLUMN})
    for m, (module, cfg) in trained.scratch.items():
        blob = rt.blobs.put_bytes(save_encoder(module))
        sections["scratch"][m] = {"config": cfg.to_dict(), "weights_blob": blob}
        registry[m] = {"name": cfg.arch, "version": encoder_version(cfg, blob), "dim": cfg.dim,
                       "mode": "scratch"}
    for m, top in trained.finetuned.items():
        blob = rt.blobs.put_bytes(save_top(top))
        base = SPECS[m]
        sections["finetune"][m] = {"weights_blob": blob, "base_version": base.version}
        registry[m] = {"name": base.name, "version": finetune_version(base.version, blob),
                       "dim": base.dim, "mode": "finetune", "base_version": base.version}
    return {k: v for k, v in sections.items() if v}, registry


def column_version(column: str) -> str:
    """The feature cache key of a fusion input column: its encoder's or its family's."""
    return BY_COLUMN[column].version if column in BY_COLUMN else SPECS[column].version


def column_input(column: str, cached: np.ndarray) -> np.ndarray:
    """A cached vector as the column's input (a sparse family's counts expanded)."""
    return dense(BY_COLUMN[column], cached) if column in BY_COLUMN else cached


def cached_inputs(rt: Runtime, rows: list[ItemRow], versions: dict[str, str]
                  ) -> list[dict[str, np.ndarray]]:
    """Each row's cached inputs of the columns ``versions`` names (column -> feature cache
    key, as a model version's ``encoders`` record them), a sparse family's expanded; a column
    the row lacks, or whose features were never cached, is left out."""
    with rt.db.session() as s:
        vectors = {c: feature_cache.get_features(
                       s, version, [r.media[column_modality(c)].blob for r in rows
                                    if column_modality(c) in r.media])
                   for c, version in versions.items()}
    return [{c: column_input(c, vectors[c][r.media[m].blob]) for c in versions
             for m in [column_modality(c)]
             if m in r.media and r.media[m].blob in vectors[c]} for r in rows]


def fold_groups(rows: list[ItemRow]) -> list[str | None]:
    """What keeps items together when training folds are cut: ``labels.csv``'s group where it
    gives one; else items that share a file (the same picture under two keys, say) are one
    group, so that neither vouches for the other from across a fold. Near-duplicates that are
    not byte-identical are not joined (say so in docs/models.md)."""
    if any(r.group is not None for r in rows):
        return [r.group for r in rows]
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        for f in r.media.values():
            j = first.setdefault(f.blob, i)
            parent[root(i)] = root(j)
    return [f"\0dup{root(i)}" for i in range(len(rows))]


class Pulse:
    """The training's callback (every epoch, and every few rows decoded before): at most every
    PULSE_SECONDS it writes the progress on the job, raises TrainingStopped when the job was
    cancelled, and TrainingInterrupted as soon as the worker is asked to stop."""

    def __init__(self, rt: Runtime, job_id: str, epochs: int) -> None:
        self.rt, self.job_id, self.epochs = rt, job_id, epochs
        self.last = time.monotonic()
        self.progress: dict[str, Any] = {"phase": "decoding", "epoch": 0, "epochs": epochs,
                                         "val_macro_f1": None}
        self.first: tuple[float, int] | None = None  # when an epoch was first heard of, which

    def __call__(self, progress: Progress) -> None:
        """After an epoch."""
        self.progress.update(phase="training", epoch=progress.epoch, stops_by=progress.stops_by,
                             val_macro_f1=progress.val_macro_f1)
        if self.first is None or progress.epoch < self.first[1]:  # a new loop (auto's trials)
            self.first = (time.monotonic(), progress.epoch)
        self.beat()

    def epoch(self, epoch: int) -> None:
        """After an epoch of an alignment (models.align reports only the epoch's number)."""
        self.progress.update(phase="training", epoch=epoch)
        if self.first is None or epoch < self.first[1]:  # a new loop (the next candidate)
            self.first = (time.monotonic(), epoch)
        self.beat()

    def decoded(self, rows: int) -> None:
        """After ``rows`` items were decoded again for the encoder modes."""
        self.progress.update(phase="decoding", rows=rows)
        self.beat()

    def beat(self) -> None:
        if any(flag is not None and flag is not False  # SIGTERM sets an exit code, 0 included
               for flag in (worker_state.should_stop, worker_state.should_terminate)):
            raise TrainingInterrupted("the worker is stopping")
        now = time.monotonic()
        if now - self.last < PULSE_SECONDS:
            return
        self.last = now
        shown = dict(self.progress)
        if self.first is not None and self.progress["epoch"] > self.first[1]:
            shown["seconds_per_epoch"] = round(
                (now - self.first[0]) / (self.progress["epoch"] - self.first[1]), 4)
        with self.rt.db.session() as s:
            if not jobs.note_training(s, self.job_id, shown):
                raise TrainingStopped(jobs.get_job(s, self.job_id).state)


def _present(data: FeatureSet | None) -> dict[str, np.ndarray]:
    """Each modality's features (N_m, D_m) over the items of ``data`` that have it."""
    if data is None:
        return {}
    return {m: x[data.mask[:, i]].numpy() for i, (m, x) in enumerate(data.features.items())}


def _encoder_features(trained: FeatureSet | None, given: FeatureSet | None
                      ) -> dict[str, np.ndarray]:
    """The encoders' features of the model's items (its own encoders' where it trained some),
    without the feature families."""
    out = {m: x for m, x in _present(given).items() if m in MODALITIES}
    out.update({m: x for m, x in _present(trained).items() if m in MODALITIES})
    return out


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
