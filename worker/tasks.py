"""Celery tasks: thin adapters from a message (ids only) to the plain functions that do the work.

A transient fault (database or storage briefly unreachable) is retried with exponential backoff;
anything else is recorded where the client sees it (the job's error, or the batch's items as
failed with the reason) and then re-raised, so no job is left running for ever.
"""

from __future__ import annotations

import logging

from celery import current_app, shared_task
from celery.signals import worker_process_init
from sqlalchemy.exc import DBAPIError, OperationalError

from store import jobs
from worker.app import TASK_INGEST, TASK_PROCESS_BATCH, TASK_TRAIN
from worker.ingest import ingest_job
from worker.pipeline import fail_batch
from worker.pipeline import process_batch as run_batch
from worker.runtime import runtime_for
from worker.training import train_job

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, DBAPIError, ConnectionError, TimeoutError)
MAX_RETRIES = 8


def _backoff(retries: int) -> float:
    return float(min(300, 2 ** retries))


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
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries))
    except Exception as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, f"ingest failed: {type(exc).__name__}: {exc}")
        raise
    for ids in batches:
        self.app.send_task(TASK_PROCESS_BATCH, args=[job_id, ids])
    log.info("job_fanout job=%s batches=%d", job_id, len(batches))


@shared_task(name=TASK_PROCESS_BATCH, bind=True, max_retries=MAX_RETRIES)
def process_batch(self, job_id: str, item_ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    try:
        report = run_batch(rt, job_id, item_ids)
    except TRANSIENT as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries))
    except Exception as exc:
        log.exception("batch_error job=%s items=%d", job_id, len(item_ids))
        report = fail_batch(rt, job_id, item_ids,
                            f"processing failed: {type(exc).__name__}: {exc}")
        if report.next_step == "train":
            self.app.send_task(TASK_TRAIN, args=[job_id])
        raise
    if report.next_step == "train":
        self.app.send_task(TASK_TRAIN, args=[job_id])


@shared_task(name=TASK_TRAIN, bind=True, max_retries=MAX_RETRIES)
def train(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    try:
        train_job(rt, job_id)
    except TRANSIENT as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries))
    except Exception as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, f"training failed: {type(exc).__name__}: {exc}")
        raise
