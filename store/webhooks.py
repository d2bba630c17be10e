"""The webhook outbox: deliveries due, what one needs to be sent, and the outcome of a try.

A delivery row is written in the same transaction as the job's terminal state
(``store.jobs.transition``), so a callback is sent if and only if the state change committed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.schema import ApiKey, Job, WebhookDelivery, utcnow


@dataclass(frozen=True)
class Outgoing:
    """One delivery to try: where, which event, the job it reports and the secret to sign with."""

    id: int
    url: str
    event: str
    attempt: int  # this try's number, from 1
    job: Job
    secret: str | None  # the webhook secret of the key that created the job


def due(session: Session, limit: int) -> list[int]:
    """Pending deliveries whose time has come, oldest first."""
    return list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= utcnow())
        .order_by(WebhookDelivery.id).limit(limit)))


def outgoing(session: Session, delivery_id: int) -> Outgoing | None:
    """The delivery if it is still pending, with its job and the creating key's secret."""
    d = session.get(WebhookDelivery, delivery_id)
    if d is None or d.state != "pending":
        return None
    job = session.get(Job, d.job_id)
    if job is None:
        return None
    key = session.get(ApiKey, job.api_key_id) if job.api_key_id else None
    return Outgoing(d.id, d.url, d.event, d.attempts + 1, job,
                    key.webhook_secret if key is not None else None)


def record_attempt(session: Session, delivery_id: int, attempt: int, status: int | None,
                   error: str | None, max_attempts: int) -> None:
    """Delivered when there is no error; failed for good at ``max_attempts``; otherwise tried
    again after an exponential backoff (at most an hour)."""
    d = session.get(WebhookDelivery, delivery_id)
    if d is None:
        return
    d.attempts, d.last_status, d.last_error = attempt, status, error
    if error is None:
        d.state, d.delivered_at = "delivered", utcnow()
    elif attempt >= max_attempts:
        d.state = "failed"
    else:
        d.next_attempt_at = utcnow() + dt.timedelta(seconds=min(3600, 2 ** attempt))
