"""The model side's Celery tasks: process a batch, train. Thin adapters from a message (ids
only) to ``BatchProcessor(...).run()`` and ``train_job``; a failure that is not transient is
recorded where the client sees it (the batch's items as failed with the reason, the job's
error), then re-raised, so no job is left running."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import shared_task
from celery.exceptions import Reject

from mmbatch.contract import (
    STEP_TASKS,
    TASK_ALIGN,
    TASK_INDEX_BUILD,
    TASK_INDEX_MERGE,
    TASK_PROCESS_BATCH,
    TASK_TRAIN,
    TASK_WEBHOOKS,
)
from store import dispatch as plans
from store import jobs
from store import search as search_store
from worker.align import align_job
from worker.batch import BatchProcessor, BatchReport, fail_batch
from worker.dispatch import dispatch
from worker.index_build import build_index
from worker.retries import MAX_RETRIES, TRANSIENT, retry
from worker.runtime import Runtime, runtime_for
from worker.adaptation import train_step
from worker.training import TrainingInterrupted

log = logging.getLogger(__name__)


@shared_task(name=TASK_PROCESS_BATCH, bind=True, max_retries=MAX_RETRIES)
def process_batch(self, job_id: str, item_ids: list[int],  # type: ignore[no-untyped-def]
                  batch_id: int | None = None) -> None:
    """Process a planned batch (``batch_id``; a message from before batches were planned has
    none), mark it done, and let the dispatcher send the next."""
    rt = runtime_for(self.app)
    try:
        report = BatchProcessor(rt, job_id, item_ids).run()
    except TRANSIENT as exc:
        retry(self, exc)
    except Exception as exc:
        log.exception("batch_error job=%s items=%d", job_id, len(item_ids))
        _follow_up(self, rt, job_id, batch_id,
                   fail_batch(rt, job_id, item_ids,
                              f"processing failed: {type(exc).__name__}: {exc}"))
        raise
    try:
        _follow_up(self, rt, job_id, batch_id, report)
    except TRANSIENT as exc:  # the batch's results are in: a retry counts nothing twice
        retry(self, exc)


def _follow_up(task: Any, rt: Runtime, job_id: str, batch_id: int | None,
               report: BatchReport) -> None:
    """The batch is done: plan its halves (a poison item splits it), send the training or the
    webhooks it asks for, and fill the dispatch window again."""
    with rt.db.session() as s:
        if batch_id is not None:
            plans.finish(s, batch_id)
        plans.plan_parts(s, job_id, report.resend)
    dispatch(rt, task.app.send_task)
    if report.merge_index is not None:
        task.app.send_task(TASK_INDEX_MERGE, args=[report.merge_index])
    if report.next_step in STEP_TASKS:
        task.app.send_task(STEP_TASKS[report.next_step], args=[job_id])
    elif report.completed:
        task.app.send_task(TASK_WEBHOOKS)


@shared_task(name=TASK_TRAIN, bind=True, max_retries=MAX_RETRIES)
def train(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    _training_task(self, job_id, train_step, "training")


@shared_task(name=TASK_ALIGN, bind=True, max_retries=MAX_RETRIES)
def align(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    """Train an aligner for an align job (or score one, for an evaluation), then build the new
    aligner's index."""
    model_id = _training_task(self, job_id, align_job, "alignment")
    if model_id is not None:
        self.app.send_task(TASK_INDEX_BUILD, args=[model_id])


def _training_task(task: Any, job_id: str, run: Callable[[Runtime, str], int | None],
                   what: str) -> int | None:
    """Run a job's training stage (``run``) in a task: back to the broker when the worker is
    stopping (kombu's SQLAlchemy transport would otherwise keep the message only in this
    process's memory until it dies), retried on a transient error, the job failed on any
    other; webhooks sent in every case. The id of the model it registered, or None."""
    rt = runtime_for(task.app)
    try:
        return run(rt, job_id)
    except TrainingInterrupted as exc:
        log.info("%s_requeued job=%s", what, job_id)
        raise Reject(str(exc), requeue=True) from exc
    except TRANSIENT as exc:
        retry(task, exc)
    except Exception as exc:
        with rt.db.session() as s:
            jobs.fail_job(s, job_id, f"{what} failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        task.app.send_task(TASK_WEBHOOKS)


@shared_task(name=TASK_INDEX_BUILD, bind=True, max_retries=MAX_RETRIES)
def index_build(self, model_id: int) -> None:  # type: ignore[no-untyped-def]
    """Build an aligner's index beside the serving one and switch when it is the default."""
    rt = runtime_for(self.app)
    try:
        build_index(rt, model_id)
    except TRANSIENT as exc:
        retry(self, exc)
    except Exception as exc:
        with rt.db.session() as s:
            index = search_store.index_of(s, model_id)
            if index is not None:
                search_store.fail_index(s, index.id, f"{type(exc).__name__}: {exc}")
        raise
