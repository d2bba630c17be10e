"""What one worker process holds for every task: its settings, database, blob store and metrics.

Torch-free: the ingest side of the worker (archive walking, planning, webhooks) runs on this
alone. The model side keeps its encoders and classifiers in a :class:`worker.model_cache.
ModelCache`, which it attaches here on first use (``models``), so one process has one of each.
``after_fork`` drops connections inherited from the parent.
"""

from __future__ import annotations

import threading
from typing import Any

from mmbatch.settings import Settings
from store.blobstore import open_blob_store
from store.db import Database
from worker.metrics import WorkerMetrics


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.db_url)
        self.blobs = open_blob_store(settings)
        self.metrics = WorkerMetrics()  # counted here, served by worker.metrics_server
        self.lock = threading.Lock()
        self.models: Any = None  # the model side's ModelCache, once a model task has run

    def after_fork(self) -> None:
        self.db.dispose()
        if self.models is not None:
            self.models.after_fork()

    def close(self) -> None:
        if self.models is not None:
            self.models.close()
        self.db.dispose()


_runtime_lock = threading.Lock()


def runtime_for(app: Any) -> Runtime:
    """The process's runtime for a Celery app built by ``worker.app.create_celery``."""
    with _runtime_lock:
        rt = getattr(app, "mmbatch_runtime", None)
        if rt is None:
            rt = app.mmbatch_runtime = Runtime(app.mmbatch_settings)
        return rt
