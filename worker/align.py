"""An align job's training stage, and an aligner's evaluation on a paired archive.

Training: read the job's extracted items and their cached frozen features, split (labels.csv's
split, else group-disjoint where it gives groups, else a seeded random 20 %), try the alignment
methods and keep the winner on validation recall (``models.align.train_aligner``), store the
checkpoint, register an aligner model version (the tenant's first becomes its default aligner)
with recall per direction and modality pair in its metrics. The task then builds its index.

Evaluation (``mmbatch evaluate ALIGNER ARCHIVE``): an align job that names the aligner and is
marked ``evaluate`` extracts the archive's features, then scores recall@1/5/10 and median rank
per direction here instead of training; the scores go to the job's report and the model's
``metrics.evaluations``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mmbatch.contract import MODALITIES, OptionError, TrainOptions
from models.align import (
    PairedFeatures,
    TrainSettings,
    recall_report,
    save_aligner,
    train_aligner,
)
from models.registry import SPECS
from models.training import choose_split, split_groups
from store import features as feature_cache
from store import jobs
from store.jobs import ItemRow
from store.registry import ModelRow, get_model, register_model
from worker.model_cache import models_of
from worker.runtime import Runtime
from worker.training import Pulse, TrainingError, TrainingStopped, jsonable

log = logging.getLogger(__name__)

EVALUATIONS_KEPT = 20  # evaluations a model's metrics keep, newest last


def align_job(rt: Runtime, job_id: str) -> int | None:
    """Train (or, for an evaluation, score) an aligner for an align job in its training stage;
    the id of the aligner it registered, or None."""
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running" or job.stage != "training":
            return None
        rows = jobs.extracted_items(s, job_id)
        stored = dict(job.options or {})
        model = ModelRow.of(get_model(s, job.model_version_id)) \
            if job.model_version_id is not None else None
    try:
        if stored.get("evaluate") and model is not None:
            evaluate_aligner(rt, job_id, rows, model)
            return None
        return _align(rt, job_id, rows, stored)
    except TrainingError as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, str(exc))
        return None
    except TrainingStopped as exc:  # cancelled while aligning
        log.info("alignment_cancelled job=%s state=%s", job_id, exc)
        return None


def paired_features(rt: Runtime, rows: list[ItemRow], modalities: list[str]) -> PairedFeatures:
    """The items' cached frozen features of ``modalities`` (zeros and a False mask where an
    item lacks one)."""
    with rt.db.session() as s:
        vectors = {m: feature_cache.get_features(s, SPECS[m].version,
                                                 [r.media[m].blob for r in rows if m in r.media])
                   for m in modalities}
    feats = {}
    mask = torch.zeros(len(rows), len(modalities), dtype=torch.bool)
    for j, m in enumerate(modalities):
        x = torch.zeros(len(rows), SPECS[m].dim)
        for i, r in enumerate(rows):
            vec = vectors[m].get(r.media[m].blob) if m in r.media else None
            if vec is not None:
                x[i] = torch.from_numpy(np.asarray(vec, dtype=np.float32))
                mask[i, j] = True
        feats[m] = x
    return PairedFeatures(feats, mask)


def _align(rt: Runtime, job_id: str, rows: list[ItemRow], stored: dict[str, Any]) -> int:
    try:
        options = TrainOptions.from_dict(stored)
    except OptionError as exc:
        raise TrainingError(f"bad options: {exc}") from exc
    present = [m for m in MODALITIES if any(m in r.media for r in rows)]
    rows = [r for r in rows if sum(m in r.media for m in present) >= 2]
    if len(rows) < 4:
        raise TrainingError("an align job needs items with two or more modalities (an image "
                            f"and its caption, …); found {len(rows)} that could be decoded")
    present = [m for m in present if any(m in r.media for r in rows)]
    data = paired_features(rt, rows, present)
    seed = options.seed if options.seed is not None else rt.settings.train_seed
    train_idx, val_idx, split_source = choose_split(
        [r.label or "" for r in rows], [r.split for r in rows], [r.group for r in rows], seed)
    settings = TrainSettings(epochs=options.epochs or 200, seed=seed)
    log.info("aligning job=%s items=%d train=%d val=%d modalities=%s", job_id, len(rows),
             len(train_idx), len(val_idx), ",".join(present))
    try:
        trained = train_aligner(data, train_idx, val_idx, settings,
                                on_epoch=Pulse(rt, job_id, settings.epochs).epoch)
    except ValueError as exc:
        raise TrainingError(f"alignment failed: {exc}") from exc
    metrics: dict[str, Any] = {
        "method": trained.method, "epochs": trained.epochs,
        "train_seconds": round(trained.seconds, 1), "items": len(rows),
        "train_items": len(train_idx), "val_items": len(val_idx), "split": split_source,
        "groups": split_groups([r.group for r in rows], train_idx, val_idx),
        "candidates": trained.candidates, "validation": trained.validation}
    if trained.validation:  # scalars at the top level too: the model list shows only those
        metrics.update({f"val_{k.replace('->', '_to_')}_r@10": v["r@10"]
                        for k, v in trained.validation.items()})
    weights, config = save_aligner(trained.model.cpu())
    blob = rt.blobs.put_bytes(weights)
    encoders = {m: {"name": SPECS[m].name, "version": SPECS[m].version, "dim": SPECS[m].dim}
                for m in present}
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        mv = register_model(s, name=options.name or "aligner", fusion=trained.method,
                            classes=[], encoders=encoders, metrics=jsonable(metrics),
                            config=config, checkpoint_blob=blob, job_id=job_id,
                            tenant_id=job.tenant_id, kind="aligner")
        job.model_version_id = mv.id
        s.flush()
        jobs.finish_job(s, job_id)
        model_id = mv.id
    log.info("aligner_registered job=%s model=%s method=%s", job_id, model_id, trained.method)
    return model_id


def evaluate_aligner(rt: Runtime, job_id: str, rows: list[ItemRow], model: ModelRow) -> None:
    """Recall@1/5/10 and median rank per direction of ``model`` over the job's items."""
    aligner = models_of(rt).aligner(model)
    present = [m for m in aligner.modalities if any(m in r.media for r in rows)]
    rows = [r for r in rows if sum(m in r.media for m in present) >= 2]
    if len(rows) < 2 or len(present) < 2:
        raise TrainingError("an evaluation needs items with two or more of the modalities the "
                            f"aligner embeds ({', '.join(aligner.modalities)})")
    report = recall_report(aligner, paired_features(rt, rows, present))
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        job.report = {**(job.report or {}), "retrieval": report}
        mv = get_model(s, model.id)
        metrics = dict(mv.metrics or {})
        metrics["evaluations"] = (list(metrics.get("evaluations") or []) + [
            {"job": job_id, "archive": job.archive_name, "items": len(rows),
             "retrieval": report}])[-EVALUATIONS_KEPT:]
        mv.metrics = jsonable(metrics)
        s.flush()
        jobs.finish_job(s, job_id)
    log.info("aligner_evaluated job=%s model=%s items=%d", job_id, model.id, len(rows))
