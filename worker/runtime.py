"""What one worker process holds: database, blob store, encoders and classifiers, loaded once.

Models load lazily on first use, under a lock, after the fork; ``after_fork`` drops connections
inherited from the parent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmbatch.settings import Settings
from store.blobs import open_blob_store
from store.db import Database
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


# Models' own encoders (scratch, finetuned) a worker process keeps loaded at once: enough for
# a few models in rotation; a batch of an evicted one loads it again (seconds).
OWN_ENCODERS = 6


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.db_url)
        self.blobs = open_blob_store(settings)
        self._lock = threading.Lock()
        self._encoders: dict[str, Any] = {}
        self._classifiers: dict[int, Any] = {}
        # weights blob -> a model's own encoder, least recently used first
        self._own_encoders: OrderedDict[str, Any] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._device: Any = None
        self._sandbox: Any = None
        self.load_seconds: dict[str, float] = {}
        self.metrics = WorkerMetrics()  # counted here, served by worker.metrics.MetricsServer

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        """Threads that decode and preprocess media while the model runs (None: decode inline).

        Call it from the thread that runs the models: that thread keeps its torch intra-op
        threads, while each decode thread gets one, so decoding (which resamples and computes
        log-mels with torch) never starts OpenMP teams that fight the model's for the cores.
        """
        threads = self.decode_threads
        with self._lock:
            if self._pool is None and threads > 0:
                _init_torch_threads(self.settings.torch_threads)
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode",
                                                initializer=_init_torch_threads, initargs=(1,))
            return self._pool

    @property
    def decode_threads(self) -> int:
        """Decode threads: the setting, or by default as many as the cores the model leaves
        free (none: decode inline, in the model's thread), and 2-8 when a GPU runs the model.

        Measured on 2 cores with torch on both: one decode thread beside the model made a batch
        slower (26-30 ms an item against 25 inline), the model's OpenMP threads losing more to
        the extra thread than decoding gained; overlap pays only where a core would be idle.
        """
        if self.settings.decode_threads >= 0:
            return self.settings.decode_threads
        cpus = os.cpu_count() or 1
        if self.device.type == "cuda":
            return max(2, min(8, cpus))
        model_threads = self.settings.torch_threads or cpus
        return max(0, min(8, cpus - model_threads))

    @property
    def sandbox(self) -> Any:
        """The child processes images and audio decode in (None: MMBATCH_DECODE_ISOLATION=off).

        Started on first use, so after the fork; one child per decode thread (one when decoding
        inline). A child that hangs past MMBATCH_DECODE_TIMEOUT_SECONDS or crashes is replaced
        and only its file fails.
        """
        if self.settings.decode_isolation == "off":
            return None
        threads = self.decode_threads
        with self._lock:
            if self._sandbox is None:
                from worker.media import DecodeSandbox

                self._sandbox = DecodeSandbox(processes=max(1, threads),
                                              timeout=self.settings.decode_timeout_seconds)
            return self._sandbox

    @property
    def batch_sizes(self) -> dict[str, int]:
        """Items per encoder forward pass, per modality."""
        s = self.settings
        return {"image": s.image_batch_size, "text": s.text_batch_size,
                "audio": s.audio_batch_size}

    @property
    def device(self) -> Any:
        with self._lock:
            if self._device is None:
                from models.device import pick_device

                _init_torch_threads(self.settings.torch_threads)
                self._device = pick_device(self.settings.device)
            return self._device

    def encoder(self, modality: str) -> Any:
        device = self.device
        with self._lock:
            if modality not in self._encoders:
                from models.registry import build_encoder

                started = time.perf_counter()
                encoder = build_encoder(modality, device, precision=self.settings.precision,
                                        max_batch=self.batch_sizes[modality])
                self._encoders[modality] = encoder
                self.load_seconds[modality] = time.perf_counter() - started
                log.info("model_loaded modality=%s seconds=%.2f device=%s precision=%s "
                         "batch=%d", modality, self.load_seconds[modality], device,
                         getattr(encoder, "precision", "fp32"), self.batch_sizes[modality])
            return self._encoders[modality]

    def classifier(self, model_id: int, checkpoint_blob: str, config: dict[str, Any]) -> Any:
        device = self.device
        with self._lock:
            if model_id not in self._classifiers:
                from models.checkpoint import load_checkpoint

                model = load_checkpoint(self.blobs.read(checkpoint_blob), config)
                self._classifiers[model_id] = model.to(device).eval()
            return self._classifiers[model_id]

    def scratch_encoder(self, modality: str, weights_blob: str, config: dict[str, Any],
                        version: str) -> Any:
        """A model's own trained scratch encoder (models.scratch), loaded once per process."""
        device = self.device
        with self._lock:
            if weights_blob not in self._own_encoders:
                from models.scratch import ScratchConfig, ScratchFeatureEncoder, load_encoder

                cfg = ScratchConfig.from_dict(config)
                module = load_encoder(cfg, self.blobs.read(weights_blob))
                self._own_encoders[weights_blob] = ScratchFeatureEncoder(
                    cfg, module, version, device, max_batch=self.batch_sizes[modality])
            return self._own(weights_blob)

    def finetuned_encoder(self, modality: str, weights_blob: str, version: str) -> Any:
        """A pretrained encoder with a model's own finetuned top (models.finetune), built like
        the frozen one (device, precision, batch size) and loaded once per process."""
        device = self.device
        with self._lock:
            if weights_blob not in self._own_encoders:
                from models.registry import build_encoder

                started = time.perf_counter()
                self._own_encoders[weights_blob] = build_encoder(
                    modality, device, precision=self.settings.precision,
                    max_batch=self.batch_sizes[modality],
                    finetuned=self.blobs.read(weights_blob), version=version)
                log.info("model_loaded modality=%s finetuned=%s seconds=%.2f", modality,
                         version, time.perf_counter() - started)
            return self._own(weights_blob)

    def _own(self, weights_blob: str) -> Any:
        """A model's own encoder, marked as just used; the least recently used beyond
        OWN_ENCODERS are let go (a finetuned one holds a whole pretrained network, and every
        retraining makes a new one). Call with the lock held."""
        self._own_encoders.move_to_end(weights_blob)
        while len(self._own_encoders) > OWN_ENCODERS:
            dropped, _ = self._own_encoders.popitem(last=False)
            log.info("own_encoder_released weights=%s", dropped[:16])
        return self._own_encoders[weights_blob]

    def after_fork(self) -> None:
        self.db.dispose()
        self._sandbox = None  # the parent's children answer the parent, not this process

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None
        self.db.dispose()


def _init_torch_threads(count: int) -> None:
    """Fix the calling thread's torch intra-op threads (``count`` <= 0: torch's default).

    torch keeps the count per thread once a thread has used it, and a thread that has not yet
    takes the last count set anywhere; asking for it first pins this thread's own.
    """
    import torch

    torch.get_num_threads()  # initialise this thread's count before changing the default
    if count > 0:
        torch.set_num_threads(count)


_runtime_lock = threading.Lock()


def runtime_for(app: Any) -> Runtime:
    """The process's runtime for a Celery app built by ``worker.app.create_celery``."""
    with _runtime_lock:
        rt = getattr(app, "mmbatch_runtime", None)
        if rt is None:
            rt = app.mmbatch_runtime = Runtime(app.mmbatch_settings)
        return rt
