"""A classify job that learns from its own archive (``adapt=true``): once its batches have
extracted every item's features, its model is adapted to them (``models.transduct``: features
re-standardised where they moved, co-training across modalities), the adapted model is
registered as a new version derived from the original (a candidate: never made the default by
itself), and the job's results come from it.

Runs in the training stage, on the train queue, like a train job's training: the same task,
heartbeat, cancel and restart (``train_step`` picks which by the job's kind).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from models.checkpoint import save_checkpoint
from models.training import FeatureSet, choose_split, stack_features
from models.transduct import adapt_stack
from store import jobs
from store.registry import ModelRow, get_model, register_model
from worker.batch import Batch, BatchProcessor
from worker.model_cache import models_of
from worker.runtime import Runtime
from worker.shift import record_job_shift
from worker.training import (
    Pulse,
    TrainingError,
    TrainingStopped,
    cached_inputs,
    jsonable,
    train_job,
)

log = logging.getLogger(__name__)

CHUNK = 256  # items classified and written per transaction


def train_step(rt: Runtime, job_id: str) -> int | None:
    """A job's training stage: a train job's training, or a classify job's adaptation."""
    with rt.db.session() as s:
        kind = jobs.get_job(s, job_id).kind
    return adapt_job(rt, job_id) if kind == "classify" else train_job(rt, job_id)


def adapt_job(rt: Runtime, job_id: str) -> int | None:
    """Adapt the job's model to its items, register the derived version, write every item's
    result from it and finish the job; the derived version's id, or None when the job was not
    there to adapt (or failed with a reason)."""
    try:
        return _adapt(rt, job_id)
    except TrainingError as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, str(exc))
        return None
    except TrainingStopped as exc:
        log.info("adaptation_cancelled job=%s state=%s", job_id, exc)
        return None


def _adapt(rt: Runtime, job_id: str) -> int | None:
    pulse = Pulse(rt, job_id, 0)
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running" or job.stage != "training" or job.model_version_id is None:
            return None
        version = get_model(s, job.model_version_id)
        model, metrics = ModelRow.of(version), dict(version.metrics or {})
        source_job, tenant = version.job_id, job.tenant_id
        targets, failed = [], []
        after = 0
        while page := jobs.results_page(s, job, after=after, limit=1000):
            for item, r in page:  # the extraction's results (the job is still in its stage)
                (targets if r is not None and r.status == "ok" else failed).append(
                    (jobs.ItemRow.of(item), r.error if r is not None else "not processed"))
            after = page[-1][0].id
        trained_on = jobs.labelled_items(s, source_job) if source_job else []
    if model.kind != "classifier" or model.config.get("fusion", {}).get("strategy") != "stack":
        raise TrainingError(f"adapt=true applies to stacked models (strategy=stack); model "
                            f"{model.id} is not one: retrain it with the default strategy")
    if not trained_on:
        raise TrainingError(f"model {model.id}'s training items are no longer there: adapt "
                            "needs them beside the job's own")
    net = models_of(rt).classifier(model).cpu()
    columns = net.cfg.input_dims
    versions = {c: model.encoders[c]["version"] for c in columns}
    classes = list(model.classes)
    rows = [r for r in trained_on if r.label in classes]
    labels = [str(r.label) for r in rows]
    train_idx, val_idx, _ = choose_split(labels, [r.split for r in rows],
                                         [r.group for r in rows], int(metrics.get("seed", 0)))
    train_feats = cached_inputs(rt, rows, versions)
    target_rows = [r for r, _ in targets]
    target_feats = cached_inputs(rt, target_rows, versions)
    pulse.beat()

    def feature_set(feats: list[dict[str, Any]], targets_: list[int]) -> FeatureSet:
        tensors, mask = stack_features(columns, feats)
        return FeatureSet(tensors, mask, torch.tensor(targets_, dtype=torch.long))

    y = [classes.index(label) for label in labels]
    train = feature_set([train_feats[i] for i in train_idx], [y[i] for i in train_idx])
    val = (feature_set([train_feats[i] for i in val_idx], [y[i] for i in val_idx])
           if val_idx else None)
    target = feature_set(target_feats, [0] * len(target_feats))
    strengths = {c: float(v["C"]) for c, v in
                 ((metrics.get("stacking") or {}).get("candidates") or {}).items()}
    adapted = adapt_stack(net, train, val, target, seed=int(metrics.get("seed", 0)),
                          strengths=strengths)
    pulse.beat()
    data_bytes, config = save_checkpoint(adapted.model)
    config = {**model.config, **config}  # temperature, shift, own encoders: the original's
    derived_metrics = {"derived_from": model.id, "adapted_on_job": job_id,
                       "strategy": "stack", "transductive": adapted.report,
                       "seed": metrics.get("seed"), "temperature": config.get("temperature")}
    blob = rt.blobs.put_bytes(data_bytes)
    with rt.db.session() as s:
        job = jobs.lock_job(s, job_id)
        if job.state != "running" or job.stage != "training":
            raise TrainingStopped(job.state)
        mv = register_model(s, name=model.name, fusion="stack", classes=classes,
                            encoders=model.encoders, metrics=jsonable(derived_metrics),
                            config=config, checkpoint_blob=blob, job_id=job_id,
                            tenant_id=tenant)
        derived = ModelRow.of(mv)
    processor = BatchProcessor(rt, job_id, [])
    for start in range(0, len(target_rows), CHUNK):
        chunk = target_rows[start:start + CHUNK]
        feats = {r.id: f for r, f in zip(chunk, target_feats[start:start + CHUNK], strict=True)}
        outcomes = processor.outcomes(Batch("classify", chunk, derived), feats, {})
        with rt.db.session() as s:
            jobs.record_outcomes(s, job_id, derived.id, outcomes, count=False)
        pulse.beat()
    with rt.db.session() as s:
        jobs.record_outcomes(s, job_id, derived.id,
                             [jobs.ItemOutcome(r.id, error=error) for r, error in failed],
                             count=False)
        job = jobs.lock_job(s, job_id)  # a cancel that came meanwhile wins
        if job.state != "running" or job.stage != "training":
            raise TrainingStopped(job.state)
        job.model_version_id = derived.id
        s.flush()
        jobs.finish_job(s, job_id)
    log.info("model_adapted job=%s model=%s derived=%s items=%d", job_id, model.id, derived.id,
             len(target_rows))
    try:
        record_job_shift(rt, job_id, derived)
    except Exception:
        log.exception("shift_report_failed job=%s model=%s", job_id, derived.id)
    return derived.id
