"""Deliver job callbacks from the outbox (webhook_deliveries), signed, retried with backoff.

The body is the job's status object as JSON; ``X-Mmbatch-Signature: sha256=<hex>`` is
HMAC-SHA256 of the exact body bytes with the secret of the API key that created the job (or
``MMBATCH_WEBHOOK_SECRET``). Delivery is at least once: ``X-Mmbatch-Delivery`` lets a receiver
drop duplicates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
from typing import Any

import requests

from mmbatch.netpolicy import DestinationRefused, check_url
from store import webhooks as outbox
from store.schema import Job
from worker.runtime import Runtime

log = logging.getLogger(__name__)

TIMEOUT = 10.0


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def job_body(job: Job) -> dict[str, Any]:
    def iso(v: dt.datetime | None) -> str | None:
        if v is None:
            return None
        return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).isoformat()

    return {"id": job.id, "kind": job.kind, "state": job.state, "total": job.total,
            "done": job.done, "failed": job.failed, "error": job.error,
            "model_version_id": job.model_version_id, "created_at": iso(job.created_at),
            "finished_at": iso(job.finished_at)}


def deliver_due(rt: Runtime, limit: int = 50) -> int:
    """Send every pending delivery whose time has come; returns how many were delivered."""
    with rt.db.session() as s:
        due = outbox.due(s, limit)
    return sum(deliver(rt, delivery_id) for delivery_id in due)


def deliver(rt: Runtime, delivery_id: int) -> bool:
    settings = rt.settings
    with rt.db.session() as s:
        out = outbox.outgoing(s, delivery_id)
        if out is None:
            return False
        body = json.dumps({"event": out.event, "delivery": out.id, "job": job_body(out.job)},
                          separators=(",", ":")).encode()
    secret = out.secret or settings.webhook_secret
    headers = {"Content-Type": "application/json", "User-Agent": "mmbatch-webhook/1",
               "X-Mmbatch-Event": out.event, "X-Mmbatch-Delivery": str(delivery_id)}
    if secret:
        headers["X-Mmbatch-Signature"] = sign(secret, body)
    status: int | None = None
    error: str | None = None
    attempt = out.attempt
    try:
        check_url(out.url, settings.webhook_allow)
        response = requests.post(out.url, data=body, headers=headers, timeout=TIMEOUT,
                                 allow_redirects=False)
        status = response.status_code
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except DestinationRefused as exc:
        error, attempt = str(exc), settings.webhook_max_attempts  # policy: no point retrying
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"
    with rt.db.session() as s:
        outbox.record_attempt(s, delivery_id, attempt, status, error,
                              settings.webhook_max_attempts)
    log.info("webhook job=%s event=%s attempt=%d status=%s error=%s", out.job.id, out.event,
             attempt, status, error)
    return error is None
