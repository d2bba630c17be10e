"""Model registry endpoints: promote a version, its confusion-matrix PNG, evaluation on a new
labelled archive; and the validation of a train job's model options.

The web process does not import torch or ``models``, so the strategy and loss names are
repeated here; tests/test_fusion_api.py checks they match ``models.fusion.STRATEGIES`` and
``models.losses.LOSSES``.

Evaluating a model is a ``classify`` job with that model over a labelled archive (ingest keeps
``labels.csv`` labels for every kind of job), marked ``options.evaluate``; its evaluation is
computed from its results when asked for, so no new job kind or table is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request, url_for
from werkzeug.datastructures import MultiDict

from store import jobs
from store.blobs import sniff_archive
from store.registry import ModelNotFound, get_model, promote
from web import auth
from web.api import accepted, enqueue_ingest, job_payload, model_payload
from web.errors import ApiError
from web.uploads import archive_name, writer_of

models_api = Blueprint("models_api", __name__)
models_api.before_request(auth.authenticate)

# models.fusion.STRATEGIES and models.losses.LOSSES, without importing torch.
STRATEGIES = ("concat", "weighted", "gated", "attention", "hierarchical", "late")
LOSSES = ("ce", "weighted", "focal")
# worker.adaptation.MODES: how each modality's encoder is trained.
ENCODER_MODES = ("frozen", "finetune", "scratch", "auto")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
ECE_BINS = 15  # as models.evaluation


def _services() -> Any:
    return current_app.extensions["mmbatch"]


def train_options(form: MultiDict[str, str]) -> dict[str, Any]:
    """A train job's model options from its form: strategy, loss, gamma, balanced,
    modality_dropout, patience, encoder modes (``mode``, ``<modality>_mode``), ``budget`` and
    ``stacking_folds`` (late fusion only).
    Raises ApiError 400 ``invalid_<field>`` for a bad value."""
    options: dict[str, Any] = {}
    for field, choices in (("strategy", STRATEGIES), ("loss", LOSSES)):
        raw = form.get(field, "").strip().lower()
        if raw:
            if raw not in choices:
                raise ApiError(400, f"invalid_{field}",
                               f"{field} must be one of {', '.join(choices)}; got {raw!r}")
            options[field] = raw
    raw = form.get("balanced", "").strip().lower()
    if raw:
        if raw not in _TRUE | _FALSE:
            raise ApiError(400, "invalid_balanced", "balanced must be true or false")
        options["balanced"] = raw in _TRUE
    for field, low, high in (("gamma", 0.0, 10.0), ("modality_dropout", 0.0, 0.9)):
        raw = form.get(field, "").strip()
        if raw:
            try:
                value = float(raw)
            except ValueError:
                raise ApiError(400, f"invalid_{field}", f"{field} must be a number")
            if not low <= value <= high:  # NaN fails this too
                raise ApiError(400, f"invalid_{field}",
                               f"{field} must be between {low:g} and {high:g}")
            options[field] = value
    if "gamma" in options and options.get("loss") != "focal":
        raise ApiError(400, "invalid_gamma", "gamma applies to loss=focal only")
    for field in ("mode", "image_mode", "text_mode", "audio_mode"):
        raw = form.get(field, "").strip().lower()
        if raw:
            if raw not in ENCODER_MODES:
                raise ApiError(400, f"invalid_{field}", f"{field} must be one of "
                               f"{', '.join(ENCODER_MODES)}; got {raw!r}")
            options[field] = raw
    raw = form.get("budget", "").strip()
    if raw:
        try:
            budget = float(raw)
        except ValueError:
            raise ApiError(400, "invalid_budget", "budget must be a number of seconds")
        if not 10.0 <= budget <= 3600.0:  # NaN fails this too
            raise ApiError(400, "invalid_budget", "budget must be between 10 and 3600 seconds")
        options["budget"] = budget
    patience = _int_field(form, "patience")
    if patience is not None:
        if not 1 <= patience <= 10_000:
            raise ApiError(400, "invalid_patience", "patience must be between 1 and 10000")
        options["patience"] = patience
    folds = _int_field(form, "stacking_folds")
    if folds is not None:
        if folds != 0 and not 2 <= folds <= 10:
            raise ApiError(400, "invalid_stacking_folds",
                           "stacking_folds must be 0 (joint training) or between 2 and 10")
        if folds and options.get("strategy") != "late":
            raise ApiError(400, "invalid_stacking_folds",
                           "stacking_folds applies to strategy=late only")
        if folds and any(options.get(f, "frozen") != "frozen" for f in
                         ("mode", "image_mode", "text_mode", "audio_mode")):
            raise ApiError(400, "invalid_stacking_folds",
                           "stacking_folds applies to frozen encoders only (mode=frozen)")
        options["stacking_folds"] = folds
    return options


def _int_field(form: Any, field: str) -> int | None:
    """An integer form field (None when absent); 400 ``invalid_<field>`` when not an integer."""
    raw = form.get(field, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"invalid_{field}", f"{field} must be an integer")


def _model(s: Any, model_id: int) -> Any:
    try:
        return get_model(s, model_id, auth.tenant_id())
    except ModelNotFound:
        raise ApiError(404, "not_found", f"no model version {model_id}")


@models_api.post("/api/v1/models/<int:model_id>/promote")
def promote_model(model_id: int):  # type: ignore[no-untyped-def]
    """Make this version the tenant's default model."""
    with _services().db.session() as s:
        _model(s, model_id)
        return jsonify(model_payload(promote(s, model_id, auth.tenant_id()), full=True))


@models_api.get("/api/v1/models/<int:model_id>/confusion.png")
def confusion_png(model_id: int):  # type: ignore[no-untyped-def]
    """The validation confusion matrix rendered when the model was trained."""
    with _services().db.session() as s:
        digest = (_model(s, model_id).metrics or {}).get("confusion_png")
    if not digest:
        raise ApiError(404, "not_found", f"model version {model_id} has no confusion matrix "
                                         "(trained without a validation split)")
    return Response(_services().blobs.read(digest), mimetype="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})


@models_api.post("/api/v1/models/<int:model_id>/evaluate")
def evaluate_model(model_id: int):  # type: ignore[no-untyped-def]
    """Classify a labelled archive with this model; the job's ``evaluation`` link scores it."""
    svc = _services()
    tenant = auth.tenant_id()
    with svc.db.session() as s:
        _model(s, model_id)
    upload = request.files.get("archive")
    writer = writer_of(upload) if upload is not None else None
    if upload is None or writer is None or writer.size == 0:
        raise ApiError(400, "missing_archive",
                       "send the labelled archive as a multipart file field named 'archive'")
    writer.flush()
    with open(writer.path, "rb") as f:
        if sniff_archive(f.read(512)) is None:
            raise ApiError(415, "invalid_archive", "the upload is not a zip, tar or tar.gz archive")
    digest = writer.commit()
    with svc.db.session() as s:
        job_id = jobs.create_job(s, kind="classify", archive_blob=digest,
                                 archive_name=archive_name(upload),
                                 archive_bytes=writer.size, model_version_id=model_id,
                                 options={"evaluate": True}, tenant_id=tenant,
                                 api_key_id=auth.current().key_id).id
    enqueue_ingest(svc, job_id)
    with svc.db.session() as s:
        payload = job_payload(s, jobs.get_job(s, job_id, tenant))
    payload["links"]["evaluation"] = url_for("models_api.job_evaluation", job_id=job_id)
    return accepted(payload)


@models_api.get("/api/v1/jobs/<job_id>/evaluation")
def job_evaluation(job_id: str):  # type: ignore[no-untyped-def]
    """Scores of a classify job against the labels its archive gave (any classify job over a
    labelled archive, not only those made by ``evaluate``)."""
    with _services().db.session() as s:
        try:
            job = jobs.get_job(s, job_id, auth.tenant_id())
        except jobs.JobNotFound:
            raise ApiError(404, "not_found", f"no job {job_id}")
        if job.kind != "classify" or job.model_version_id is None:
            raise ApiError(409, "not_a_classify_job", "only a classify job can be evaluated")
        model = get_model(s, job.model_version_id)
        classes = list(model.classes)
        pairs: list[tuple[str, str | None, float | None]] = []
        after = 0
        while True:
            page = jobs.results_page(s, job, after=after, limit=1000)
            if not page:
                break
            pairs += [(item.label, r.label if r is not None and r.status == "ok" else None,
                       r.confidence if r is not None else None)
                      for item, r in page if item.label is not None]
            after = page[-1][0].id
        body = {"job": job.id, "state": job.state,
                "model": {"id": model.id, "name": model.name, "version": model.version},
                **score(pairs, classes),
                # worker/shift.py: how far the job's features are from the training data
                "shift": (job.report or {}).get("shift")}
    return jsonify(body)


def score(pairs: list[tuple[str, str | None, float | None]], classes: list[str]
          ) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall, confusion matrix and ECE of
    (given label, predicted label or None if not classified, confidence) triples.

    Items whose given label the model does not know count as errors in accuracy and are
    listed in ``unknown_labels``; unclassified items (failed or pending) are counted apart.
    """
    index = {c: i for i, c in enumerate(classes)}
    done = [(g, p, c) for g, p, c in pairs if p is not None]
    known = [(index[g], index[p], c) for g, p, c in done if g in index and p in index]
    unknown = sorted({g for g, _, _ in done if g not in index})
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    for t, p, _ in known:
        confusion[t, p] += 1
    tp = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(1).astype(float), confusion.sum(0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    seen = (support > 0) | (predicted > 0)
    correct = np.array([t == p for t, p, _ in known] + [False] * (len(done) - len(known)))
    confidences = np.array([c or 0.0 for _, _, c in known], dtype=float)
    return {
        "items": len(pairs),
        "classified": len(done),
        "not_classified": len(pairs) - len(done),
        "accuracy": float(correct.mean()) if len(done) else None,
        "macro_f1": float(f1[seen].mean()) if seen.any() else None,
        "ece": _ece(confidences, correct[: len(known)]) if known else None,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
        "unknown_labels": unknown,
    }


def _ece(confidence: np.ndarray, correct: np.ndarray) -> float:
    """As models.evaluation.expected_calibration_error, from top-1 confidences."""
    index = np.clip(np.ceil(confidence * ECE_BINS).astype(int), 1, ECE_BINS) - 1
    total = 0.0
    for b in range(ECE_BINS):
        members = index == b
        if members.any():
            total += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(total)
