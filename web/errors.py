"""One JSON error shape for the whole API: ``{"error": {"code": …, "message": …}}``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from store.blobs import BlobStoreUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, **extra: Any):  # type: ignore[no-untyped-def]
    body = {"error": {"code": code, "message": message, **extra}}
    return jsonify(body), status


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):  # type: ignore[no-untyped-def]
        body, status = error_response(exc.status, exc.code, exc.message, **exc.extra)
        body.headers.update(exc.headers)
        return body, status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        code = (exc.name or "error").lower().replace(" ", "_")
        body, status = error_response(exc.code or 500, code, exc.description or exc.name)
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            body.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return body, status

    @app.errorhandler(OperationalError)
    def _db_down(exc: OperationalError):  # type: ignore[no-untyped-def]
        log.warning("database_unavailable error=%s", exc.orig)
        return error_response(503, "database_unavailable",
                              "the database is unavailable; try again shortly")

    @app.errorhandler(BlobStoreUnavailable)
    def _blobs_down(exc: BlobStoreUnavailable):  # type: ignore[no-untyped-def]
        log.warning("blob_storage_unavailable error=%s", exc)
        return error_response(503, "storage_unavailable",
                              "blob storage is unavailable; try again shortly")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled_error")
        return error_response(500, "internal_error", "an internal error occurred")
