"""What one worker process holds: database, blob store, encoders and classifiers, loaded once.

Models load lazily on first use, under a lock, after the fork; ``after_fork`` drops connections
inherited from the parent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmbatch.settings import Settings
from store.blobs import BlobStore
from store.db import Database

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.db_url)
        self.blobs = BlobStore(settings.blobs)
        self._lock = threading.Lock()
        self._encoders: dict[str, Any] = {}
        self._classifiers: dict[int, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._device: Any = None
        self.load_seconds: dict[str, float] = {}

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Threads that decode and preprocess media while the model runs."""
        with self._lock:
            if self._pool is None:
                workers = max(2, min(8, (os.cpu_count() or 2)))
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
            return self._pool

    @property
    def device(self) -> Any:
        with self._lock:
            if self._device is None:
                import torch

                from models.device import pick_device

                if self.settings.torch_threads > 0:
                    torch.set_num_threads(self.settings.torch_threads)
                self._device = pick_device(self.settings.device)
            return self._device

    def encoder(self, modality: str) -> Any:
        device = self.device
        with self._lock:
            if modality not in self._encoders:
                from models.registry import build_encoder

                started = time.perf_counter()
                self._encoders[modality] = build_encoder(modality, device)
                self.load_seconds[modality] = time.perf_counter() - started
                log.info("model_loaded modality=%s seconds=%.2f device=%s", modality,
                         self.load_seconds[modality], device)
            return self._encoders[modality]

    def classifier(self, model_id: int, checkpoint_blob: str, config: dict[str, Any]) -> Any:
        device = self.device
        with self._lock:
            if model_id not in self._classifiers:
                from models.checkpoint import load_checkpoint

                model = load_checkpoint(self.blobs.read(checkpoint_blob), config)
                self._classifiers[model_id] = model.to(device).eval()
            return self._classifiers[model_id]

    def after_fork(self) -> None:
        self.db.dispose()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.db.dispose()


_runtime_lock = threading.Lock()


def runtime_for(app: Any) -> Runtime:
    """The process's runtime for a Celery app built by ``worker.app.create_celery``."""
    with _runtime_lock:
        rt = getattr(app, "mmbatch_runtime", None)
        if rt is None:
            rt = app.mmbatch_runtime = Runtime(app.mmbatch_settings)
        return rt
