"""Decoding of video clips with PyAV (its wheels bring their own FFmpeg): a few frames sampled
over the clip, and its sound track (docs/video.md).

A clip is summarised by ``frames`` pictures spread over it, found by seeking rather than by
decoding every frame. A sampled frame that is black, blank (one flat colour) or a near-duplicate
of one already taken is passed over for the next frames after it, so a clip that opens on a fade
from black is not summarised by black frames. Frames are scaled down by FFmpeg's scaler as they
are decoded (the image encoder looks at 224 pixels), so memory follows the small size, not the
clip's. Times come from each frame's own timestamp, so variable frame rates need nothing else;
rotation metadata is applied; every pixel format goes through the scaler to RGB.

Caps: a frame larger than ``max_pixels`` fails the clip (before anything is decoded, from the
stream's header, and again on each decoded frame); a clip declared longer than ``max_seconds``
is sampled over its first ``max_seconds`` (``too_long="cut"``) or fails (``"fail"``); at most
``MAX_DECODED_PER_FRAME`` x (frames + 1) frames are decoded per clip, however the clip is cut into
keyframes. Like :mod:`media.decode`, nothing here touches torch, the database or Celery, and a
bad file raises :class:`MediaError` with a message for the person who uploaded it; the decode
sandbox (:mod:`media.sandbox`) runs it in a child process with a time and memory limit.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import av
import numpy as np

from media.decode import MediaError, resample

# The image encoder resizes the shorter side to 256 px before its 224 px crop: frames come out
# with their shorter side at most this, and the longer side at most FRAME_MAX_ASPECT times it.
FRAME_SIDE = 256
FRAME_MAX_ASPECT = 4
# Only these demuxers ever see uploaded bytes (chosen from the file's first bytes, so FFmpeg's
# probing of some 300 formats, playlists among them, never runs on them).
_DEMUXERS = {"mov": "mov", "matroska": "matroska", "avi": "avi"}
_MOV_ATOMS = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
# Frame checks run on a small grey copy: mean luma under BLACK_LUMA is black, a standard
# deviation under BLANK_STD one flat colour, a mean absolute difference under DUPLICATE_DIFF to a
# frame already taken a near-duplicate (all on 0..255).
_CHECK_SIZE = 32
BLACK_LUMA = 32.0
BLANK_STD = 6.0
DUPLICATE_DIFF = 4.0
MAX_DECODED_PER_FRAME = 120  # frames decoded looking for one sample, at most
SEEK_GAP_SECONDS = 2.0  # a next sample closer than this is reached by decoding on, not seeking


class Frame(NamedTuple):
    time: float  # seconds from the clip's start
    rgb: np.ndarray  # (H, W, 3) uint8, H and W at most FRAME_SIDE * FRAME_MAX_ASPECT


@dataclass
class Clip:
    """What a clip gave: its sampled frames in time order (empty for an audio-only file), its
    sound track as mono float32 samples at ``rate`` Hz (None when none was asked for or the
    clip has none), and facts for the result (size, duration, codec)."""

    frames: list[Frame] = field(default_factory=list)
    audio: np.ndarray | None = None
    rate: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def demuxer_of(data: bytes) -> str | None:
    """The demuxer a clip's first bytes call for: ``mov`` (MP4, M4V, MOV), ``matroska``
    (Matroska, WebM) or ``avi``; None for anything else."""
    if data[4:8] in _MOV_ATOMS:
        return "mov"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def decode_video(data: bytes, name: str, frames: int = 8, max_seconds: float = 600.0,
                 too_long: str = "cut", max_pixels: int = 3840 * 2160, with_audio: bool = False,
                 audio_max_seconds: float = 30.0, poster: bool = False) -> Clip:
    """Sample ``frames`` frames of a clip, and with ``with_audio`` read its sound track (mono,
    its own rate, the first ``audio_max_seconds``). A clip with no video stream but a sound
    track gives its track alone when ``with_audio``; one with neither fails. ``poster``: the
    first frame from the start that is neither black nor blank, instead of a sample."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    demuxer = _checked(data, name, too_long)
    try:
        clip = Clip()
        with av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[demuxer]) as container:
            video = container.streams.video[0] if container.streams.video else None
            has_audio = bool(container.streams.audio)
            if video is None and not (with_audio and has_audio):
                # "absent": an audio-only file still gives an item its sound (worker.batch)
                raise MediaError(f"video {name}: no video stream"
                                 + (" (an audio-only file)" if has_audio else ""),
                                 kind="absent" if has_audio else "invalid")
            if video is not None:
                clip.frames, clip.info = _sample(container, video, name, 1 if poster else frames,
                                                 max_seconds, too_long, max_pixels, poster)
        if with_audio and has_audio:
            clip.audio, clip.rate = _sound_track(data, demuxer, name, audio_max_seconds)
    except MediaError:
        raise
    except av.error.InvalidDataError as exc:
        raise MediaError(f"video {name}: cannot decode (truncated or corrupt: {_reason(exc)})"
                         ) from exc
    except av.error.FFmpegError as exc:
        raise MediaError(f"video {name}: cannot decode ({_reason(exc)})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # PyAV raises a few other types on hostile input
        raise MediaError(f"video {name}: cannot decode ({type(exc).__name__}: {exc})",
                         kind="decoder") from exc
    if not clip.frames and clip.audio is None:
        if video is not None:
            why = f": {clip.info['broken']}" if clip.info.get("broken") else ""
            raise MediaError(f"video {name}: no frame could be decoded (truncated or corrupt "
                             f"video data{why})")
        raise MediaError(f"video {name}: no video frames and no sound could be decoded")
    clip.info["audio_track"] = has_audio
    return clip


def _sample(container: Any, stream: Any, name: str, wanted: int, max_seconds: float,
            too_long: str, max_pixels: int, poster: bool = False
            ) -> tuple[list[Frame], dict[str, Any]]:
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width * height > max_pixels:
        raise MediaError(f"video {name}: {width}x{height} frames are {width * height} pixels, "
                         f"over the limit of {max_pixels} (MMBATCH_VIDEO_MAX_PIXELS)")
    duration = _duration(container, stream)
    info: dict[str, Any] = {"width": width, "height": height, "codec": ctx.name,
                            "duration": None if duration is None else round(duration, 3)}
    if duration is not None and duration > max_seconds:
        if too_long == "fail":
            raise MediaError(f"video {name}: {duration:g} s long, over the limit of "
                             f"{max_seconds:g} s (MMBATCH_VIDEO_MAX_SECONDS)")
        info["cut_at"] = max_seconds
    stream.thread_type = "AUTO"
    # decode at a reduced scale where the codec can (MJPEG, JPEG 2000: FFmpeg's lowres, each
    # step halving both sides; other codecs clamp it to 0), never below what the encoder uses
    lowres = 0
    while lowres < 3 and min(width, height) >> (lowres + 1) >= FRAME_SIDE:
        lowres += 1
    if lowres:
        ctx.options = {**dict(ctx.options or {}), "lowres": str(lowres)}
    # frames no other frame refers to (B-frames) are not decoded while seeking on to a target:
    # the sample is the next reference frame, and the decoder does a fraction of the work
    stream.codec_context.skip_frame = "NONREF"
    sampler = _Sampler(container, stream, name, max_pixels, wanted)
    span = min(duration, max_seconds) if duration and not poster else None
    try:
        _run_sampler(sampler, span, wanted, max_seconds, info)
    except av.error.FFmpegError as exc:
        # corrupt data part way: the frames taken before it still summarise the clip
        info["broken"] = _reason(exc)
    taken = sampler.result()
    info["sampled"] = [round(f.time, 3) for f in taken]
    info["decoded"] = sampler.decoded  # frames decoded to find them
    return taken, info


def _run_sampler(sampler: _Sampler, span: float | None, wanted: int, max_seconds: float,
                 info: dict[str, Any]) -> None:
    if span:
        sampler.run([span * (i + 0.5) / wanted for i in range(wanted)], max_seconds)
        if len(sampler.taken) < wanted and sampler.end is not None and sampler.end < span / 2:
            # the header promised more than the file holds (a lying duration): sample again
            # over what is there
            real = sampler.end
            sampler.run([real * (i + 0.5) / wanted for i in range(wanted)], max_seconds)
            info["duration"] = round(real, 3)
    else:  # no duration in the header: decode from the start
        sampler.run([0.0], max_seconds, sequential=True)


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


class _Sampler:
    """Seeks to each target time and takes the first frame from there that is neither black,
    blank nor a near-duplicate, looking at most MAX_DECODED_PER_FRAME frames on."""

    def __init__(self, container: Any, stream: Any, name: str, max_pixels: int,
                 wanted: int) -> None:
        self.container, self.stream, self.name = container, stream, name
        self.max_pixels = max_pixels
        self.wanted = wanted
        self.taken: list[tuple[Frame, np.ndarray]] = []  # with its grey check copy
        self.fallback: tuple[float, Frame, np.ndarray] | None = None  # the least blank seen
        self.end: float | None = None  # the last frame's time, once the stream ran out
        self.decoded = 0

    def run(self, targets: list[float], max_seconds: float, sequential: bool = False) -> None:
        frames = None
        position = -math.inf
        for i, target in enumerate(targets):
            if len(self.taken) >= self.wanted:
                return
            nxt = targets[i + 1] if i + 1 < len(targets) else math.inf
            if frames is None or target - position > SEEK_GAP_SECONDS:
                if not sequential and target > 0:
                    self.container.seek(int(target / self.stream.time_base), stream=self.stream,
                                        backward=True, any_frame=False)
                elif frames is not None:
                    self.container.seek(0, stream=self.stream)
                frames = self.container.decode(self.stream)
            position = self._take_from(frames, target, nxt, max_seconds, sequential)
            if position == math.inf:
                return

    def _take_from(self, frames: Any, target: float, nxt: float, max_seconds: float,
                   sequential: bool) -> float:
        """Decode on from ``target`` to a usable frame; the last decoded frame's time (inf at
        the end of the stream or past the cut)."""
        looked = 0
        last = -math.inf
        for frame in frames:
            self.decoded += 1
            t = self._time(frame, last)
            last = t
            if t > max_seconds:
                return math.inf
            if t < target - 1e-6:
                if self.decoded > MAX_DECODED_PER_FRAME * (self.wanted + 1):
                    return math.inf  # keyframes too far apart to reach every target
                continue
            if frame.width * frame.height > self.max_pixels:
                raise MediaError(f"video {self.name}: a {frame.width}x{frame.height} frame is "
                                 f"over the limit of {self.max_pixels} pixels "
                                 "(MMBATCH_VIDEO_MAX_PIXELS)")
            looked += 1
            grey = frame.reformat(width=_CHECK_SIZE, height=_CHECK_SIZE,
                                  format="gray").to_ndarray().astype(np.float32)
            verdict = self._verdict(grey)
            if verdict == "ok":
                self.taken.append((_rgb(frame, t), grey))
                if sequential and len(self.taken) < self.wanted:
                    continue
                return t
            if verdict != "duplicate":
                score = float(grey.std()) + float(grey.mean())
                if self.fallback is None or score > self.fallback[0]:
                    self.fallback = (score, _rgb(frame, t), grey)
            if looked >= MAX_DECODED_PER_FRAME or (not sequential and t >= nxt):
                return t
        self.end = last if last > -math.inf else self.end
        return math.inf

    def _time(self, frame: Any, last: float) -> float:
        if frame.time is not None and math.isfinite(frame.time):
            return max(0.0, float(frame.time))
        rate = float(self.stream.average_rate or 25)
        return (last + 1 / rate) if last > -math.inf else 0.0

    def _verdict(self, grey: np.ndarray) -> str:
        if float(grey.mean()) < BLACK_LUMA:
            return "black"
        if float(grey.std()) < BLANK_STD:
            return "blank"
        if any(float(np.abs(grey - g).mean()) < DUPLICATE_DIFF for _, g in self.taken):
            return "duplicate"
        return "ok"

    def result(self) -> list[Frame]:
        """The frames taken, in time order; a clip with none but black or blank ones is
        summarised by the least blank of them."""
        frames = sorted((f for f, _ in self.taken), key=lambda f: f.time)
        if not frames and self.fallback is not None:
            frames = [self.fallback[1]]
        return frames


def _rgb(frame: Any, t: float) -> Frame:
    """The frame in RGB, its shorter side scaled to FRAME_SIDE (never up), rotation applied."""
    w, h = frame.width, frame.height
    scale = min(1.0, FRAME_SIDE / max(1, min(w, h)))
    tw = max(2, min(FRAME_SIDE * FRAME_MAX_ASPECT, round(w * scale)))
    th = max(2, min(FRAME_SIDE * FRAME_MAX_ASPECT, round(h * scale)))
    rgb = frame.reformat(width=tw, height=th, format="rgb24").to_ndarray()  # (H, W, 3)
    turns = round((getattr(frame, "rotation", 0) or 0) / 90) % 4
    if turns:  # the display matrix's counter-clockwise rotation
        rgb = np.rot90(rgb, k=turns)
    return Frame(t, np.ascontiguousarray(rgb, dtype=np.uint8))


def _sound_track(data: bytes, demuxer: str, name: str, max_seconds: float
                 ) -> tuple[np.ndarray | None, int]:
    """The first audio stream, mono float32 at its own rate, at most ``max_seconds``; (None, 0)
    when nothing decodes from it."""
    with av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[demuxer]) as container:
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        if not 1_000 <= rate <= 384_000:
            raise MediaError(f"video {name}: its sound track's sample rate {rate} Hz is not "
                             "supported")
        limit = max(1, math.ceil(max_seconds * rate))
        parts: list[np.ndarray] = []
        got = 0
        try:
            for frame in container.decode(stream):
                samples = frame.to_ndarray()
                if samples.dtype.kind in "iu":  # PCM: s16, s32; u8 centred on 128
                    half = 2.0 ** (8 * samples.dtype.itemsize - 1)
                    centre = half if samples.dtype.kind == "u" else 0.0
                    samples = (samples.astype(np.float32) - centre) / half
                samples = samples.astype(np.float32)
                if frame.format.is_planar:  # (C, t)
                    mono = samples.reshape(len(frame.layout.channels), -1).mean(axis=0)
                else:  # (1, t * C) interleaved
                    mono = samples.reshape(-1, len(frame.layout.channels)).mean(axis=1)
                parts.append(mono)
                got += len(mono)
                if got >= limit:
                    break
        except av.error.FFmpegError:
            if not parts:  # a broken track with nothing before the break
                return None, 0
    if not parts:
        return None, 0
    mono = np.concatenate(parts)[:limit]
    if not np.isfinite(mono).all():
        raise MediaError(f"video {name}: its sound track has non-finite samples (corrupt)")
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def read_sound_track(data: bytes, name: str, max_seconds: float = 30.0, too_long: str = "cut"
                     ) -> tuple[np.ndarray, int]:
    """A clip's sound track as an audio file is read (:func:`media.decode.read_audio`): mono
    float32 ``(T,)`` at its own rate, and that rate. A clip without one raises
    :class:`MediaError` of kind ``"absent"`` (its item goes on without audio)."""
    demuxer = _checked(data, name, too_long)
    try:
        with av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[demuxer]) as container:
            has_audio = bool(container.streams.audio)
        if not has_audio:
            raise MediaError(f"video {name}: no sound track", kind="absent")
        limit = max_seconds * (1 + 1e-6) + (1.0 if too_long == "fail" else 0.0)
        mono, rate = _sound_track(data, demuxer, name, limit)
    except MediaError:
        raise
    except av.error.FFmpegError as exc:
        # "absent": a broken sound track leaves the item its pictures (worker.batch)
        raise MediaError(f"video {name}: cannot decode its sound track ({_reason(exc)})",
                         kind="absent") from exc
    except Exception as exc:  # PyAV raises a few other types on hostile input
        raise MediaError(f"video {name}: cannot decode its sound track "
                         f"({type(exc).__name__}: {exc})", kind="absent") from exc
    if mono is None:
        raise MediaError(f"video {name}: its sound track holds no samples that decode",
                         kind="absent")
    cut = max(1, math.ceil(max_seconds * rate))
    if len(mono) > cut:
        if too_long == "fail":
            raise MediaError(f"video {name}: its sound track is longer than {max_seconds:g} s "
                             "(the limit MMBATCH_AUDIO_MAX_SECONDS)")
        mono = mono[:cut]
    return mono, rate


def decode_sound_track(data: bytes, name: str, target_rate: int = 16000,
                       max_seconds: float = 30.0, too_long: str = "cut") -> np.ndarray:
    """The sound track at ``target_rate`` Hz, as :func:`media.decode.decode_audio` gives an
    audio file's samples."""
    mono, rate = read_sound_track(data, name, max_seconds=max_seconds, too_long=too_long)
    if rate != target_rate:
        mono = resample(mono, rate, target_rate, name)
    return np.ascontiguousarray(mono, dtype=np.float32)


def track_at(clip: Clip, target_rate: int, name: str) -> np.ndarray | None:
    """The clip's sound track resampled to ``target_rate`` Hz (as an audio file's samples are),
    or None."""
    if clip.audio is None:
        return None
    if clip.rate == target_rate:
        return clip.audio
    return np.ascontiguousarray(resample(clip.audio, clip.rate, target_rate, name),
                                dtype=np.float32)


def _reason(exc: Exception) -> str:
    """FFmpeg's own words: PyAV adds the error number, the call or file it was in, and the
    last log line."""
    text = str(exc).split("; last error log")[0].strip()
    text = re.sub(r"^\[(Errno )?-?\d+\] ", "", text)
    text = re.sub(r": '[^']*'$", "", text)
    return text or type(exc).__name__


def _checked(data: bytes, name: str, too_long: str) -> str:
    """The demuxer for a clip's bytes, once the arguments and the bytes are sane."""
    if too_long not in ("cut", "fail"):
        raise ValueError(f"too_long must be 'cut' or 'fail', not {too_long!r}")
    if not data:
        raise MediaError(f"video {name}: empty file")
    demuxer = demuxer_of(data)
    if demuxer is None:
        raise MediaError(f"video {name}: cannot decode (not an MP4, MOV, WebM, Matroska or AVI "
                         "file)")
    return demuxer
