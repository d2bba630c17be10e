"""Decoding of uploaded media files into arrays the encoders' preprocessing can take.

Every function takes the raw bytes and the file's name inside the archive (used only in error
messages) and either returns the decoded value or raises :class:`MediaError` with a message meant
for the person who uploaded the file. Nothing here touches the database, Celery or torch: audio
is resampled with SciPy's polyphase filter.
"""

from __future__ import annotations

import codecs
import functools
import io
import math
import os
from typing import NamedTuple

import numpy as np
import soundfile
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
TEXT_EXTS = frozenset({".txt"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".mp3"})
VIDEO_EXTS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})

# Only these PIL plugins ever see uploaded bytes, whatever the file is called: TIFF, EPS
# (Ghostscript), PSD, FLI, SGI, JPEG 2000 and the rest have a long history of decoder bugs.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# libsndfile reads two dozen containers; uploads reach it only as these (checked on the bytes
# before libsndfile parses anything, and on what libsndfile then reports).
_AUDIO_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3"})
AUDIO_MIN_RATE, AUDIO_MAX_RATE = 1_000, 384_000
AUDIO_MAX_CHANNELS = 32
# The resampling filter: a Hann-windowed sinc with this many zero crossings each side, cut off at
# this fraction of the lower Nyquist frequency: torchaudio's default, which the audio features
# were measured with (tests/test_models_audio.py holds them within cosine 0.999 of it).
RESAMPLE_ZERO_CROSSINGS = 6
RESAMPLE_ROLLOFF = 0.99
# The filter has about 12 x max(up, down) taps for up/down = target/rate in lowest terms: 44,101
# Hz to 16 kHz would need 535,000. Past this term, the rate is rounded to 100 Hz first.
_MAX_RESAMPLE_TERM = 10_000

# JPEGs are decoded at a reduced DCT scale no smaller than this; the encoders crop 224 px.
_JPEG_DRAFT_SIZE = (320, 320)


class MediaError(Exception):
    """A file that cannot be decoded.

    The message is user-facing, e.g.
    ``'image animals/cat_001.jpg: truncated or corrupt image data (image file is truncated)'``.

    ``kind`` says how it ended, for logs and counts (the item fails the same way for each):
    ``"invalid"`` (the file is bad, and the message says how), ``"decoder"`` (the decoding
    library raised something unexpected on it), ``"timeout"`` and ``"crash"`` (in a
    :class:`DecodeSandbox`: the decoder ran past its time limit, or its process died),
    ``"absent"`` (a clip lacks the stream asked for: no sound track, or no pictures in an
    audio-only file; its item may go on with what the clip does hold).
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def modality_of(filename: str) -> str | None:
    """Return ``"image"``, ``"text"``, ``"audio"`` or ``"video"`` from the file's extension (any
    case), else ``None``."""
    ext = os.path.splitext(filename)[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in TEXT_EXTS:
        return "text"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in VIDEO_EXTS:
        return "video"
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
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
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
            f"image {name}: cannot identify image file "
            "(truncated, or not a JPEG, PNG, WebP, BMP or GIF image)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image {name}: too many pixels ({exc})") from exc
    except OSError as exc:
        raise MediaError(f"image {name}: truncated or corrupt image data ({exc})") from exc
    except Exception as exc:  # PIL plugins raise many types on hostile input
        raise MediaError(f"image {name}: cannot decode ({type(exc).__name__}: {exc})",
                         kind="decoder") from exc


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


class Text(NamedTuple):
    """A caption as read: the text (at most the limit's characters), the encoding it was read
    in, and whether it was cut at the limit."""

    text: str
    encoding: str  # "utf-8", "utf-16", "utf-32", "windows-1252" or "latin-1"
    truncated: bool


# Byte order marks, longest first (a UTF-32 LE mark starts like a UTF-16 LE one).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_CODECS = {"utf-32": "utf-32", "utf-16": "utf-16", "utf-8": "utf-8-sig"}


def read_text(data: bytes, name: str, max_chars: int = 100_000) -> Text:
    """Read a caption as people save it: by its byte order mark (UTF-8, UTF-16 as Windows
    Notepad writes it, UTF-32), else as UTF-8, else as Windows-1252 (Latin-1 for the five bytes
    Windows-1252 leaves undefined). A file with a NUL byte and no byte order mark is binary, not
    text. Kept to ``max_chars`` characters; only the bytes that can hold them are decoded, so a
    huge file costs no more than a short one.
    """
    bom, encoding = next(((b, enc) for b, enc in _BOMS if data.startswith(b)), (b"", None))
    if encoding is not None:  # the codec reads (and drops) the mark itself
        try:
            text, whole = _window(data, _CODECS[encoding], 4 * max_chars + 4)
        except UnicodeDecodeError as exc:  # the mark promised what the bytes do not keep
            offset = exc.start + (len(bom) if encoding == "utf-8" else 0)
            raise MediaError(f"text {name}: not valid {encoding.upper()} after its byte order "
                             f"mark (byte 0x{data[offset]:02x} at offset {offset})") from exc
        return Text(text[:max_chars], encoding, not whole or len(text) > max_chars)
    try:
        text, whole = _window(data, "utf-8", 4 * max_chars)
        return Text(text[:max_chars], "utf-8", not whole or len(text) > max_chars)
    except UnicodeDecodeError:
        pass
    window = data[: max_chars + 1]
    if b"\x00" in window:
        raise MediaError(f"text {name}: binary data, not text (a NUL byte at offset "
                         f"{window.index(0)}; UTF-16 text needs a byte order mark)")
    try:
        text, encoding = window.decode("cp1252"), "windows-1252"
    except UnicodeDecodeError:
        text, encoding = window.decode("latin-1"), "latin-1"
    return Text(text[:max_chars], encoding, len(data) > max_chars)


def _window(data: bytes, codec: str, size: int) -> tuple[str, bool]:
    """The text of the first ``size`` bytes of ``data`` in ``codec`` (a character the window
    cuts is left out; one the file's end cuts is an error), and whether the window was the whole
    file."""
    whole = size >= len(data)
    return codecs.getincrementaldecoder(codec)().decode(data[:size], final=whole), whole


def decode_text(data: bytes, name: str, max_chars: int = 100_000) -> str:
    """The caption's text as :func:`read_text` reads it."""
    return read_text(data, name, max_chars).text


def decode_audio(
    data: bytes,
    name: str,
    target_rate: int = 16000,
    max_seconds: float = 30.0,
    too_long: str = "cut",
) -> np.ndarray:
    """Decode an audio file to mono samples at ``target_rate`` Hz.

    Audio longer than ``max_seconds`` is cut to it (``too_long="cut"``) or fails
    (``too_long="fail"``). Returns a 1-D ``float32`` array of shape ``(T,)``.
    """
    mono, rate = read_audio(data, name, max_seconds=max_seconds, too_long=too_long)
    if rate != target_rate:
        mono = resample(mono, rate, target_rate, name)
    return np.ascontiguousarray(mono, dtype=np.float32)


def read_audio(
    data: bytes, name: str, max_seconds: float = 30.0, too_long: str = "cut"
) -> tuple[np.ndarray, int]:
    """Mono ``float32`` samples ``(T,)`` at the file's own rate, and that rate.

    Reads one second at a time, so memory follows the samples really present, not what the
    header claims (frames, channels); the rate and channel count must be plausible.
    """
    if too_long not in ("cut", "fail"):
        raise ValueError(f"too_long must be 'cut' or 'fail', not {too_long!r}")
    if not data:
        raise MediaError(f"audio {name}: empty file")
    if not _looks_like_audio(data):
        raise MediaError(f"audio {name}: cannot decode (not a WAV, FLAC, Ogg or MP3 file)")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            if f.format not in _AUDIO_FORMATS:
                raise MediaError(f"audio {name}: {f.format} audio is not supported "
                                 "(WAV, FLAC, Ogg, MP3)")
            rate, channels = f.samplerate, f.channels
            if not AUDIO_MIN_RATE <= rate <= AUDIO_MAX_RATE:
                raise MediaError(f"audio {name}: sample rate {rate} Hz is outside "
                                 f"{AUDIO_MIN_RATE}..{AUDIO_MAX_RATE} Hz")
            if not 1 <= channels <= AUDIO_MAX_CHANNELS:
                raise MediaError(f"audio {name}: {channels} channels (at most "
                                 f"{AUDIO_MAX_CHANNELS})")
            limit = max(1, math.ceil(max_seconds * rate))
            mono = _read_mono(f, limit + 1 if too_long == "fail" else limit)
    except MediaError:
        raise
    except soundfile.LibsndfileError as exc:
        raise MediaError(f"audio {name}: cannot decode ({_sndfile_reason(exc)})") from exc
    except Exception as exc:  # soundfile and numpy raise a few other types on hostile input
        raise MediaError(f"audio {name}: cannot decode ({_sndfile_reason(exc)})",
                         kind="decoder") from exc

    if len(mono) > limit:
        if too_long == "fail":
            raise MediaError(f"audio {name}: longer than {max_seconds:g} s "
                             "(the limit MMBATCH_AUDIO_MAX_SECONDS)")
        mono = mono[:limit]
    if mono.size == 0:
        raise MediaError(f"audio {name}: no audio samples")
    if not np.isfinite(mono).all():
        raise MediaError(f"audio {name}: contains non-finite samples (corrupt file)")
    return mono, rate


def _looks_like_audio(data: bytes) -> bool:
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return True
    if head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3":  # ID3: MP3 (or FLAC) with a tag
        return True
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0  # an MPEG frame


def _read_mono(f: soundfile.SoundFile, frames: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    got = 0
    block = max(1, f.samplerate)
    while got < frames:
        chunk = f.read(frames=min(block, frames - got), dtype="float32", always_2d=True)  # (t, C)
        if len(chunk) == 0:
            break
        # Sum the channel columns: numpy's mean over a 2-wide axis is ~30x slower (3 ms of a 5 s
        # stereo clip) and gives the same floats for mono and stereo.
        mono = chunk[:, 0].copy()
        for c in range(1, chunk.shape[1]):
            mono += chunk[:, c]
        if chunk.shape[1] > 1:
            mono *= np.float32(1.0 / chunk.shape[1])
        parts.append(mono)  # (t,)
        got += len(chunk)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def resample(mono: np.ndarray, rate: int, target_rate: int, name: str = "") -> np.ndarray:
    """``mono`` (T,) at ``rate`` Hz, resampled to ``target_rate`` Hz -> float32 (T',), T' =
    ceil(T * target_rate / rate)."""
    g = math.gcd(rate, target_rate)
    if max(rate, target_rate) // g > _MAX_RESAMPLE_TERM:
        # An odd rate (44,101 Hz) would need a huge filter; 100 Hz closer is off by < 0.3 %.
        rate = max(100, round(rate / 100) * 100)
        g = math.gcd(rate, target_rate)
        if max(rate, target_rate) // g > _MAX_RESAMPLE_TERM:
            raise MediaError(f"audio {name}: cannot resample {rate} Hz to {target_rate} Hz")
    if rate == target_rate:
        return mono
    # scipy.signal costs 0.9 s and 76 MiB to import: only a process that resamples pays it
    # (not the decode sandbox's children, nor the API's thumbnail sandbox).
    from scipy.signal import resample_poly

    up, down = target_rate // g, rate // g
    out = resample_poly(np.asarray(mono, dtype=np.float64), up, down, window=_taps(up, down))
    return out.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _taps(up: int, down: int) -> np.ndarray:
    """The low-pass FIR that resampling by up/down applies at the upsampled rate."""
    from scipy.signal import firwin  # lazy, as in resample

    half = math.ceil(RESAMPLE_ZERO_CROSSINGS * max(up, down) / RESAMPLE_ROLLOFF)
    taps: np.ndarray = firwin(2 * half + 1, RESAMPLE_ROLLOFF / max(up, down), window="hann")
    return taps


def _sndfile_reason(exc: Exception) -> str:
    text = str(exc).strip()
    # soundfile prefixes the (useless here) file object repr: "Error opening <_io.BytesIO ...>: ..."
    if ">: " in text:
        text = text.split(">: ", 1)[1]
    return text or type(exc).__name__
