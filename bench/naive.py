"""Measurement (c), the naive design: one Celery task per item, the model cached, no batching.

A bench-only Celery app on its own queue, run by a real worker process
(``celery -A bench.naive_app worker --pool solo -Q naive``). ``bench.naive_ingest`` walks the
archive with the service's own ingest, then sends one ``bench.naive_item`` per item; each runs
the service's ``BatchProcessor`` on that one item. Everything else (runtime, encoders loaded
once per process, feature cache, database writes, job counters) is the service's, so the
difference from (b) is the batching alone.
"""

from __future__ import annotations

import sys

from celery import Celery, shared_task

from mmbatch.settings import Settings
from worker.app import create_celery
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.runtime import runtime_for

NAIVE_QUEUE = "naive"
TASK_NAIVE_INGEST = "bench.naive_ingest"
TASK_NAIVE_ITEM = "bench.naive_item"


def create_naive_celery(settings: Settings) -> Celery:
    app = create_celery(settings)
    app.conf.include = [*app.conf.include, "bench.naive"]
    app.conf.task_routes = {**app.conf.task_routes,
                            TASK_NAIVE_INGEST: {"queue": NAIVE_QUEUE},
                            TASK_NAIVE_ITEM: {"queue": NAIVE_QUEUE}}
    return app


def worker_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "bench.naive_app", "worker",
            "--pool", "solo", "-Q", NAIVE_QUEUE, "-n", "naive@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle"]


@shared_task(name=TASK_NAIVE_INGEST, bind=True)
def naive_ingest(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    rt = runtime_for(self.app)
    for batch in ingest_job(rt, job_id):
        for item_id in batch:
            self.app.send_task(TASK_NAIVE_ITEM, args=[job_id, item_id])


@shared_task(name=TASK_NAIVE_ITEM, bind=True)
def naive_item(self, job_id: str, item_id: int) -> None:  # type: ignore[no-untyped-def]
    BatchProcessor(runtime_for(self.app), job_id, [item_id]).run()
