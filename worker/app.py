"""The Celery app factory.

Importing this module loads neither torch nor the task modules, so the web process can use the
same factory to enqueue tasks by name. Worker processes import ``worker.tasks`` through
``include``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from mmbatch.settings import Settings

INGEST_QUEUE = "ingest"
MODEL_QUEUE = "model"

TASK_INGEST = "mmbatch.ingest"
TASK_PROCESS_BATCH = "mmbatch.process_batch"
TASK_TRAIN = "mmbatch.train"


def create_celery(settings: Settings) -> Celery:
    app = Celery("mmbatch", include=["worker.tasks"])
    transport_options: dict[str, Any] = {}
    if settings.broker.startswith("sqla+sqlite"):
        # kombu passes these to create_engine: a long busy timeout, since the web and the
        # worker both write to the SQLite broker file.
        transport_options["connect_args"] = {"timeout": 60}
    app.conf.update(
        broker_url=settings.broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=MODEL_QUEUE,
        task_routes={
            TASK_INGEST: {"queue": INGEST_QUEUE},
            TASK_PROCESS_BATCH: {"queue": MODEL_QUEUE},
            TASK_TRAIN: {"queue": MODEL_QUEUE},
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    app.mmbatch_settings = settings  # type: ignore[attr-defined]
    return app
