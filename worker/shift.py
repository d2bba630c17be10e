"""Domain-shift warnings: the training split's feature statistics, stored with a model version,
against the features of the items a job classifies with it (models.shift).

A train job stores one safetensors blob of per-modality summaries and puts the validation
split's own scores in the model's ``config["shift"]`` and ``metrics["shift"]``. When a job that
ran a model finishes, the worker that finished it reads the job's features back from the
feature cache (at most MAX_ITEMS items, evenly spread), compares, and writes ``report["shift"]``
on the job: the scores per modality, the validation baseline, and ``warnings``.

Besides means, spreads and spectrum, each modality's summary holds a seeded sample of up to
1,024 standardised training items (float16, ``<modality>.sample``: 2.5 MiB at D = 1280) and
their own typical nearest-neighbour distance; the scores then carry ``knn_distance`` (the median
distance from a job's item to its nearest sampled training item, per-feature RMS units),
``train_knn_distance`` and their ratio ``knn_ratio`` (about 1 on the training distribution),
which also warns, relative to the validation split's ratio. It catches data where the training
data never was even when its means and spreads match. Models trained before the sample existed
report the three as None and warn on the mean shift alone.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from models.shift import FeatureSummary, compare, summarize, warning
from store import features as feature_cache
from store import jobs
from store.registry import ModelRow
from worker.runtime import Runtime

log = logging.getLogger(__name__)

# A sample is enough for means, spreads and the median nearest-neighbour distance; bounds the
# work on huge jobs (5,000 items against 1,024 sampled training items at D = 1280: about 0.1 s).
MAX_ITEMS = 5000


def store_training_summary(rt: Runtime, train: dict[str, np.ndarray],
                           val: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Summarise each modality's training features (N_m, D_m), kNN sample included, score the
    validation features against them (kNN ratio included); the stored blob and the baseline
    scores, or None with no features at all."""
    summaries = {m: summarize(x) for m, x in train.items() if len(x)}
    if not summaries:
        return None
    tensors: dict[str, np.ndarray] = {}
    for m, summary in summaries.items():
        tensors.update(summary.tensors(m))
    blob = rt.blobs.put_bytes(save(tensors, metadata={"format": "mmbatch.shift"}))
    baseline = {m: compare(summaries[m], val[m]) if m in val and len(val[m]) else None
                for m in summaries}
    return {"stats_blob": blob, "validation": baseline}


def record_job_shift(rt: Runtime, job_id: str, model: ModelRow) -> dict[str, Any] | None:
    """Compare a finished job's features with its model's training summary; write and return
    ``report["shift"]`` (None when the model has no summary: trained before they existed)."""
    shift = model.config.get("shift")
    if not shift or not shift.get("stats_blob"):
        return None
    with rt.db.session() as s:
        items = jobs.sample_items(s, job_id, MAX_ITEMS)
    tensors = load(rt.blobs.read(shift["stats_blob"]))
    scores: dict[str, Any] = {}
    warnings: list[str] = []
    for modality, encoder in sorted(model.encoders.items()):
        if f"{modality}.mean" not in tensors:
            continue
        blobs = [it.media[modality].blob for it in items if modality in it.media]
        with rt.db.session() as s:
            found = feature_cache.get_features(s, encoder["version"], blobs)
        rows = [found[b] for b in blobs if b in found]
        x = np.stack(rows) if rows else np.zeros((0, int(encoder["dim"])), dtype=np.float32)
        scores[modality] = compare(FeatureSummary.from_tensors(tensors, modality), x)
        note = warning(modality, scores[modality], (shift.get("validation") or {}).get(modality))
        if note:
            warnings.append(note)
    result = {"modalities": scores, "validation": shift.get("validation") or {},
              "warnings": warnings}
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        job.report = {**(job.report or {}), "shift": result}
        job.warnings = [*(job.warnings or []), *warnings]
    if warnings:
        log.warning("shift_warning job=%s model=%s modalities=%s", job_id, model.id,
                    ",".join(m for m in scores if any(w.startswith(m) for w in warnings)))
    return result
