"""The Flask app factory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Flask

from mmbatch.settings import Settings
from store.blobs import Blobs, open_blob_store
from store.db import Database
from web import errors
from web.auth import RateLimiter
from web.uploads import StreamingRequest, discard_uploads


@dataclass
class Services:
    settings: Settings
    db: Database
    blobs: Blobs
    celery: Any
    limiter: RateLimiter


def create_app(settings: Settings | None = None, *, celery: Any = None) -> Flask:
    settings = settings or Settings.from_env()
    if celery is None:
        from worker.app import create_celery  # the factory only: no tasks, no torch

        celery = create_celery(settings)
    app = Flask(__name__)
    app.request_class = StreamingRequest
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["mmbatch"] = Services(
        settings, Database(settings.db_url), open_blob_store(settings), celery,
        RateLimiter(settings.rate_limit_per_minute, settings.broker_url or None,
                    settings.broker_prefix))
    errors.register(app)
    app.teardown_request(discard_uploads)
    from web.metrics import init_app as init_metrics

    init_metrics(app)  # /metrics

    from web.api import api, health

    app.register_blueprint(health)
    app.register_blueprint(api)
    from web.models_api import models_api

    app.register_blueprint(models_api)
    from web.openapi import openapi

    app.register_blueprint(openapi)  # /api/v1/openapi.json, no API key
    from web.dashboard import init_app as init_dashboard

    init_dashboard(app, settings)
    return app
