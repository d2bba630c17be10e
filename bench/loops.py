"""The in-process loops the service is compared with: no queue, no database, no HTTP.

- :func:`bare_loop` is measurement (a): the archive read item by item, in batches of
  ``batch_size`` items, through the service's own decode-ahead encoding (worker.encoding) with
  the worker's settings (per-modality batch sizes, precision, decode threads), then fusion and
  the classifier head. It is what the worker does, minus everything around it.
- :func:`plain_loop` is the reference the bare loop must beat by 1.8x: one item at a time, fp32,
  NCHW, BatchNorm not folded, each file decoded in full (no JPEG draft) and encoded alone, then
  the head.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from media import decode as media
from mmbatch.settings import Settings
from models.families import BY_COLUMN, Family, dense
from models.registry import build_encoder
from store.registry import ModelRow
from worker.batch import classify, family_parts
from worker.encoding import WHOLE, MediaRef, Part, Parts, encode_media
from worker.model_cache import models_of
from worker.runtime import Runtime

EXT_MODALITY = {".jpg": "image", ".txt": "text", ".wav": "audio"}


def archive_batches(path: Path, batch_size: int) -> Iterator[list[tuple[str, dict[str, bytes]]]]:
    """Stream a bench archive (members grouped by key, as bench.synth writes them) in batches of
    items: [(key, {modality: bytes})]."""
    batch: list[tuple[str, dict[str, bytes]]] = []
    key, files = None, {}
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            stem, dot, ext = member.name.rpartition(".")
            modality = EXT_MODALITY.get(dot + ext)
            if not member.isfile() or modality is None:
                continue
            if stem != key and key is not None:
                batch.append((key, files))
                files = {}
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            key = stem
            f = tar.extractfile(member)
            assert f is not None
            files[modality] = f.read()
    if key is not None:
        batch.append((key, files))
    if batch:
        yield batch


def _decode(settings: Settings, modality: str, data: bytes, name: str) -> Any:
    if modality == "image":
        return media.decode_image(data, name, max_pixels=settings.max_image_pixels)
    if modality == "text":
        return media.decode_text(data, name, max_chars=settings.text_max_chars)
    return media.decode_audio(data, name, max_seconds=settings.audio_max_seconds)


def bare_loop(rt: Runtime, archive: Path, batch_size: int, model: ModelRow | None,
              limit: int | None = None) -> dict[str, Any]:
    """Measurement (a); returns items, seconds, items/s and the time split."""
    models = models_of(rt)
    encoders = {m: models.encoder(m) for m in ("image", "text", "audio")}
    pool, depth = models.pool, rt.settings.prefetch_items
    if model is not None:
        models.classifier(model)  # as a warm worker
    families = model_families(model)
    items = model_s = wait_s = head_s = 0.0
    started = time.perf_counter()
    for batch in archive_batches(archive, batch_size):
        if limit is not None and items >= limit:
            break
        data = {(m, key): raw for key, files in batch for m, raw in files.items()}

        def prepare(ref: MediaRef, data: dict[tuple[str, str], bytes] = data) -> Any:
            raw = _decode(rt.settings, ref.modality, data[(ref.modality, ref.blob)], ref.name)
            whole = encoders[ref.modality].preprocess(raw)
            if not ref.families:
                return whole
            return Parts((Part(ref.modality, WHOLE, whole),) + family_parts(ref, raw))

        refs = [MediaRef(m, key, f"{key}.{m}",
                         families=tuple(f.column for f in families if f.modality == m))
                for key, files in batch for m in files]
        result = encode_media(refs, prepare=prepare, encoder=encoders.__getitem__,
                              batch_sizes=models.batch_sizes, pool=pool, depth=depth)
        feats = [{m: result.vectors[(m, key)] for m in files if (m, key) in result.vectors}
                 for key, files in batch]
        for f, (key, files) in zip(feats, batch, strict=True):
            for m in files:
                for column, vec in result.ready.get((m, key), {}).items():
                    f[column] = dense(BY_COLUMN[column], vec)
        t = time.perf_counter()
        if model is not None:
            classify(models, model, [f for f in feats if f])
        head_s += time.perf_counter() - t
        items += len(batch)
        model_s += result.model_seconds
        wait_s += result.wait_seconds
    seconds = time.perf_counter() - started
    return {"items": int(items), "seconds": round(seconds, 2),
            "items_per_s": round(items / seconds, 2),
            "encoder_seconds": round(model_s, 2), "decode_wait_seconds": round(wait_s, 2),
            "head_seconds": round(head_s, 2)}


def model_families(model: ModelRow | None) -> list[Family]:
    """The feature families a model takes (a stacked model's), which every loop computes."""
    if model is None:
        return []
    return [BY_COLUMN[c] for c, e in model.encoders.items()
            if e.get("mode") == "family" and c in BY_COLUMN]


def _decode_plain(settings: Settings, modality: str, data: bytes, name: str) -> Any:
    if modality == "image":  # the whole JPEG, no reduced-scale draft
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    return _decode(settings, modality, data, name)


def plain_encoders(device: Any) -> dict[str, Any]:
    return {"image": build_encoder("image", device, precision="fp32", max_batch=1,
                                   channels_last=False, fold_bn=False),
            "text": build_encoder("text", device, precision="fp32", max_batch=1),
            "audio": build_encoder("audio", device, precision="fp32", max_batch=1)}


def plain_loop(rt: Runtime, encoders: dict[str, Any], archive: Path,
               model: ModelRow | None, limit: int) -> dict[str, Any]:
    """The fp32 batch-1 reference: every file decoded, preprocessed and encoded alone."""
    models = models_of(rt)
    if model is not None:
        models.classifier(model)
    families = model_families(model)
    items = 0
    started = time.perf_counter()
    for batch in archive_batches(archive, 1):
        if items >= limit:
            break
        (key, files), = batch
        feats: dict[str, np.ndarray] = {}
        for m, raw in files.items():
            decoded = _decode_plain(rt.settings, m, raw, f"{key}.{m}")
            x = encoders[m].preprocess(decoded)
            feats[m] = encoders[m].encode([x]).numpy()[0]
            for family in families:
                if family.modality == m:
                    feats[family.column] = dense(family, family.features(decoded))
        if model is not None:
            classify(models, model, [feats])
        items += 1
    seconds = time.perf_counter() - started
    return {"items": items, "seconds": round(seconds, 2), "items_per_s": round(items / seconds, 2)}
