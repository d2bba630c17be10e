"""The Celery app factory.

Importing this module loads neither torch nor the task modules, so the web process can use the
same factory to enqueue tasks by name. Worker processes import ``worker.tasks`` through
``include``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.schedules import crontab

from mmbatch.settings import Settings

INGEST_QUEUE = "ingest"
MODEL_QUEUE = "model"

TASK_INGEST = "mmbatch.ingest"
TASK_PROCESS_BATCH = "mmbatch.process_batch"
TASK_TRAIN = "mmbatch.train"
TASK_REPROCESS = "mmbatch.reprocess"
TASK_SWEEP = "mmbatch.sweep"
TASK_WEBHOOKS = "mmbatch.webhooks"
WEBHOOK_INTERVAL_SECONDS = 5.0


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Nightly reprocessing at MMBATCH_REPROCESS_CRON (UTC), the stale-job sweeper, webhooks."""
    fields = settings.reprocess_cron.split()
    if len(fields) != 5:
        raise ValueError(f"MMBATCH_REPROCESS_CRON must have 5 fields, got {settings.reprocess_cron!r}")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return {
        "reprocess-nightly": {"task": TASK_REPROCESS,
                              "schedule": crontab(minute=minute, hour=hour,
                                                  day_of_month=day_of_month,
                                                  month_of_year=month_of_year,
                                                  day_of_week=day_of_week)},
        # Housekeeping that waited too long in the queue is pointless: it expires.
        "sweep-stale-jobs": {"task": TASK_SWEEP, "schedule": float(settings.sweep_interval_seconds),
                             "options": {"expires": float(settings.sweep_interval_seconds)}},
        "deliver-webhooks": {"task": TASK_WEBHOOKS, "schedule": WEBHOOK_INTERVAL_SECONDS,
                             "options": {"expires": 60.0}},
    }


# How often an idle worker looks for messages in the SQLite broker. kombu's default, 1 s, is paid
# at every hop of a job (ingest, the reprocess planner): a second of a short job's time.
SQLITE_POLL_SECONDS = 0.1


def _poll_sqlite_broker_often() -> None:
    # kombu's SQLAlchemy transport hands every transport option to create_engine, so the
    # interval cannot go in broker_transport_options; it is a class attribute of the transport.
    from kombu.transport import sqlalchemy

    sqlalchemy.Transport.polling_interval = SQLITE_POLL_SECONDS


def create_celery(settings: Settings) -> Celery:
    app = Celery("mmbatch", include=["worker.tasks"])
    transport_options: dict[str, Any] = {}
    if settings.broker.startswith("sqla+sqlite"):
        # kombu passes these to create_engine: a long busy timeout, since the web and the
        # worker both write to the SQLite broker file.
        transport_options["connect_args"] = {"timeout": 60}
        _poll_sqlite_broker_often()
    if settings.broker_prefix and settings.broker.startswith(("redis://", "rediss://")):
        transport_options["global_keyprefix"] = settings.broker_prefix
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
            TASK_REPROCESS: {"queue": INGEST_QUEUE},
            TASK_SWEEP: {"queue": INGEST_QUEUE},
            TASK_WEBHOOKS: {"queue": INGEST_QUEUE},
        },
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    app.mmbatch_settings = settings  # type: ignore[attr-defined]
    return app
