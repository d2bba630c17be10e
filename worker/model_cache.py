"""The model side of a worker process: the device, the encoders and classifiers, loaded once,
lazily, after the fork; the threads and sandbox children that decode media ahead of them.

Attached to the process's :class:`worker.runtime.Runtime` by :func:`models_of` on first use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from media import decode, video
from media.sandbox import DecodeSandbox
from mmbatch.settings import Settings
from models.align import Aligner, load_aligner
from models.checkpoint import load_checkpoint
from models.device import pick_device
from models.families import BY_COLUMN
from models.fusion import FusionClassifier
from models.registry import SPECS, build_encoder
from models.scratch import ScratchConfig, ScratchFeatureEncoder, load_encoder
from models.spec import Encoder
from store.blobs import Blobs
from store.registry import ModelRow
from worker.runtime import Runtime

log = logging.getLogger(__name__)

# Models' own encoders (scratch, finetuned) a worker process keeps loaded at once: enough for
# a few models in rotation; a batch of an evicted one loads it again (seconds).
OWN_ENCODERS = 6


class ModelCache:
    def __init__(self, settings: Settings, blobs: Blobs) -> None:
        self.settings = settings
        self.blobs = blobs
        self._lock = threading.Lock()
        self._encoders: dict[str, Encoder] = {}
        self._classifiers: dict[int, FusionClassifier] = {}
        self._aligners: dict[int, Aligner] = {}
        # weights blob -> a model's own encoder, least recently used first
        self._own: OrderedDict[str, Encoder] = OrderedDict()
        self._own_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._device: torch.device | None = None
        self._sandbox: DecodeSandbox | None = None
        self.load_seconds: dict[str, float] = {}

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        """Threads that decode and preprocess media while the model runs (None: decode inline).

        Call it from the thread that runs the models: that thread keeps its torch intra-op
        threads, while each decode thread gets one, so decoding never starts OpenMP teams that
        fight the model's for the cores.
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
    def sandbox(self) -> DecodeSandbox | None:
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
                self._sandbox = DecodeSandbox(processes=max(1, threads),
                                              timeout=self.settings.decode_timeout_seconds)
            return self._sandbox

    def decoder(self, modality: str) -> Callable[[bytes, str], Any]:
        """One modality's decode function (bytes, name in the archive): images, audio and video
        in the decode sandbox's child processes unless isolation is off; text in-process (pure
        Python, bounded). ``"track"``: a clip's sound track (the audio of an item whose audio
        is its clip's)."""
        s = self.settings
        if modality == "text":
            return partial(decode.decode_text, max_chars=s.text_max_chars)
        sandbox = self.sandbox
        if modality == "image":
            return partial((sandbox or decode).decode_image, max_pixels=s.max_image_pixels)
        if modality == "video":
            return partial((sandbox or video).decode_video, frames=s.video_frames,
                           max_seconds=s.video_max_seconds, too_long=s.video_too_long,
                           max_pixels=s.video_max_pixels)
        if modality == "track":  # a clip's sound track, read as an audio file is
            return partial((sandbox or video).decode_sound_track,
                           max_seconds=s.audio_max_seconds, too_long=s.audio_too_long)
        return partial((sandbox or decode).decode_audio, max_seconds=s.audio_max_seconds,
                       too_long=s.audio_too_long)

    @property
    def batch_sizes(self) -> dict[str, int]:
        """Items per encoder forward pass, per modality."""
        s = self.settings
        # "frame": a clip's frames through the frozen image encoder (worker.encoding)
        return {"image": s.image_batch_size, "text": s.text_batch_size,
                "audio": s.audio_batch_size, "frame": s.image_batch_size}

    @property
    def device(self) -> torch.device:
        with self._lock:
            if self._device is None:
                _init_torch_threads(self.settings.torch_threads)
                self._device = pick_device(self.settings.device)
            return self._device

    def encoder(self, modality: str) -> Encoder:
        """The frozen pretrained encoder of ``modality``."""
        device = self.device
        with self._lock:
            if modality not in self._encoders:
                started = time.perf_counter()
                encoder = build_encoder(modality, device, precision=self.settings.precision,
                                        max_batch=self.batch_sizes[modality])
                self._encoders[modality] = encoder
                self.load_seconds[modality] = time.perf_counter() - started
                log.info("model_loaded modality=%s seconds=%.2f device=%s precision=%s "
                         "batch=%d", modality, self.load_seconds[modality], device,
                         getattr(encoder, "precision", "fp32"), self.batch_sizes[modality])
            return self._encoders[modality]

    def classifier(self, model: ModelRow) -> FusionClassifier:
        device = self.device
        with self._lock:
            if model.id not in self._classifiers:
                net = load_checkpoint(self.blobs.read(model.checkpoint_blob), model.config)
                self._classifiers[model.id] = net.to(device).eval()
            return self._classifiers[model.id]

    def aligner(self, model: ModelRow) -> Aligner:
        """An aligner model version's heads (models.align), loaded once per process; on the
        CPU: they are a few small matrices over cached features."""
        with self._lock:
            if model.id not in self._aligners:
                net = load_aligner(self.blobs.read(model.checkpoint_blob), model.config)
                self._aligners[model.id] = net.eval()
            return self._aligners[model.id]

    def mismatch(self, model: ModelRow) -> str | None:
        """Why this worker's encoders cannot feed a model trained on other encoder versions, if
        so."""
        for modality, trained in sorted(model.encoders.items()):
            if trained.get("mode") == "scratch":
                continue  # the model's own encoder, shipped with it
            if trained.get("mode") == "family":  # a feature family (models.families)
                family = BY_COLUMN.get(modality)
                if family is None or family.version != trained.get("version"):
                    return (f"model {model.id} was trained on the {modality} features "
                            f"{trained.get('version')!r}; this worker has "
                            f"{family.version if family else None!r}: retrain the model")
                continue
            # A finetuned top runs over this worker's pretrained bottom: the same one.
            current = SPECS[modality].version
            if trained.get("mode") == "finetune":
                if trained.get("base_version") != current:
                    return (f"model {model.id} finetuned {modality} encoder "
                            f"{trained.get('base_version')!r}; this worker has {current!r}: "
                            "retrain the model")
            elif trained.get("version") != current:
                return (f"model {model.id} was trained on {modality} encoder "
                        f"{trained.get('version')!r}; this worker has {current!r}: retrain "
                        "the model")
        return None

    def own_encoders(self, model: ModelRow) -> dict[str, Encoder]:
        """The model's own encoders by modality (scratch encoders, finetuned pretrained ones),
        loaded once per process; the least recently used beyond OWN_ENCODERS are let go (a
        finetuned one holds a whole pretrained network, and every retraining makes one)."""
        sections = model.config
        wanted = {m: ("scratch", entry) for m, entry in (sections.get("scratch") or {}).items()}
        wanted.update({m: ("finetune", entry)
                       for m, entry in (sections.get("finetune") or {}).items()})
        out: dict[str, Encoder] = {}
        with self._own_lock:
            for m, (mode, entry) in wanted.items():
                blob, version = entry["weights_blob"], model.encoders[m]["version"]
                if blob not in self._own:
                    self._own[blob] = self._load_own(m, mode, entry, version)
                self._own.move_to_end(blob)
                out[m] = self._own[blob]
            while len(self._own) > OWN_ENCODERS:
                dropped, _ = self._own.popitem(last=False)
                log.info("own_encoder_released weights=%s", dropped[:16])
        return out

    def _load_own(self, modality: str, mode: str, entry: dict[str, Any], version: str
                  ) -> Encoder:
        started = time.perf_counter()
        weights = self.blobs.read(entry["weights_blob"])
        encoder: Encoder
        if mode == "scratch":
            cfg = ScratchConfig.from_dict(entry["config"])
            encoder = ScratchFeatureEncoder(cfg, load_encoder(cfg, weights), version,
                                            self.device, max_batch=self.batch_sizes[modality])
        else:
            encoder = build_encoder(modality, self.device, precision=self.settings.precision,
                                    max_batch=self.batch_sizes[modality], finetuned=weights,
                                    version=version)
        log.info("model_loaded modality=%s own=%s version=%s seconds=%.2f", modality, mode,
                 version, time.perf_counter() - started)
        return encoder

    def after_fork(self) -> None:
        self._sandbox = None  # the parent's children answer the parent, not this process

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


def models_of(rt: Runtime) -> ModelCache:
    """The process's model cache, made on first use and kept on its runtime."""
    with rt.lock:
        if rt.models is None:
            rt.models = ModelCache(rt.settings, rt.blobs)
        cache: ModelCache = rt.models
        return cache


def _init_torch_threads(count: int) -> None:
    """Fix the calling thread's torch intra-op threads (``count`` <= 0: torch's default).

    torch keeps the count per thread once a thread has used it, and a thread that has not yet
    takes the last count set anywhere; asking for it first pins this thread's own.
    """
    torch.get_num_threads()  # initialise this thread's count before changing the default
    if count > 0:
        torch.set_num_threads(count)
