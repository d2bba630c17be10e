"""Prometheus metrics of the web process: requests and their latency by route and status, served
at ``/metrics`` (no API key: expose it to the monitoring network only).

Under gunicorn with several worker processes each process counts its own requests; the gunicorn
settings every mmbatch web server uses (``web.gunicorn_conf``) turn on prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), and ``/metrics``, whichever process answers
it, adds up the files all of them write. Without that variable (tests, a plain WSGI server) the
process's own registry is served.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
UNMATCHED = "<unmatched>"  # 404s by any path: one label value, not one per path tried


class WebMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmbatch_http_requests", "HTTP requests answered, by route and status",
            ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram(
            "mmbatch_http_request_duration_seconds",
            "Seconds until the response starts (a streamed body is not timed to its end)",
            ["method", "route", "status"], buckets=BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def init_app(app: Flask) -> WebMetrics:
    metrics = WebMetrics()
    app.extensions["mmbatch_metrics"] = metrics

    @app.before_request
    def _start() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        started = g.pop("metrics_started", None)
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        labels = (request.method, route, str(response.status_code))
        metrics.requests.labels(*labels).inc()
        if started is not None:
            metrics.latency.labels(*labels).observe(time.perf_counter() - started)
        return response

    def scrape() -> Response:
        return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", scrape, methods=["GET"])
    return metrics
