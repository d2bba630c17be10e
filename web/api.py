"""The HTTP API under /api/v1: parse, call, serialise."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import numpy as np
from flask import Blueprint, current_app, jsonify, request, url_for
from sqlalchemy import select, text

from store import jobs
from store.blobs import sniff_archive
from store.registry import ModelNotFound, default_model, get_model, list_models
from store.schema import JOB_KINDS, Job, ModelVersion
from web.errors import ApiError
from web.uploads import writer_of
from worker.app import TASK_INGEST

api = Blueprint("api", __name__)

TRUE = {"1", "true", "yes", "on"}


def services() -> Any:
    return current_app.extensions["mmbatch"]


@api.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        s.execute(text("SELECT 1"))
    return jsonify({"status": "ok", "database": "ok"})


@api.post("/api/v1/jobs")
def create_job():  # type: ignore[no-untyped-def]
    svc = services()
    kind = request.form.get("kind", "")
    if kind not in JOB_KINDS:
        raise ApiError(400, "invalid_kind",
                       f"kind must be one of {', '.join(JOB_KINDS)}; got {kind!r}")
    upload = request.files.get("archive")
    writer = writer_of(upload) if upload is not None else None
    if writer is None or writer.size == 0:
        raise ApiError(400, "missing_archive",
                       "send the archive as a multipart file field named 'archive'")
    writer.flush()
    with open(writer.path, "rb") as f:
        head = f.read(512)
    if sniff_archive(head) is None:
        raise ApiError(415, "invalid_archive",
                       "the upload is not a zip, tar or tar.gz archive")
    options = _job_options(kind)
    with svc.db.session() as s:
        model_id = _resolve_model(s, kind, request.form.get("model"))
    digest = writer.commit()
    with svc.db.session() as s:
        job = jobs.create_job(s, kind=kind, archive_blob=digest,
                              archive_name=(upload.filename or "archive")[:255],
                              archive_bytes=writer.size, model_version_id=model_id,
                              options=options)
        job_id = job.id
    # Commit, then enqueue: the row exists before any worker can look for it.
    try:
        svc.celery.send_task(TASK_INGEST, args=[job_id])
    except Exception as exc:
        with svc.db.session() as s:
            jobs.fail_job(s, job_id, f"could not enqueue the job: {exc}")
        raise ApiError(503, "broker_unavailable",
                       "the job queue is unavailable; the job was not started") from exc
    with svc.db.session() as s:
        payload = job_payload(s, jobs.get_job(s, job_id))
    response = jsonify(payload)
    response.status_code = 202
    response.headers["Location"] = url_for("api.get_job", job_id=job_id)
    return response


def _job_options(kind: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if kind == "train":
        name = request.form.get("name", "").strip()
        if name:
            if len(name) > 128:
                raise ApiError(400, "invalid_name", "name must be at most 128 characters")
            options["name"] = name
        for field, low, high in (("epochs", 1, 10_000), ("seed", 0, 2**31 - 1)):
            raw = request.form.get(field)
            if raw:
                try:
                    value = int(raw)
                except ValueError:
                    raise ApiError(400, f"invalid_{field}", f"{field} must be an integer")
                if not low <= value <= high:
                    raise ApiError(400, f"invalid_{field}",
                                   f"{field} must be between {low} and {high}")
                options[field] = value
    return options


def _resolve_model(s: Any, kind: str, requested: str | None) -> int | None:
    if kind == "train":
        if requested:
            raise ApiError(400, "invalid_model", "a train job makes a model; do not name one")
        return None
    if requested:
        try:
            return get_model(s, int(requested)).id
        except (ValueError, ModelNotFound):
            raise ApiError(400, "unknown_model", f"no model version with id {requested!r}")
    model = default_model(s)
    if model is None and kind == "classify":
        raise ApiError(409, "no_model",
                       "no model version exists yet: train one with a kind=train job first")
    return model.id if model is not None else None


@api.get("/api/v1/jobs/<job_id>")
def get_job(job_id: str):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        return jsonify(job_payload(s, _job(s, job_id)))


@api.get("/api/v1/jobs/<job_id>/report")
def get_report(job_id: str):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        job = _job(s, job_id)
        return jsonify({"id": job.id, "report": job.report})


@api.get("/api/v1/jobs/<job_id>/results")
def get_results(job_id: str):  # type: ignore[no-untyped-def]
    settings = services().settings
    limit = _int_arg("limit", settings.default_page_size, 1, settings.max_page_size)
    after = _cursor(request.args.get("cursor"))
    with_embeddings = request.args.get("embeddings", "").lower() in TRUE
    with services().db.session() as s:
        job = _job(s, job_id)
        rows = jobs.results_page(s, job, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [result_payload(item, result, with_embeddings) for item, result in rows]
        cursor = _encode_cursor(rows[-1][0].id) if more else None
        return jsonify({"job": job.id, "state": job.state, "items": items,
                        "next_cursor": cursor})


@api.get("/api/v1/models")
def get_models():  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        return jsonify({"models": [model_payload(m) for m in list_models(s)]})


@api.get("/api/v1/models/<int:model_id>")
def get_model_version(model_id: int):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        try:
            return jsonify(model_payload(get_model(s, model_id), full=True))
        except ModelNotFound:
            raise ApiError(404, "not_found", f"no model version {model_id}")


def _job(s: Any, job_id: str) -> Job:
    try:
        return jobs.get_job(s, job_id)
    except jobs.JobNotFound:
        raise ApiError(404, "not_found", f"no job {job_id}")


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"invalid_{name}", f"{name} must be an integer")
    if not low <= value <= high:
        raise ApiError(400, f"invalid_{name}", f"{name} must be between {low} and {high}")
    return value


def _encode_cursor(item_id: int) -> str:
    return base64.urlsafe_b64encode(f"i:{item_id}".encode()).decode().rstrip("=")


def _cursor(raw: str | None) -> int:
    if not raw:
        return 0
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        prefix, value = decoded.split(":", 1)
        if prefix != "i":
            raise ValueError(prefix)
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite drops the zone; everything is stored in UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


def job_payload(s: Any, job: Job) -> dict[str, Any]:
    model = s.get(ModelVersion, job.model_version_id) if job.model_version_id else None
    processed = job.done + job.failed
    report = job.report or {}
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "stage": job.stage,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "progress": round(processed / job.total, 4) if job.total else 0.0,
        "model": None if model is None else {"id": model.id, "name": model.name,
                                             "version": model.version},
        "error": job.error,
        "archive": {"name": job.archive_name, "bytes": job.archive_bytes},
        "skipped_files": report.get("skipped_count", 0),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
        "links": {"self": url_for("api.get_job", job_id=job.id),
                  "results": url_for("api.get_results", job_id=job.id),
                  "report": url_for("api.get_report", job_id=job.id)},
    }


def result_payload(item: Any, result: Any, with_embeddings: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "item_id": item.id,
        "key": item.key,
        "modalities": [m for m in ("image", "text", "audio") if m in item.media],
        "status": "pending" if result is None else result.status,
        "label": None,
        "confidence": None,
        "top_k": None,
        "given_label": item.label,
        "split": item.split,
        "error": None,
    }
    if result is not None:
        out.update(label=result.label, confidence=result.confidence, top_k=result.top_k,
                   error=result.error, explanation=result.explanation)
        if with_embeddings:
            out["embedding"] = None if result.embedding is None else \
                np.frombuffer(result.embedding, dtype="<f4").round(6).tolist()
    return out


def model_payload(m: ModelVersion, full: bool = False) -> dict[str, Any]:
    metrics = dict(m.metrics or {})
    if not full:
        metrics = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    return {
        "id": m.id,
        "name": m.name,
        "version": m.version,
        "fusion": m.fusion,
        "classes": m.classes,
        "encoders": m.encoders,
        "metrics": metrics,
        "is_default": m.is_default,
        "job_id": m.job_id,
        "created_at": _iso(m.created_at),
    }
