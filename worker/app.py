"""The Celery app factory of the workers and beat.

Importing this module loads neither torch nor the task modules; worker processes import the
tasks through ``include``: ``worker.ingest_tasks`` (torch-free) and ``worker.model_tasks``.
``entry_app`` is what the entry points (``worker.celery_app``, ``worker.ingest_app``) build.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import worker_process_init
from kombu.transport import sqlalchemy as sqlite_transport

from mmbatch.contract import TASK_INDEX_MERGE, TASK_REPROCESS, TASK_SWEEP, TASK_WEBHOOKS
from mmbatch.settings import Settings
from worker.metrics_server import install as install_metrics

INGEST_TASK_MODULES = ("worker.ingest_tasks",)  # torch-free: the ingest queue, beat, Flower
TASK_MODULES = (*INGEST_TASK_MODULES, "worker.model_tasks")
WEBHOOK_INTERVAL_SECONDS = 5.0
INDEX_MERGE_INTERVAL_SECONDS = 300.0  # segments a batch did not ask to merge wait at most this
# How often an idle worker looks for messages in the SQLite broker. kombu's default, 1 s, is paid
# at every hop of a job (ingest, the reprocess planner): a second of a short job's time. kombu's
# SQLAlchemy transport hands every transport option to create_engine, so the interval cannot go
# in broker_transport_options; it is a class attribute of the transport.
SQLITE_POLL_SECONDS = 0.1


def beat_schedule(settings: Settings) -> dict[str, Any]:
    """Nightly reprocessing at MMBATCH_REPROCESS_CRON (UTC), the stale-job sweeper, webhooks,
    and the merge of search-index segments that no batch asked to merge."""
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
        "merge-index-segments": {"task": TASK_INDEX_MERGE,
                                 "schedule": INDEX_MERGE_INTERVAL_SECONDS,
                                 "options": {"expires": INDEX_MERGE_INTERVAL_SECONDS}},
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


# Beat sends these every few seconds; their lines say something only when they did something.
HOUSEKEEPING = frozenset({TASK_WEBHOOKS, TASK_SWEEP})


class QuietHousekeeping(logging.Filter):
    """Drops Celery's INFO lines about housekeeping tasks (beat sending one, a worker receiving
    one, one that did nothing: returned 0 or None); what they do they log themselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)  # celery.app.trace and celery.worker.strategy
        if isinstance(data, dict) and data.get("name") in HOUSEKEEPING:
            return str(data.get("return_value", "0")) not in ("0", "None")
        args = record.args  # (a filter that raised would take beat down with it)
        return not (record.name == "celery.beat" and isinstance(args, tuple) and len(args) == 2
                    and isinstance(args[1], str) and args[1] in HOUSEKEEPING)


def entry_app(tasks: tuple[str, ...] = TASK_MODULES) -> Celery:
    """The app of a ``celery -A`` entry point: settings from the environment, the metrics server
    on MMBATCH_WORKER_METRICS_PORT, quiet housekeeping in the logs, and a forked pool child
    dropping the connections it inherited (the solo pool never forks)."""
    app = create_celery(Settings.from_env(), tasks)
    install_metrics(app)
    for name in ("celery.app.trace", "celery.worker.strategy", "celery.beat"):
        logging.getLogger(name).addFilter(QuietHousekeeping())

    def after_fork(**_: object) -> None:
        rt = getattr(app, "mmbatch_runtime", None)
        if rt is not None:
            rt.after_fork()

    worker_process_init.connect(after_fork, weak=False)
    return app
