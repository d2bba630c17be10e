"""Find jobs whose messages were lost (a broker flush, a crash between commit and enqueue) and
send their missing work again. Everything it sends is idempotent, so sending too much is safe.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmbatch.contract import (
    TASK_ALIGN,
    TASK_INGEST,
    TASK_TRAIN,
    TASK_WEBHOOKS,
    training_step,
)
from store import dispatch as plans
from store import jobs
from store.schema import utcnow
from worker.dispatch import dispatch
from worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Revival:
    ingest: list[str] = field(default_factory=list)                  # job ids
    batches: list[tuple[str, list[int]]] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    align: list[str] = field(default_factory=list)  # align jobs whose training step was lost
    finished: list[str] = field(default_factory=list)
    # running jobs that stopped moving: their sent batches were lost, planned again
    stalled: list[str] = field(default_factory=list)


def sweep(rt: Runtime, older_than_seconds: float | None = None) -> Revival:
    """What to send again for every active job that has not moved for a while."""
    age = rt.settings.stale_after_seconds if older_than_seconds is None else older_than_seconds
    cutoff = utcnow() - dt.timedelta(seconds=age)
    out = Revival()
    with rt.db.session() as s:
        stale = [(j.id, j.state, j.walking, j.stage, training_step(j.kind, j.options))
                 for j in jobs.stale_jobs(s, cutoff)]
    for job_id, state, walking, stage, then in stale:
        with rt.db.session() as s:
            jobs.touch(s, job_id)  # one revival per stale period, not one per sweep
            if state in ("queued", "ingesting") or walking:  # (its walk stopped part way)
                out.ingest.append(job_id)
                continue
            if then and stage == "training":
                (out.align if then == "align" else out.train).append(job_id)
                continue
            pending = jobs.item_ids(s, job_id, pending_only=True)
            if pending and plans.planned(s, job_id):
                out.stalled.append(job_id)  # its batches wait their turn, or were lost
                continue
            if not pending:
                # every item has its result but the finishing step was lost
                if then and jobs.enter_stage(s, job_id, "extracting", "training"):
                    (out.align if then == "align" else out.train).append(job_id)
                elif jobs.finish_job(s, job_id):
                    out.finished.append(job_id)
                continue
        size = rt.settings.batch_size
        out.batches += [(job_id, pending[i:i + size]) for i in range(0, len(pending), size)]
    if stale:
        log.info("sweep stale=%d ingest=%d batches=%d train=%d finished=%d", len(stale),
                 len(out.ingest), len(out.batches), len(out.train), len(out.finished))
    return out


def resend(rt: Runtime, revival: Revival, send_task: Callable[..., Any]) -> None:
    """Send what a sweep found missing: ingests and training steps again, lost batches planned
    afresh and then dispatched (a window at a time, like any others)."""
    for job_id in revival.ingest:
        send_task(TASK_INGEST, args=[job_id])
    with rt.db.session() as s:
        plans.forget_finished(s)
        again = plans.requeue_lost(s, revival.stalled)
    if again:
        log.info("sweep batches_lost=%d", again)
    lost: dict[str, list[int]] = {}
    for job_id, ids in revival.batches:
        lost.setdefault(job_id, []).extend(ids)
    for job_id, ids in lost.items():
        with rt.db.session() as s:
            plans.replan(s, job_id, ids, rt.settings.batch_size)
    dispatch(rt, send_task)
    for job_id in revival.train:
        send_task(TASK_TRAIN, args=[job_id])
    for job_id in revival.align:
        send_task(TASK_ALIGN, args=[job_id])
    if revival.finished:
        send_task(TASK_WEBHOOKS)
