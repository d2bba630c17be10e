"""Celery tasks: thin adapters from a message (ids only) to the plain functions that do the work.

A transient fault (database, broker or storage briefly unreachable) is retried with exponential
backoff up to a ceiling; anything else is recorded where the client sees it (the job's error, or
the batch's items as failed with the reason) and then re-raised, so no job is left running.

Poison items: a batch whose worker died (crash, kill, time limit) is delivered again, because
tasks are acknowledged late and rejected on worker loss. Each delivery counts an attempt on the
batch's pending items first; a batch delivered again is split in halves, so the item that kills
workers ends up alone, and once alone past ``MMBATCH_POISON_LIMIT`` attempts it is marked failed
with the reason while the rest of the job goes on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import current_app, shared_task
from celery.signals import worker_process_init
from sqlalchemy.exc import DBAPIError, OperationalError

from store import jobs
from worker import reprocess as reprocessing
from worker.app import (TASK_INGEST, TASK_PROCESS_BATCH, TASK_REPROCESS, TASK_SWEEP, TASK_TRAIN,
                        TASK_WEBHOOKS)
from worker.ingest import ingest_job
from worker.pipeline import fail_batch
from worker.pipeline import process_batch as run_batch
from worker.runtime import Runtime, runtime_for
from worker.sweeper import sweep as find_stale
from worker.training import train_job
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, DBAPIError, ConnectionError, TimeoutError, OSError)
MAX_RETRIES = 10


def _backoff(retries: int) -> float:
    return float(min(300, 2 ** retries))


def _retry(task: Any, exc: BaseException) -> None:
    log.warning("transient_error task=%s retry=%d error=%s", task.name, task.request.retries, exc)
    raise task.retry(exc=exc, countdown=_backoff(task.request.retries))


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    rt = getattr(current_app, "mmbatch_runtime", None)
    if rt is not None:
        rt.after_fork()


@shared_task(name=TASK_INGEST, bind=True, max_retries=MAX_RETRIES)
def ingest(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    try:
        batches = ingest_job(rt, job_id)
    except TRANSIENT as exc:
        _retry(self, exc)
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


@shared_task(name=TASK_PROCESS_BATCH, bind=True, max_retries=MAX_RETRIES)
def process_batch(self, job_id: str, item_ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    try:
        pending = _count_attempt(rt, self, job_id, item_ids)
        if pending is None:
            return
        report = run_batch(rt, job_id, pending)
    except TRANSIENT as exc:
        _retry(self, exc)
    except Exception as exc:
        log.exception("batch_error job=%s items=%d", job_id, len(item_ids))
        report = fail_batch(rt, job_id, item_ids,
                            f"processing failed: {type(exc).__name__}: {exc}")
        _after_batch(self, job_id, report)
        raise
    _after_batch(self, job_id, report)


def _count_attempt(rt: Runtime, task: Any, job_id: str, item_ids: list[int]) -> list[int] | None:
    """Count this delivery; split or fail a batch that has killed workers before."""
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "running":
            return None
        ids = jobs.pending_among(s, job, item_ids)
        if not ids:
            return None
        deliveries = jobs.add_delivery(s, ids)
    if deliveries <= 1:
        return _maybe_crash(rt, job_id, ids)
    if len(ids) > 1:
        half = len(ids) // 2
        log.warning("batch_split job=%s items=%d deliveries=%d", job_id, len(ids), deliveries)
        with rt.db.session() as s:  # each half starts counting afresh
            jobs.reset_deliveries(s, ids)
        for part in (ids[:half], ids[half:]):
            task.app.send_task(TASK_PROCESS_BATCH, args=[job_id, part])
        return None
    if deliveries > rt.settings.poison_limit:
        log.warning("poison_item job=%s item=%s deliveries=%d", job_id, ids[0], deliveries)
        report = fail_batch(rt, job_id, ids,
                            f"the worker processing this item crashed or timed out "
                            f"{deliveries - 1} times; giving up")
        _after_batch(task, job_id, report)
        return None
    return _maybe_crash(rt, job_id, ids)


def _maybe_crash(rt: Runtime, job_id: str, ids: list[int]) -> list[int]:
    """Fault injection for tests (MMBATCH_FAULT_CRASH_KEY): die as a C library fault would."""
    crash = rt.settings.fault_crash_key
    if crash:
        with rt.db.session() as s:
            hit = any(crash in it.key for it in jobs.items_by_id(s, ids))
        if hit:
            log.error("fault_injection crash_key=%r job=%s", crash, job_id)
            os._exit(70)
    return ids


def _after_batch(task: Any, job_id: str, report: Any) -> None:
    if report.next_step == "train":
        task.app.send_task(TASK_TRAIN, args=[job_id])
    elif report.completed:
        task.app.send_task(TASK_WEBHOOKS)


@shared_task(name=TASK_TRAIN, bind=True, max_retries=MAX_RETRIES)
def train(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    try:
        train_job(rt, job_id)
    except TRANSIENT as exc:
        _retry(self, exc)
    except Exception as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, f"training failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        self.app.send_task(TASK_WEBHOOKS)


@shared_task(name=TASK_REPROCESS, bind=True, max_retries=MAX_RETRIES)
def reprocess(self, tenant_id: int | None = None, model_id: int | None = None,  # type: ignore[no-untyped-def]
              limit: int | None = None, all_tenants: bool = True) -> list[str]:
    """Start reprocess jobs: for one tenant, or (the nightly run) for every tenant with a model."""
    rt = runtime_for(self.app)
    started = []
    try:
        tenants = reprocessing.tenants_with_models(rt) if all_tenants else [tenant_id]
        for tenant in tenants:
            result = reprocessing.start(rt, tenant, model_id, limit)
            log.info("reprocess tenant=%s job=%s items=%d reason=%s", tenant, result.job_id,
                     result.items, result.reason)
            if result.reason == "started" and result.job_id:
                started.append(result.job_id)
                with rt.db.session() as s:
                    ids = jobs.item_ids(s, result.job_id)
                size = rt.settings.batch_size
                for i in range(0, len(ids), size):
                    self.app.send_task(TASK_PROCESS_BATCH, args=[result.job_id, ids[i:i + size]])
    except TRANSIENT as exc:
        _retry(self, exc)
    return started


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
