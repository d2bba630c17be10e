"""Entry point for ``celery -A worker.celery_app worker``: the one module that builds at import."""

from mmbatch.settings import Settings
from worker.app import create_celery
from worker.metrics import install as install_metrics

app = create_celery(Settings.from_env())
install_metrics(app)  # /metrics on MMBATCH_WORKER_METRICS_PORT
