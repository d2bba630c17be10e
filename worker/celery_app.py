"""Entry point for ``celery -A worker.celery_app worker`` (and ``beat``): the one module that
builds at import."""

import logging

from celery.signals import worker_process_init

from mmbatch.contract import TASK_SWEEP, TASK_WEBHOOKS
from mmbatch.settings import Settings
from worker.app import create_celery
from worker.metrics_server import install as install_metrics

app = create_celery(Settings.from_env())
install_metrics(app)  # /metrics on MMBATCH_WORKER_METRICS_PORT

# Beat sends these every few seconds; their lines say something only when they did something.
HOUSEKEEPING = frozenset({TASK_WEBHOOKS, TASK_SWEEP})


class QuietHousekeeping(logging.Filter):
    """Drops Celery's INFO lines about housekeeping tasks (beat sending one, a worker receiving
    one, one that did nothing: returned 0 or None); what they do they log themselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)  # celery.app.trace and celery.worker.strategy
        if isinstance(data, dict) and data.get("name") in HOUSEKEEPING:
            return str(data.get("return_value", "0")) not in ("0", "None")
        args = record.args
        return not (record.name == "celery.beat" and isinstance(args, tuple) and len(args) == 2
                    and args[1] in HOUSEKEEPING)


for _name in ("celery.app.trace", "celery.worker.strategy", "celery.beat"):
    logging.getLogger(_name).addFilter(QuietHousekeeping())


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    """A forked pool child drops the connections it inherited (the solo pool never forks)."""
    rt = getattr(app, "mmbatch_runtime", None)
    if rt is not None:
        rt.after_fork()
