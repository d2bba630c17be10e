"""Decoding ahead of the model: media files are decoded and preprocessed in threads while the
encoders run.

The model thread takes prepared items in order, one modality after another, and encodes them in
chunks of that modality's batch size. Decode jobs run at most ``depth`` items ahead of it, so the
memory held by prepared tensors stays bounded however large the batch. A file that fails to
decode fails alone, with a message for the person who uploaded it; the others go on. Nothing
here touches the database.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from media.decode import MediaError

log = logging.getLogger(__name__)

# The order the model takes modalities in. Text first: it decodes in microseconds, so the model
# starts at once and the decode threads get the images and audio ready meanwhile, instead of the
# model waiting for the first chunk of images at the start of every batch.
MODALITY_ORDER = ("text", "image", "audio")

T = TypeVar("T")


@dataclass(frozen=True)
class Prepared(Generic[T]):
    """One input and what preparing it gave: a value, or the exception it raised."""

    source: T
    value: Any = None
    error: Exception | None = None


def prefetch(pool: Executor | None, fn: Callable[[T], Any], inputs: Iterable[T],
             depth: int) -> Generator[Prepared[T], None, None]:
    """``fn`` over ``inputs`` in ``pool``, yielded in input order, at most ``depth`` ahead.

    An exception raised by ``fn`` is yielded with its input rather than raised, so one bad input
    fails alone. With no pool, ``fn`` runs inline when its turn comes. Closing the iterator early
    cancels the calls that have not started.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if pool is None:
        for x in inputs:
            try:
                value = fn(x)
            except Exception as exc:  # noqa: BLE001 - the item's error, handed to the consumer
                yield Prepared(x, error=exc)
            else:
                yield Prepared(x, value)
        return
    source = iter(inputs)
    pending: deque[tuple[T, Future[Any]]] = deque()

    def submit_next() -> None:
        for x in source:
            pending.append((x, pool.submit(fn, x)))
            return

    try:
        while len(pending) < depth:
            before = len(pending)
            submit_next()
            if len(pending) == before:
                break
        while pending:
            x, future = pending.popleft()
            submit_next()  # keep the window full while the consumer works on this one
            try:
                value = future.result()
            except Exception as exc:  # noqa: BLE001 - the item's error, handed to the consumer
                yield Prepared(x, error=exc)
            else:
                yield Prepared(x, value)
    finally:
        for _, future in pending:
            future.cancel()


@dataclass(frozen=True)
class MediaRef:
    """One media file to encode: its modality, content hash (the cache key) and name."""

    modality: str
    blob: str
    name: str  # the file's name in its archive, for messages


@dataclass
class EncodeResult:
    vectors: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (modality, blob)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    model_seconds: float = 0.0  # time the model thread spent in encoders
    wait_seconds: float = 0.0  # time it spent waiting for decoding (what overlap did not hide)


def encode_media(
    refs: Sequence[MediaRef],
    *,
    prepare: Callable[[MediaRef], Any],
    encoder: Callable[[str], Any],
    batch_sizes: Mapping[str, int],
    pool: Executor | None,
    depth: int,
    observe: Callable[[str, int, float], None] | None = None,
) -> EncodeResult:
    """Features of every ref: ``prepare`` (read + decode + preprocess) runs in ``pool``, ahead
    of ``encoder(modality).encode`` over chunks of ``batch_sizes[modality]`` items.

    Refs are taken once each, grouped by modality (``MODALITY_ORDER``) in their given order
    otherwise. A ``MediaError`` from ``prepare`` becomes that file's error as it is; any other
    exception is logged and becomes a "cannot decode" error. An exception from an encoder is
    not a file's fault: it is raised. ``observe(modality, items, seconds)`` hears of each
    encoder pass.
    """
    unique = list(dict.fromkeys(refs))
    unique.sort(key=lambda r: MODALITY_ORDER.index(r.modality) if r.modality in MODALITY_ORDER
                else len(MODALITY_ORDER))
    out = EncodeResult()
    chunk: list[tuple[MediaRef, Any]] = []

    def flush() -> None:
        if not chunk:
            return
        modality = chunk[0][0].modality
        started = time.perf_counter()
        feats = encoder(modality).encode([value for _, value in chunk]).numpy()  # (b, D)
        seconds = time.perf_counter() - started
        out.model_seconds += seconds
        if observe is not None:
            observe(modality, len(chunk), seconds)
        for (ref, _), vec in zip(chunk, feats, strict=True):
            out.vectors[(modality, ref.blob)] = vec.astype("<f4")
        chunk.clear()

    stream = prefetch(pool, prepare, unique, depth)
    try:
        while True:
            waited = time.perf_counter()
            prepared = next(stream, None)
            out.wait_seconds += time.perf_counter() - waited
            if prepared is None:
                break
            ref = prepared.source
            if chunk and chunk[0][0].modality != ref.modality:
                flush()
            if prepared.error is not None:
                out.errors[(ref.modality, ref.blob)] = _message(ref, prepared.error)
                continue
            chunk.append((ref, prepared.value))
            if len(chunk) >= batch_sizes.get(ref.modality, 1):
                flush()
        flush()
    finally:
        stream.close()
    return out


def _message(ref: MediaRef, exc: Exception) -> str:
    if isinstance(exc, MediaError):
        return str(exc)
    # A decoder bug must fail the item, not the batch; the trace goes to the log.
    log.error("decode_error modality=%s name=%s", ref.modality, ref.name, exc_info=exc)
    return f"{ref.modality} {ref.name}: cannot decode ({type(exc).__name__}: {exc})"
