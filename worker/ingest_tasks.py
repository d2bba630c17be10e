"""The ingest side's Celery tasks, torch-free: walk an archive, plan reprocessing, revive stale
jobs, deliver webhooks. Each is a thin adapter from a message (ids only) to a plain function."""

from __future__ import annotations

import logging

from celery import shared_task

from mmbatch.contract import (
    TASK_INDEX_MERGE,
    TASK_INGEST,
    TASK_REPROCESS,
    TASK_SWEEP,
    TASK_WEBHOOKS,
)
from store import jobs
from worker.dispatch import dispatch
from worker.index_merge import merge_all, merge_index
from worker.ingest import ingest as ingest_archive
from worker.reprocess import reprocess_tenants, run_reprocess
from worker.retries import MAX_RETRIES, TRANSIENT, retry
from worker.runtime import runtime_for
from worker.sweeper import resend
from worker.sweeper import sweep as find_stale
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)


@shared_task(name=TASK_INGEST, bind=True, max_retries=MAX_RETRIES)
def ingest(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    try:
        planned = ingest_archive(rt, job_id, self.app.send_task)
    except TRANSIENT as exc:
        retry(self, exc)
    except Exception as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, f"ingest failed: {type(exc).__name__}: {exc}")
        self.app.send_task(TASK_WEBHOOKS)
        raise
    if not planned:
        self.app.send_task(TASK_WEBHOOKS)  # the job may have failed (no media, no labels)
    sent = dispatch(rt, self.app.send_task)
    log.info("job_planned job=%s planned=%s sent=%d", job_id, planned, sent)


@shared_task(name=TASK_REPROCESS, bind=True, max_retries=MAX_RETRIES)
def reprocess(self, job_id: str | None = None, model_id: int | None = None,  # type: ignore[no-untyped-def]
              limit: int | None = None) -> list[str]:
    """Run a reprocess job a request started (``job_id``), or (the nightly run, no job) start
    and run one for every tenant with a default model."""
    rt = runtime_for(self.app)
    try:
        if job_id is not None:
            run_reprocess(rt, self.app.send_task, job_id)
            return [job_id]
        plans = reprocess_tenants(rt, self.app.send_task, None, model_id, limit)
    except TRANSIENT as exc:
        retry(self, exc)
    return [p.job_id for p in plans if p.started and p.job_id]


@shared_task(name=TASK_SWEEP, bind=True)
def sweep(self) -> None:  # type: ignore[no-untyped-def]
    """Send again what stale jobs lost, and fill the dispatch window (a message lost between
    the dispatcher's commit and the broker left room there)."""
    rt = runtime_for(self.app)
    resend(rt, find_stale(rt), self.app.send_task)


@shared_task(name=TASK_WEBHOOKS, bind=True)
def webhooks(self) -> int:  # type: ignore[no-untyped-def]
    return deliver_due(runtime_for(self.app))


@shared_task(name=TASK_INDEX_MERGE, bind=True, max_retries=MAX_RETRIES)
def index_merge(self, index_id: int | None = None) -> int:  # type: ignore[no-untyped-def]
    """Merge one index's appended segments (None: every index that has some)."""
    rt = runtime_for(self.app)
    try:
        return merge_all(rt) if index_id is None else merge_index(rt, index_id)
    except TRANSIENT as exc:
        retry(self, exc)
        return 0
