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
# model waiting for the first chunk of images at the start of every batch. Video right after the
# images: a clip's frames fill the image encoder's chunks the images left open.
MODALITY_ORDER = ("text", "image", "video", "audio")
# The encoders a modality's Parts feed: a clip's frames go to the image encoder ("frame": the
# frozen one, when a model brings its own image encoder for the images).
PART_ENCODERS = {"video": ("image", "frame")}

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
    """One media file to encode: its modality, content hash (the cache key), name, the
    decoder it takes (its modality's, but "track" for audio read from a clip), the feature
    families to compute from the decoded file (models.families columns) and whether its
    encoder must run (not when only families were missing from the cache)."""

    modality: str
    blob: str
    name: str  # the file's name in its archive, for messages
    decoder: str = ""  # empty: its modality's
    families: tuple[str, ...] = ()
    encode: bool = True


@dataclass(frozen=True)
class Part:
    """One encoder input of a file that makes several (a clip's frames; a file's encoder input
    and its feature families): which encoder takes it (READY: none, ``value`` is features
    already), what it is within its file (a frame's time, WHOLE for the file itself, a family's
    column), and the preprocessed input."""

    encoder: str
    label: Any
    value: Any


@dataclass(frozen=True)
class Parts:
    """What preparing a file gives when it feeds several encoder inputs: they join the chunks
    of their encoder with the other files' inputs (a clip is K images for batching)."""

    parts: tuple[Part, ...]


READY = ""  # a Part that needs no encoder: its value is the features (a feature family's)


class _Whole:
    def __repr__(self) -> str:
        return "WHOLE"


WHOLE: Any = _Whole()  # a Part that is the file itself, not one of its frames


@dataclass
class EncodeResult:
    vectors: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (modality, blob)
    # a file of a modality prepared into parts (PART_ENCODERS: a clip's frames):
    # (modality, blob) -> [(label, features)] in input order
    parts: dict[tuple[str, str], list[tuple[Any, np.ndarray]]] = field(default_factory=dict)
    # features computed while preparing (READY parts): (modality, blob) -> {label: features}
    ready: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    absent: set[tuple[str, str]] = field(default_factory=set)  # errors of kind "absent"
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
    otherwise. A ref whose ``prepare`` gives :class:`Parts` feeds each part to the encoder it
    names, in that encoder's chunks (``batch_sizes[part.encoder]``), and its features come back
    in ``parts``. A ``MediaError`` from ``prepare`` becomes that file's error as it is; any
    other exception is logged and becomes a "cannot decode" error. An exception from an encoder
    is not a file's fault: it is raised. ``observe(encoder, items, seconds)`` hears of each
    encoder pass.
    """
    unique = list(dict.fromkeys(refs))
    unique.sort(key=lambda r: MODALITY_ORDER.index(r.modality) if r.modality in MODALITY_ORDER
                else len(MODALITY_ORDER))
    out = EncodeResult()
    # encoder -> its open chunk: (ref, part label or WHOLE, preprocessed input)
    chunks: dict[str, list[tuple[MediaRef, Any, Any]]] = {}

    def flush(name: str) -> None:
        chunk = chunks.pop(name, [])
        if not chunk:
            return
        started = time.perf_counter()
        feats = encoder(name).encode([value for _, _, value in chunk]).numpy()  # (b, D)
        seconds = time.perf_counter() - started
        out.model_seconds += seconds
        if observe is not None:
            observe(name, len(chunk), seconds)
        for (ref, label, _), vec in zip(chunk, feats, strict=True):
            if label is WHOLE:
                out.vectors[(ref.modality, ref.blob)] = vec.astype("<f4")
            else:
                out.parts.setdefault((ref.modality, ref.blob), []).append((label,
                                                                           vec.astype("<f4")))


    stream = prefetch(pool, prepare, unique, depth)
    try:
        while True:
            waited = time.perf_counter()
            prepared = next(stream, None)
            out.wait_seconds += time.perf_counter() - waited
            if prepared is None:
                break
            ref = prepared.source
            # a modality's chunk still open when the next begins gets nothing more: it goes to
            # its encoder now, except the one the next modality's parts join (a clip's frames
            # fill the images' chunk)
            for name in list(chunks):
                if name != ref.modality and name not in PART_ENCODERS.get(ref.modality, ()):
                    flush(name)
            if prepared.error is not None:
                out.errors[(ref.modality, ref.blob)] = _message(ref, prepared.error)
                if getattr(prepared.error, "kind", None) == "absent":
                    out.absent.add((ref.modality, ref.blob))
                continue
            entries = [(ref.modality, WHOLE, prepared.value)]
            if isinstance(prepared.value, Parts):
                key = (ref.modality, ref.blob)
                if ref.modality in PART_ENCODERS:
                    out.parts.setdefault(key, [])
                entries = [(p.encoder, p.label, p.value) for p in prepared.value.parts
                           if p.encoder != READY]
                for p in prepared.value.parts:
                    if p.encoder == READY:
                        out.ready.setdefault(key, {})[p.label] = p.value
            for name, label, value in entries:
                chunk = chunks.setdefault(name, [])
                chunk.append((ref, label, value))
                if len(chunk) >= batch_sizes.get(name, 1):
                    flush(name)
        for name in list(chunks):
            flush(name)
    finally:
        stream.close()
    return out


def _message(ref: MediaRef, exc: Exception) -> str:
    if isinstance(exc, MediaError):
        return str(exc)
    # A decoder bug must fail the item, not the batch; the trace goes to the log.
    log.error("decode_error modality=%s name=%s", ref.modality, ref.name, exc_info=exc)
    return f"{ref.modality} {ref.name}: cannot decode ({type(exc).__name__}: {exc})"
