"""The search service: :class:`worker.searcher.Searcher` over HTTP, for the API.

``POST /search`` takes a JSON query (``worker.searcher.Query``), or a multipart form with the
query as a ``request`` field and the example as a ``file``; it answers the hits as JSON, or
``{"error": {"code", "message"}}`` with the status the API should pass on. ``GET /healthz``
says whether the encoders are warm. Internal: it trusts the tenant the API names, so it
listens on a private address (``mmbatch searcher``, which ``mmbatch up`` starts on
MMBATCH_SEARCH_PORT) and several of them scale out behind the API (MMBATCH_SEARCH_URL lists
them). One process per machine holds the encoders and indexes once, for all its threads.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, jsonify, request

from mmbatch.settings import Settings
from worker.searcher import Query, Searcher, SearchError

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024**2


def create_search_app(settings: Settings | None = None, start: bool = True) -> Flask:
    """The service's WSGI app; ``start`` warms the searcher up in the background."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_FILE_BYTES + 1024**2
    searcher = Searcher(settings)
    app.extensions["searcher"] = searcher
    if start:
        searcher.start()

    @app.post("/search")
    def search():  # type: ignore[no-untyped-def]
        try:
            file = None
            if request.mimetype == "multipart/form-data":
                body: Any = json.loads(request.form.get("request") or "{}")
                upload = request.files.get("file")
                if upload is not None:
                    file = (upload.read(), upload.filename or "")
            else:
                body = request.get_json(silent=True) or {}
            return jsonify(searcher.search(Query.of(body), file))
        except SearchError as exc:
            return jsonify({"error": {"code": exc.code, "message": exc.message}}), exc.status
        except json.JSONDecodeError:
            return jsonify({"error": {"code": "invalid_request",
                                      "message": "request is not JSON"}}), 400

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        return jsonify({"status": "ok", "encoders": sorted(searcher.models.load_seconds)})

    return app
