"""Decoding of uploaded media files into arrays the encoders' preprocessing can take.

Every function takes the raw bytes and the file's name inside the archive (used only in error
messages) and either returns the decoded value or raises :class:`MediaError` with a message meant
for the person who uploaded the file. Nothing here touches the database or Celery, and torch is
imported lazily (only audio resampling needs it).
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "AUDIO_EXTS",
    "IMAGE_EXTS",
    "TEXT_EXTS",
    "MediaError",
    "decode_audio",
    "decode_image",
    "decode_text",
    "modality_of",
]

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
TEXT_EXTS = frozenset({".txt"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".mp3"})

# JPEGs are decoded at a reduced DCT scale no smaller than this; the encoders crop 224 px.
_JPEG_DRAFT_SIZE = (320, 320)
_UTF8_BOM = b"\xef\xbb\xbf"


class MediaError(Exception):
    """A file that cannot be decoded.

    The message is user-facing, e.g.
    ``'image animals/cat_001.jpg: cannot identify image file (truncated or not an image)'``.
    """


def modality_of(filename: str) -> str | None:
    """Return ``"image"``, ``"text"`` or ``"audio"`` from the file's extension, else ``None``."""
    ext = os.path.splitext(filename)[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in TEXT_EXTS:
        return "text"
    if ext in AUDIO_EXTS:
        return "audio"
    return None


def decode_image(data: bytes, name: str, max_pixels: int = 64_000_000) -> Image.Image:
    """Decode an image file to an RGB ``PIL.Image`` (first frame of an animation).

    Large JPEGs are decoded at a reduced scale that keeps both sides at least 320 px. EXIF
    orientation is applied, and transparent pixels are composited onto white.
    """
    if not data:
        raise MediaError(f"image {name}: empty file")
    try:
        # The default max_pixels is below PIL's own warning threshold; PIL still raises
        # DecompressionBombError past twice its MAX_IMAGE_PIXELS. (No warnings.catch_warnings
        # here: it is not thread-safe, and decoding runs in a thread pool.)
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise MediaError(
                f"image {name}: {width}x{height} is {width * height} pixels, "
                f"over the limit of {max_pixels}"
            )
        if img.format == "JPEG":
            img.draft("RGB", _JPEG_DRAFT_SIZE)
        img.load()  # decode now, so a truncated file fails here and not in preprocessing
        return _to_rgb(ImageOps.exif_transpose(img))
    except MediaError:
        raise
    except UnidentifiedImageError as exc:
        raise MediaError(
            f"image {name}: cannot identify image file (truncated or not an image)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image {name}: too many pixels ({exc})") from exc
    except OSError as exc:
        raise MediaError(f"image {name}: truncated or corrupt image data ({exc})") from exc
    except Exception as exc:  # PIL plugins raise many types on hostile input
        raise MediaError(f"image {name}: cannot decode ({type(exc).__name__}: {exc})") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def decode_text(data: bytes, name: str, max_chars: int = 100_000) -> str:
    """Decode UTF-8 text (a leading BOM is dropped), truncated to ``max_chars`` characters."""
    offset = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[offset:].decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise MediaError(
            f"text {name}: not valid UTF-8 (byte 0x{bad:02x} at offset {exc.start + offset})"
        ) from exc
    return text[:max_chars]


def decode_audio(
    data: bytes, name: str, target_rate: int = 16000, max_seconds: float = 30.0
) -> np.ndarray:
    """Decode an audio file to mono samples at ``target_rate`` Hz, cut to ``max_seconds``.

    Returns a 1-D ``float32`` array of shape ``(T,)``.
    """
    if not data:
        raise MediaError(f"audio {name}: empty file")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            limit = max(1, math.ceil(max_seconds * rate))
            # frames is exact for WAV/FLAC/OGG; -1 reads to the end where it is not known.
            frames = min(f.frames, limit) if f.frames > 0 else -1
            samples = f.read(frames=frames, dtype="float32", always_2d=True)  # (T, C)
    except Exception as exc:  # libsndfile reports through several exception types
        raise MediaError(f"audio {name}: cannot decode ({_sndfile_reason(exc)})") from exc

    samples = samples[:limit]
    if samples.size == 0:
        raise MediaError(f"audio {name}: no audio samples")
    mono = samples.mean(axis=1, dtype=np.float32)  # (T,)
    if not np.isfinite(mono).all():
        raise MediaError(f"audio {name}: contains non-finite samples (corrupt file)")
    if rate != target_rate:
        mono = _resample(mono, rate, target_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _resample(mono: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    import torch
    import torchaudio.functional

    with torch.inference_mode():
        out = torchaudio.functional.resample(torch.from_numpy(mono), rate, target_rate)
    return out.numpy()


def _sndfile_reason(exc: Exception) -> str:
    text = str(exc).strip()
    # soundfile prefixes the (useless here) file object repr: "Error opening <_io.BytesIO ...>: ..."
    if ">: " in text:
        text = text.split(">: ", 1)[1]
    return text or type(exc).__name__
