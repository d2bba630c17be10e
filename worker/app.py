"""The Celery app factory of the workers and beat.

Importing this module loads neither torch nor the task modules; worker processes import the
tasks through ``include``: ``worker.ingest_tasks`` (torch-free) and ``worker.model_tasks``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.schedules import crontab
from kombu.transport import sqlalchemy as sqlite_transport

from mmbatch.contract import TASK_REPROCESS, TASK_SWEEP, TASK_WEBHOOKS
from mmbatch.settings import Settings

TASK_MODULES = ("worker.ingest_tasks", "worker.model_tasks")
WEBHOOK_INTERVAL_SECONDS = 5.0
# How often an idle worker looks for messages in the SQLite broker. kombu's default, 1 s, is paid
# at every hop of a job (ingest, the reprocess planner): a second of a short job's time. kombu's
# SQLAlchemy transport hands every transport option to create_engine, so the interval cannot go
# in broker_transport_options; it is a class attribute of the transport.
SQLITE_POLL_SECONDS = 0.1


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


def create_celery(settings: Settings, tasks: tuple[str, ...] = TASK_MODULES) -> Celery:
    app = Celery("mmbatch", include=list(tasks))
    if settings.broker.startswith("sqla+sqlite"):
        sqlite_transport.Transport.polling_interval = SQLITE_POLL_SECONDS
    app.conf.update(
        **settings.celery_config(),
        beat_schedule=beat_schedule(settings),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.mmbatch_settings = settings  # type: ignore[attr-defined]
    return app
