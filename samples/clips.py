"""Video clips made with PyAV: the sample archives' clips and the tests' (good and broken).

``encode_clip`` writes frames (and optionally a sound track) into an in-memory container;
``picture_clip`` makes a clip that shows a picture with motion, noise and, on request, a fade in
from black, which is what the sample generator puts in its archives.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import av
import numpy as np
from PIL import Image

# container format -> (the codec its clips use, the pixel format)
CODECS = {"mp4": ("libx264", "yuv420p"), "mov": ("mpeg4", "yuv420p"),
          "webm": ("libvpx", "yuv420p"), "mkv": ("libx264", "yuv444p"),
          "avi": ("mjpeg", "yuvj420p")}
AUDIO_CODECS = {"mp4": "aac", "mov": "aac", "webm": "libopus", "mkv": "aac", "avi": "mp3"}
_FORMATS = {"mp4": "mp4", "mov": "mov", "webm": "webm", "mkv": "matroska", "avi": "avi"}


def encode_clip(frames: Iterable[np.ndarray], fmt: str = "mp4", fps: int = 12,
                audio: np.ndarray | None = None, rate: int = 16000, codec: str | None = None,
                pix_fmt: str | None = None, gop: int | None = None,
                times: list[float] | None = None) -> bytes:
    """A clip of ``frames`` ((H, W, 3) uint8, even sides) in container ``fmt``, at ``fps``
    frames a second (or at ``times``, seconds, for a variable frame rate), with ``audio`` (mono
    float32 in -1..1 at ``rate`` Hz) as its sound track."""
    out = io.BytesIO()
    default_codec, default_pix = CODECS[fmt]
    with av.open(out, mode="w", format=_FORMATS[fmt]) as container:
        stream: Any = None  # PyAV types a stream by its codec's name
        tb = Fraction(1, 1000) if times is not None else Fraction(1, fps)
        astream: Any = None
        if audio is not None:
            astream = container.add_stream(AUDIO_CODECS[fmt] if fmt != "webm" or rate == 48000
                                           else "libvorbis", rate=rate)
            astream.layout = "mono"
        for i, rgb in enumerate(frames):
            if stream is None:
                stream = container.add_stream(codec or default_codec, rate=fps)
                stream.width, stream.height = rgb.shape[1], rgb.shape[0]
                stream.pix_fmt = pix_fmt or default_pix
                stream.time_base = tb
                if gop is not None:
                    stream.codec_context.gop_size = gop
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = round(times[i] * 1000) if times is not None else i
            frame.time_base = tb
            for packet in stream.encode(frame):
                container.mux(packet)
        if stream is not None:
            for packet in stream.encode(None):
                container.mux(packet)
        if astream is not None and audio is not None:
            _encode_audio(container, astream, audio, rate)
    return out.getvalue()


def _encode_audio(container: av.container.OutputContainer, stream: av.audio.AudioStream,
                  audio: np.ndarray, rate: int) -> None:
    resampler = av.AudioResampler(format=stream.codec_context.format or "fltp",
                                  layout="mono", rate=stream.codec_context.sample_rate or rate)
    frame = av.AudioFrame.from_ndarray(np.asarray(audio, dtype=np.float32)[None, :],
                                       format="flt", layout="mono")
    frame.sample_rate = rate
    for out in resampler.resample(frame) + resampler.resample(None):
        for packet in stream.encode(out):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def audio_only(audio: np.ndarray, rate: int = 16000) -> bytes:
    """An MP4 with a sound track and no video stream."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream: Any = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        _encode_audio(container, stream, audio, rate)
    return out.getvalue()


def picture_clip(picture: Image.Image, seconds: float = 2.0, fps: int = 8,
                 size: tuple[int, int] = (160, 120), fade_in: float = 0.0, seed: int = 0,
                 fmt: str = "mp4", audio: np.ndarray | None = None, rate: int = 16000) -> bytes:
    """A clip that shows ``picture`` drifting slowly across the frame (a pan with a slight
    zoom), with sensor noise, fading in from black over its first ``fade_in`` seconds."""
    rng = np.random.default_rng(seed)
    w, h = size
    big = picture.convert("RGB").resize((int(w * 1.25), int(h * 1.25)), Image.Resampling.BILINEAR)
    base = np.asarray(big, dtype=np.float32)
    n = max(2, round(seconds * fps))
    frames = []
    for i in range(n):
        t = i / fps
        x = int((base.shape[1] - w) * i / (n - 1))
        y = int((base.shape[0] - h) * (n - 1 - i) / (n - 1))
        crop = base[y:y + h, x:x + w] + rng.normal(0, 4, (h, w, 3))
        if fade_in > 0 and t < fade_in:
            crop *= t / fade_in
        frames.append(np.clip(crop, 0, 255).astype(np.uint8))
    return encode_clip(frames, fmt=fmt, fps=fps, audio=audio, rate=rate)
