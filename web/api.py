"""The jobs API under /api/v1 (and /healthz): parse, call a service, serialise."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import text

from mmbatch.contract import ALL_KINDS, JOB_STATES
from store import jobs
from store.schema import JOB_ID_LENGTH
from web import auth, service
from web.errors import ApiError
from web.exports import FORMATS, export
from web.paging import decode_cursor, encode_cursor, int_arg, int_cursor
from web.serializers import job_payload, result_payload

api = Blueprint("api", __name__)
health = Blueprint("health", __name__)
api.before_request(auth.authenticate)

TRUE = {"1", "true", "yes", "on"}


def services() -> service.Services:
    return current_app.extensions["mmbatch"]  # type: ignore[no-any-return]


@health.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        s.execute(text("SELECT 1"))
    return jsonify({"status": "ok", "database": "ok"})


@api.post("/api/v1/jobs")
def create_job():  # type: ignore[no-untyped-def]
    idem = request.headers.get("Idempotency-Key", "").strip() or None
    if request.mimetype == "application/json":  # a train job on earlier jobs' items
        job_id, created = service.submit_retrain(services(), request.get_json(silent=True),
                                                 idem)
    else:
        job_id, created = service.submit_job(services(), request.mimetype, request.form,
                                             request.files, idem)
    return job_response(job_id, status=202 if created else 200)


def job_response(job_id: str, status: int = 202, **links: str):  # type: ignore[no-untyped-def]
    """A job as the answer to the request that made it (or found it): its payload, the status,
    and a ``Location``; ``links`` adds to the payload's links."""
    with services().db.session() as s:
        payload = job_payload(s, service.get_job_or_404(s, job_id))
    payload["links"].update(links)
    response = jsonify(payload)
    response.status_code = status
    response.headers["Location"] = payload["links"]["self"]
    return response


@api.get("/api/v1/jobs")
def list_jobs():  # type: ignore[no-untyped-def]
    settings = services().settings
    limit = int_arg("limit", settings.default_page_size, 1, settings.max_page_size)
    state = request.args.get("state") or None
    if state is not None and state not in JOB_STATES:
        raise ApiError(400, "invalid_state", f"state must be one of {', '.join(JOB_STATES)}")
    kind = request.args.get("kind") or None
    if kind is not None and kind not in ALL_KINDS:
        raise ApiError(400, "invalid_kind", f"kind must be one of {', '.join(ALL_KINDS)}")
    after = _time_arg("created_after")
    before = _time_arg("created_before")
    cursor = request.args.get("cursor")
    position = None
    if cursor:
        try:
            at, job_id = decode_cursor(cursor, "j").split("|", 1)
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
            next_cursor = encode_cursor("j", f"{last.created_at.isoformat()}|{last.id}")
        return jsonify({"jobs": [job_payload(s, j) for j in rows], "next_cursor": next_cursor})


@api.get("/api/v1/jobs/<job_id>")
def get_job(job_id: str):  # type: ignore[no-untyped-def]
    return _job_json(job_id)


@api.post("/api/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):  # type: ignore[no-untyped-def]
    service.cancel_job(services(), job_id)
    return _job_json(job_id)


def _job_json(job_id: str):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        return jsonify(job_payload(s, service.get_job_or_404(s, job_id)))


@api.get("/api/v1/jobs/<job_id>/report")
def get_report(job_id: str):  # type: ignore[no-untyped-def]
    with services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
        return jsonify({"id": job.id, "report": job.report})


@api.get("/api/v1/jobs/<job_id>/errors")
def get_errors(job_id: str):  # type: ignore[no-untyped-def]
    return _results(job_id, failed_only=True)


@api.get("/api/v1/jobs/<job_id>/results")
def get_results(job_id: str):  # type: ignore[no-untyped-def]
    fmt = request.args.get("format", "json")
    if fmt == "json":
        return _results(job_id, failed_only=False)
    if fmt not in FORMATS:
        raise ApiError(400, "invalid_format", f"format must be json, {', '.join(FORMATS)}")
    with services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
    return export(services().db, job, fmt, request.args.get("embeddings", "").lower() in TRUE)


@api.get("/api/v1/jobs/<job_id>/evaluation")
def job_evaluation(job_id: str):  # type: ignore[no-untyped-def]
    """Scores of a classify job against the labels its archive gave."""
    return jsonify(service.evaluation(services(), job_id))


def _results(job_id: str, failed_only: bool):  # type: ignore[no-untyped-def]
    settings = services().settings
    limit = int_arg("limit", settings.default_page_size, 1, settings.max_page_size)
    after = int_cursor(request.args.get("cursor"))
    with_embeddings = request.args.get("embeddings", "").lower() in TRUE
    with services().db.session() as s:
        job = service.get_job_or_404(s, job_id)
        rows = jobs.results_page(s, job, after=after, limit=limit + 1, failed_only=failed_only)
        more = len(rows) > limit
        rows = rows[:limit]
        items = [result_payload(item, result, with_embeddings) for item, result in rows]
        cursor = encode_cursor("i", str(rows[-1][0].id)) if more else None
        return jsonify({"job": job.id, "state": job.state, "items": items,
                        "next_cursor": cursor})


@api.post("/api/v1/reprocess")
def start_reprocess():  # type: ignore[no-untyped-def]
    """Reprocess this tenant's stale or failed items now (what the nightly schedule does)."""
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "send a JSON object (or nothing)")
    job_id, reason = service.start_reprocess(services(), body.get("model"), body.get("limit"))
    if job_id is None:
        return jsonify({"status": "nothing to reprocess", "reason": reason})
    return job_response(job_id)


def _time_arg(name: str) -> dt.datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"invalid_{name}", f"{name} must be an ISO 8601 date-time")
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
