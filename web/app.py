"""The Flask app factory."""

from __future__ import annotations

from flask import Flask

from mmbatch.settings import Settings
from store.blobstore import open_blob_store
from store.db import Database
from web import dashboard, errors, metrics
from web.api import api, health
from web.direct_uploads import direct_api
from web.auth import RateLimiter
from web.labels_api import labels_api
from web.models_api import models_api
from web.openapi import openapi
from web.queue import producer
from web.resumable import uploads_api
from web.search_api import search_api
from web.search_client import SearchClient
from web.service import Services
from web.uploads import StreamingRequest, discard_uploads


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.request_class = StreamingRequest
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["mmbatch"] = Services(
        settings, Database(settings.db_url), open_blob_store(settings), producer(settings),
        RateLimiter(settings.rate_limit_per_minute, settings.broker_url or None,
                    settings.broker_prefix), SearchClient(settings.search_urls))
    errors.register(app)
    app.teardown_request(discard_uploads)
    metrics.init_app(app)  # /metrics
    app.register_blueprint(health)
    app.register_blueprint(api)
    app.register_blueprint(models_api)
    app.register_blueprint(labels_api)
    app.register_blueprint(search_api)
    app.register_blueprint(uploads_api)
    app.register_blueprint(direct_api)
    app.register_blueprint(openapi)  # /api/v1/openapi.json, no API key
    dashboard.init_app(app, settings)
    return app
