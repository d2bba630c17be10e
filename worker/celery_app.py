"""Entry point for ``celery -A worker.celery_app worker``: the one module that builds at import."""

from celery.signals import worker_process_init

from mmbatch.settings import Settings
from worker.app import create_celery
from worker.metrics_server import install as install_metrics

app = create_celery(Settings.from_env())
install_metrics(app)  # /metrics on MMBATCH_WORKER_METRICS_PORT


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    """A forked pool child drops the connections it inherited (the solo pool never forks)."""
    rt = getattr(app, "mmbatch_runtime", None)
    if rt is not None:
        rt.after_fork()
