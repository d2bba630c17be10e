"""The HTTP API under /api/v1: parse, call, serialise."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import time
from typing import Any

import numpy as np
from flask import Blueprint, current_app, jsonify, request, url_for
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from mmbatch.netpolicy import DestinationRefused, check_url
from store import jobs
from store.blobs import sniff_archive
from store.registry import ModelNotFound, default_model, get_model, list_models
from store.schema import JOB_ID_LENGTH, JOB_KINDS, JOB_STATES, MAX_ID, Job, ModelVersion
from web import auth
from web.errors import ApiError
from web.uploads import archive_name, writer_of
from worker.app import TASK_INGEST, TASK_REPROCESS, TASK_WEBHOOKS

log = logging.getLogger(__name__)

api = Blueprint("api", __name__)
health = Blueprint("health", __name__)
api.before_request(auth.authenticate)

TRUE = {"1", "true", "yes", "on"}


def services() -> Any:
    return current_app.extensions["mmbatch"]


@health.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        s.execute(text("SELECT 1"))
    return jsonify({"status": "ok", "database": "ok"})


@api.post("/api/v1/jobs")
def create_job():  # type: ignore[no-untyped-def]
    svc = services()
    tenant = auth.tenant_id()
    idem = request.headers.get("Idempotency-Key", "").strip() or None
    if idem is not None and (len(idem) > 255 or not idem.isprintable()):
        raise ApiError(400, "invalid_idempotency_key",
                       "Idempotency-Key is at most 255 printable characters")
    if idem is not None:
        with svc.db.session() as s:
            existing = jobs.find_by_idempotency_key(s, tenant, idem)
            if existing is not None:
                return accepted(job_payload(s, existing), status=200)
    kind = request.form.get("kind", "")
    if kind not in JOB_KINDS:
        raise ApiError(400, "invalid_kind",
                       f"kind must be one of {', '.join(JOB_KINDS)}; got {kind!r}")
    callback = request.form.get("callback_url", "").strip() or None
    if callback is not None:
        if len(callback) > 2048:
            raise ApiError(400, "invalid_callback_url", "callback_url is at most 2048 characters")
        try:
            check_url(callback, svc.settings.webhook_allow)
        except DestinationRefused as exc:
            raise ApiError(400, "invalid_callback_url", str(exc))
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
    try:
        with svc.db.session() as s:
            job = jobs.create_job(s, kind=kind, archive_blob=digest,
                                  archive_name=archive_name(upload),
                                  archive_bytes=writer.size, model_version_id=model_id,
                                  options=options, tenant_id=tenant,
                                  api_key_id=auth.current().key_id, idempotency_key=idem,
                                  callback_url=callback)
            job_id = job.id
    except IntegrityError:
        # the same Idempotency-Key raced us: answer with the job that won
        with svc.db.session() as s:
            existing = jobs.find_by_idempotency_key(s, tenant, idem or "")
            if existing is None:
                raise
            return accepted(job_payload(s, existing), status=200)
    enqueue_ingest(svc, job_id)
    with svc.db.session() as s:
        return accepted(job_payload(s, jobs.get_job(s, job_id)))


ENQUEUE_TRIES = 3


def enqueue_ingest(svc: Any, job_id: str) -> None:
    """Commit, then enqueue: called once the job row exists, so any worker can find it.

    Tried a few times: besides a broker that is briefly away, kombu's SQLAlchemy transport (the
    embedded broker) fails a publish with a unique-constraint error when a worker starting at
    the same moment declares the same queue.
    """
    for attempt in range(1, ENQUEUE_TRIES + 1):
        try:
            svc.celery.send_task(TASK_INGEST, args=[job_id])
            return
        except Exception as exc:
            if attempt < ENQUEUE_TRIES:
                log.warning("enqueue_retry job=%s attempt=%d error=%s", job_id, attempt, exc)
                time.sleep(0.2 * attempt)
                continue
            with svc.db.session() as s:
                jobs.fail_job(s, job_id, f"could not enqueue the job: {exc}")
            raise ApiError(503, "broker_unavailable",
                           "the job queue is unavailable; the job was not started") from exc


def accepted(payload: dict[str, Any], status: int = 202):  # type: ignore[no-untyped-def]
    response = jsonify(payload)
    response.status_code = status
    response.headers["Location"] = payload["links"]["self"]
    return response


def _job_options(kind: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if kind == "train":
        name = request.form.get("name", "").strip()
        if name:
            if len(name) > 128 or not name.isprintable():
                raise ApiError(400, "invalid_name",
                               "name must be at most 128 printable characters")
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
        from web.models_api import train_options  # here: models_api imports this module

        options.update(train_options(request.form))
    return options


def _resolve_model(s: Any, kind: str, requested: str | None) -> int | None:
    if kind == "train":
        if requested:
            raise ApiError(400, "invalid_model", "a train job makes a model; do not name one")
        return None
    if requested:
        try:
            return get_model(s, int(requested), auth.tenant_id()).id
        except (ValueError, ModelNotFound):
            raise ApiError(400, "unknown_model", f"no model version with id {requested!r}")
    model = default_model(s, auth.tenant_id())
    if model is None and kind == "classify":
        raise ApiError(409, "no_model",
                       "no model version exists yet: train one with a kind=train job first")
    return model.id if model is not None else None


@api.get("/api/v1/jobs")
def list_jobs():  # type: ignore[no-untyped-def]
    settings = services().settings
    limit = _int_arg("limit", settings.default_page_size, 1, settings.max_page_size)
    state = request.args.get("state") or None
    if state is not None and state not in JOB_STATES:
        raise ApiError(400, "invalid_state", f"state must be one of {', '.join(JOB_STATES)}")
    kind = request.args.get("kind") or None
    if kind is not None and kind not in (*JOB_KINDS, "reprocess"):
        raise ApiError(400, "invalid_kind", f"kind must be one of {', '.join(JOB_KINDS)}, reprocess")
    after = _time_arg("created_after")
    before = _time_arg("created_before")
    cursor = request.args.get("cursor")
    position = None
    if cursor:
        try:
            at, job_id = _decode(cursor, "j").split("|", 1)
            position = (dt.datetime.fromisoformat(at), job_id)
            if len(job_id) > JOB_ID_LENGTH or "\x00" in job_id:
                raise ValueError(cursor)
        except ValueError:
            raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")
    with services().db.session() as s:
        rows = jobs.list_jobs(s, auth.tenant_id(), before=position, limit=limit + 1,
                              state=state, kind=kind, created_after=after,
                              created_before=before)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = None
        if more:
            last = rows[-1]
            next_cursor = _encode("j", f"{last.created_at.isoformat()}|{last.id}")
        return jsonify({"jobs": [job_payload(s, j) for j in rows], "next_cursor": next_cursor})


@api.get("/api/v1/jobs/<job_id>")
def get_job(job_id: str):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        return jsonify(job_payload(s, _job(s, job_id)))


@api.post("/api/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):  # type: ignore[no-untyped-def]
    svc = services()
    with svc.db.session() as s:
        job = _job(s, job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            raise ApiError(409, "job_finished", f"job {job_id} is already {job.state}")
        jobs.cancel_job(s, job_id)
    _kick_webhooks()
    with svc.db.session() as s:
        return jsonify(job_payload(s, _job(s, job_id)))


@api.get("/api/v1/jobs/<job_id>/report")
def get_report(job_id: str):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        job = _job(s, job_id)
        return jsonify({"id": job.id, "report": job.report})


@api.get("/api/v1/jobs/<job_id>/errors")
def get_errors(job_id: str):  # type: ignore[no-untyped-def]
    return _results(job_id, failed_only=True)


@api.get("/api/v1/jobs/<job_id>/results")
def get_results(job_id: str):  # type: ignore[no-untyped-def]
    fmt = request.args.get("format", "json")
    if fmt == "json":
        return _results(job_id, failed_only=False)
    from web.exports import FORMATS, export

    if fmt not in FORMATS:
        raise ApiError(400, "invalid_format", f"format must be json, {', '.join(FORMATS)}")
    with services().db.session() as s:
        job = _job(s, job_id)
    with_embeddings = request.args.get("embeddings", "").lower() in TRUE
    return export(services().db, job, fmt, with_embeddings)


def _results(job_id: str, failed_only: bool):  # type: ignore[no-untyped-def]
    settings = services().settings
    limit = _int_arg("limit", settings.default_page_size, 1, settings.max_page_size)
    after = _cursor(request.args.get("cursor"))
    with_embeddings = request.args.get("embeddings", "").lower() in TRUE
    with services().db.session() as s:
        job = _job(s, job_id)
        rows = jobs.results_page(s, job, after=after, limit=limit + 1, failed_only=failed_only)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [result_payload(item, result, with_embeddings) for item, result in rows]
        cursor = _encode_cursor(rows[-1][0].id) if more else None
        return jsonify({"job": job.id, "state": job.state, "items": items,
                        "next_cursor": cursor})


@api.post("/api/v1/reprocess")
def start_reprocess():  # type: ignore[no-untyped-def]
    """Reprocess this tenant's stale or failed items now (what the nightly schedule does)."""
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "send a JSON object (or nothing)")
    model = body.get("model")
    limit = body.get("limit")
    if model is not None:
        with services().db.session() as s:
            try:
                model = get_model(s, int(model), auth.tenant_id()).id
            except (TypeError, ValueError, OverflowError, ModelNotFound):  # inf: Overflow
                raise ApiError(400, "unknown_model", f"no model version with id {model!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or not 1 <= limit <= 10_000_000):
        raise ApiError(400, "invalid_limit", "limit must be an integer between 1 and 10000000")
    services().celery.send_task(TASK_REPROCESS, kwargs={
        "tenant_id": auth.tenant_id(), "model_id": model, "limit": limit, "all_tenants": False})
    return jsonify({"status": "accepted",
                    "links": {"jobs": url_for("api.list_jobs", kind="reprocess")}}), 202


def _kick_webhooks() -> None:
    try:
        services().celery.send_task(TASK_WEBHOOKS)
    except Exception:  # the scheduled delivery will pick it up
        pass


@api.get("/api/v1/models")
def get_models():  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        return jsonify({"models": [model_payload(m) for m in list_models(s, auth.tenant_id())]})


@api.get("/api/v1/models/<int:model_id>")
def get_model_version(model_id: int):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        try:
            return jsonify(model_payload(get_model(s, model_id, auth.tenant_id()), full=True))
        except ModelNotFound:
            raise ApiError(404, "not_found", f"no model version {model_id}")


def _job(s: Any, job_id: str) -> Job:
    try:
        return jobs.get_job(s, job_id, auth.tenant_id())
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


def _encode(prefix: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{prefix}:{value}".encode()).decode().rstrip("=")


def _decode(raw: str, prefix: str) -> str:
    """The value of a cursor made by _encode with ``prefix``; ValueError otherwise."""
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(raw) from exc
    got, _, value = decoded.partition(":")
    if got != prefix or not value:
        raise ValueError(raw)
    return value


def _encode_cursor(item_id: int) -> str:
    return _encode("i", str(item_id))


def _cursor(raw: str | None) -> int:
    if not raw:
        return 0
    try:
        after = int(_decode(raw, "i"))
        if not 0 <= after <= MAX_ID:  # an item id this API returned
            raise ValueError(raw)
        return after
    except ValueError:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")


def _time_arg(name: str) -> dt.datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"invalid_{name}", f"{name} must be an ISO 8601 date-time")
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


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
    throughput, eta = _rate(job, processed)
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
        "throughput": throughput,
        "eta_seconds": eta,
        "error": job.error,
        "idempotency_key": job.idempotency_key,
        "callback_url": job.callback_url,
        "archive": {"name": job.archive_name, "bytes": job.archive_bytes},
        "skipped_files": report.get("skipped_count", 0),
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
        "links": {"self": url_for("api.get_job", job_id=job.id),
                  "results": url_for("api.get_results", job_id=job.id),
                  "errors": url_for("api.get_errors", job_id=job.id),
                  "report": url_for("api.get_report", job_id=job.id),
                  "cancel": url_for("api.cancel_job", job_id=job.id)},
    }


def _rate(job: Job, processed: int) -> tuple[float | None, float | None]:
    """Items per second since the job started, and the seconds left at that rate."""
    if job.started_at is None or processed == 0:
        return None, None
    started = job.started_at if job.started_at.tzinfo else \
        job.started_at.replace(tzinfo=dt.timezone.utc)
    end = job.finished_at or dt.datetime.now(dt.timezone.utc)
    end = end if end.tzinfo else end.replace(tzinfo=dt.timezone.utc)
    seconds = max((end - started).total_seconds(), 1e-3)
    rate = processed / seconds
    left = max(job.total - processed, 0)
    eta = None if job.state not in ("running",) else round(left / rate, 1)
    return round(rate, 3), eta


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
        "group": item.group,
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
