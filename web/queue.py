"""The broker as the API sees it: a Celery app that only sends tasks, by the names the
vocabulary gives them (``mmbatch.contract``), so the API process never imports the worker (nor
torch)."""

from __future__ import annotations

from celery import Celery

from mmbatch.settings import Settings


def producer(settings: Settings) -> Celery:
    """A Celery app configured like the workers' (``Settings.celery_config``), without tasks."""
    app = Celery("mmbatch", set_as_current=False)
    app.conf.update(**settings.celery_config())
    return app
