"""The HTTP server of a worker's Prometheus metrics (``worker.metrics``), on
``MMBATCH_WORKER_METRICS_PORT``.

It is a Celery bootstep of the worker (``install(app)``), started in the worker's main process.
mmbatch runs workers with the solo pool (one model load, one batch at a time), so tasks run in
that same process and one registry holds everything; a prefork pool's children would count in
their own memory, unseen here (run more solo workers instead: one port each).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from prometheus_client import start_http_server

from mmbatch.contract import INGEST_QUEUE, MODEL_QUEUE
from worker.metrics import ModelLoadCollector, QueueDepthCollector
from worker.runtime import runtime_for

log = logging.getLogger(__name__)


class MetricsServer(bootsteps.StartStopStep):
    """Serves the worker's metrics over HTTP while the worker runs (port 0: not at all)."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.server: Any = None

    def start(self, worker: Any) -> None:
        app = worker.app
        port = app.mmbatch_settings.worker_metrics_port
        if not port:
            return
        rt = runtime_for(app)
        registry = rt.metrics.registry
        registry.register(ModelLoadCollector(rt))
        registry.register(QueueDepthCollector(app, (INGEST_QUEUE, MODEL_QUEUE)))
        try:
            self.server, _thread = start_http_server(port, registry=registry)
        except OSError as exc:  # another process has the port: run on, without metrics
            log.error("metrics_unavailable port=%d error=%s", port, exc)
            return
        log.info("metrics_serving port=%d", port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def install(app: Any) -> None:
    """Add the metrics server to the workers of ``app``."""
    app.steps["worker"].add(MetricsServer)
