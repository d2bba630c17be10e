"""Entry point for ``celery -A worker.celery_app worker``: the one module that builds at import."""

from mmbatch.settings import Settings
from worker.app import create_celery

app = create_celery(Settings.from_env())
