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
from sqlalchemy import select

from mmbatch.netpolicy import DestinationRefused, check_url
from store.schema import ApiKey, Job, WebhookDelivery, utcnow
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
    now = utcnow()
    with rt.db.session() as s:
        due = list(s.scalars(select(WebhookDelivery.id).where(
            WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.id).limit(limit)))
    return sum(deliver(rt, delivery_id) for delivery_id in due)


def deliver(rt: Runtime, delivery_id: int) -> bool:
    settings = rt.settings
    with rt.db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        if d is None or d.state != "pending":
            return False
        job = s.get(Job, d.job_id)
        key = s.get(ApiKey, job.api_key_id) if job and job.api_key_id else None
        secret = key.webhook_secret if key is not None else settings.webhook_secret
        body = json.dumps({"event": d.event, "delivery": d.id, "job": job_body(job)},
                          separators=(",", ":")).encode()
        url, event, attempt = d.url, d.event, d.attempts + 1
    headers = {"Content-Type": "application/json", "User-Agent": "mmbatch-webhook/1",
               "X-Mmbatch-Event": event, "X-Mmbatch-Delivery": str(delivery_id)}
    if secret:
        headers["X-Mmbatch-Signature"] = sign(secret, body)
    status: int | None = None
    error: str | None = None
    try:
        check_url(url, settings.webhook_allow)
        response = requests.post(url, data=body, headers=headers, timeout=TIMEOUT,
                                 allow_redirects=False)
        status = response.status_code
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except DestinationRefused as exc:
        error, attempt = str(exc), settings.webhook_max_attempts  # policy: no point retrying
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"
    with rt.db.session() as s:
        d = s.get(WebhookDelivery, delivery_id)
        d.attempts, d.last_status, d.last_error = attempt, status, error
        if error is None:
            d.state, d.delivered_at = "delivered", utcnow()
        elif attempt >= settings.webhook_max_attempts:
            d.state = "failed"
        else:
            d.next_attempt_at = utcnow() + dt.timedelta(seconds=min(3600, 2 ** attempt))
    log.info("webhook job=%s event=%s attempt=%d status=%s error=%s", d.job_id, event, attempt,
             status, error)
    return error is None
