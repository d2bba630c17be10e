"""The ingest side's Celery tasks, torch-free: walk an archive, plan reprocessing, revive stale
jobs, deliver webhooks. Each is a thin adapter from a message (ids only) to a plain function."""

from __future__ import annotations

import logging

from celery import shared_task

from mmbatch.contract import (
    TASK_INGEST,
    TASK_PROCESS_BATCH,
    TASK_REPROCESS,
    TASK_SWEEP,
    TASK_TRAIN,
    TASK_WEBHOOKS,
)
from store import jobs
from worker.ingest import ingest_job
from worker.reprocess import start_reprocess
from worker.retries import MAX_RETRIES, TRANSIENT, retry
from worker.runtime import runtime_for
from worker.sweeper import sweep as find_stale
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)


@shared_task(name=TASK_INGEST, bind=True, max_retries=MAX_RETRIES)
def ingest(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    try:
        batches = ingest_job(rt, job_id)
    except TRANSIENT as exc:
        retry(self, exc)
    except Exception as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, f"ingest failed: {type(exc).__name__}: {exc}")
        self.app.send_task(TASK_WEBHOOKS)
        raise
    for ids in batches:
        self.app.send_task(TASK_PROCESS_BATCH, args=[job_id, ids])
    if not batches:
        self.app.send_task(TASK_WEBHOOKS)  # the job may have failed (no media, no labels)
    log.info("job_fanout job=%s batches=%d", job_id, len(batches))


@shared_task(name=TASK_REPROCESS, bind=True, max_retries=MAX_RETRIES)
def reprocess(self, tenant_id: int | None = None, model_id: int | None = None,  # type: ignore[no-untyped-def]
              limit: int | None = None, all_tenants: bool = True) -> list[str]:
    """Start reprocess jobs: for one tenant, or (the nightly run) for every tenant with a model."""
    try:
        plans = start_reprocess(runtime_for(self.app), self.app.send_task,
                                None if all_tenants else [tenant_id], model_id, limit)
    except TRANSIENT as exc:
        retry(self, exc)
    return [p.job_id for p in plans if p.started and p.job_id]


@shared_task(name=TASK_SWEEP, bind=True)
def sweep(self) -> None:  # type: ignore[no-untyped-def]
    revival = find_stale(runtime_for(self.app))
    for job_id in revival.ingest:
        self.app.send_task(TASK_INGEST, args=[job_id])
    for job_id, ids in revival.batches:
        self.app.send_task(TASK_PROCESS_BATCH, args=[job_id, ids])
    for job_id in revival.train:
        self.app.send_task(TASK_TRAIN, args=[job_id])
    if revival.finished:
        self.app.send_task(TASK_WEBHOOKS)


@shared_task(name=TASK_WEBHOOKS, bind=True)
def webhooks(self) -> int:  # type: ignore[no-untyped-def]
    return deliver_due(runtime_for(self.app))
