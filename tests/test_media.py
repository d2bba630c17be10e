"""Decoding of images, text and audio into what the encoders' preprocessing takes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from media.decode import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    TEXT_EXTS,
    MediaError,
    decode_audio,
    decode_image,
    decode_text,
    modality_of,
    read_text,
)


def _image_bytes(fmt: str, size: tuple[int, int] = (64, 48), color=(200, 30, 40), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt, **save)
    return buf.getvalue()


def _audio_bytes(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([mono] * channels, axis=1).astype(np.float32)  # (T, C)


# --- modality_of -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("a/b/cat_001.JPG", "image"),
        ("cat.jpeg", "image"),
        ("x.webp", "image"),
        ("x.Gif", "image"),
        ("cap.txt", "text"),
        ("song.MP3", "audio"),
        ("s.flac", "audio"),
        ("labels.csv", None),
        ("noext", None),
        ("archive.tar.gz", None),
    ],
)
def test_modality_of(filename: str, expected: str | None) -> None:
    assert modality_of(filename) == expected


def test_extension_sets_are_disjoint() -> None:
    assert not (IMAGE_EXTS & TEXT_EXTS or IMAGE_EXTS & AUDIO_EXTS or TEXT_EXTS & AUDIO_EXTS)


# --- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_decode_image_formats_to_rgb(fmt: str) -> None:
    img = decode_image(_image_bytes(fmt), f"x.{fmt.lower()}")
    assert img.mode == "RGB"
    assert img.size == (64, 48)
    r, g, b = img.getpixel((10, 10))  # type: ignore[misc]
    assert abs(r - 200) <= 8 and abs(g - 30) <= 8 and abs(b - 40) <= 8


def test_decode_image_grayscale_and_palette_become_rgb() -> None:
    buf = io.BytesIO()
    Image.new("L", (20, 10), 128).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), "g.png").mode == "RGB"
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).convert("P").save(buf, format="PNG")
    assert decode_image(buf.getvalue(), "p.png").mode == "RGB"


def test_decode_image_transparent_png_composited_on_white() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buf, format="PNG")
    img = decode_image(buf.getvalue(), "t.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = decode_image(buf.getvalue(), "anim.gif")
    assert img.mode == "RGB" and img.size == (32, 32)
    r, g, b = img.getpixel((5, 5))  # type: ignore[misc]
    assert r > 200 and g < 50 and b < 50


def test_decode_image_big_jpeg_is_drafted_but_stays_at_least_320() -> None:
    data = _image_bytes("JPEG", size=(2000, 1500))
    img = decode_image(data, "big.jpg")
    assert img.mode == "RGB"
    assert min(img.size) >= 320 and img.size[0] < 2000


def test_decode_image_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = _image_bytes("JPEG", size=(60, 40), exif=exif.tobytes())
    assert decode_image(data, "rot.jpg").size == (40, 60)


def test_decode_image_truncated_jpeg_is_media_error() -> None:
    data = _image_bytes("JPEG", size=(200, 150))
    with pytest.raises(MediaError, match=r"^image animals/cat_001\.jpg: .*truncated"):
        decode_image(data[: len(data) // 2], "animals/cat_001.jpg")


def test_decode_image_truncated_png_is_media_error() -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    with pytest.raises(MediaError, match=r"^image cut\.png: "):
        decode_image(data[: len(data) // 2], "cut.png")


def test_decode_image_random_bytes_is_media_error() -> None:
    data = np.random.default_rng(1).bytes(5000)
    with pytest.raises(
        MediaError,
        match=r"^image x/noise\.jpg: cannot identify image file \(truncated, or not a JPEG, PNG, "
        r"WebP, BMP or GIF image\)$",
    ):
        decode_image(data, "x/noise.jpg")


def test_decode_image_empty_is_media_error() -> None:
    with pytest.raises(MediaError, match="empty file"):
        decode_image(b"", "e.png")


def test_decode_image_over_max_pixels_is_media_error() -> None:
    data = _image_bytes("PNG", size=(100, 100))
    with pytest.raises(MediaError, match="10000 pixels, over the limit of 9999"):
        decode_image(data, "big.png", max_pixels=9_999)
    assert decode_image(data, "big.png", max_pixels=10_000).size == (100, 100)


# --- text --------------------------------------------------------------------------------------


def test_decode_text_utf8() -> None:
    assert decode_text("Ein grüner Frosch 🐸\n".encode(), "a.txt") == "Ein grüner Frosch 🐸\n"


def test_decode_text_strips_bom() -> None:
    assert decode_text(b"\xef\xbb\xbfhello", "a.txt") == "hello"


def test_decode_text_not_utf8_is_read_whole_as_windows_1252() -> None:
    # the second é is Latin-1: the file is not UTF-8, so all of it is read as Windows-1252
    assert read_text(b"caf\xc3\xa9 caf\xe9", "d/a.txt") == (
        "caf\u00c3\u00a9 caf\u00e9", "windows-1252", False)


def test_decode_text_invalid_after_a_bom_names_byte_and_offset() -> None:
    with pytest.raises(MediaError, match=r"^text b\.txt: not valid UTF-8 after its byte order "
                                         r"mark \(byte 0xff at offset 5\)$"):
        decode_text(b"\xef\xbb\xbfab\xff", "b.txt")


def test_decode_text_truncates() -> None:
    assert decode_text(b"abcdef", "a.txt", max_chars=3) == "abc"
    assert decode_text(b"", "a.txt") == ""


# --- audio -------------------------------------------------------------------------------------


def test_decode_audio_wav_stereo_44k_to_mono_16k() -> None:
    stereo = _tone(1.0, 44100, channels=2)
    stereo[:, 1] = 0.0  # the mean of the channels is half the tone
    out = decode_audio(_audio_bytes(stereo, 44100, "WAV", "PCM_16"), "a.wav")
    assert out.dtype == np.float32 and out.ndim == 1
    assert out.shape == (16000,)
    assert 0.2 < np.abs(out[1000:-1000]).max() < 0.3


def test_decode_audio_keeps_pitch_through_resampling() -> None:
    out = decode_audio(_audio_bytes(_tone(1.0, 22050, freq=1000.0), 22050, "WAV"), "a.wav")
    spectrum = np.abs(np.fft.rfft(out))
    peak_hz = np.argmax(spectrum) * 16000 / len(out)
    assert abs(peak_hz - 1000.0) < 5


def test_decode_audio_at_target_rate_is_unchanged() -> None:
    tone = _tone(0.5, 16000)
    out = decode_audio(_audio_bytes(tone, 16000, "WAV", "FLOAT"), "a.wav")
    np.testing.assert_allclose(out, tone[:, 0], atol=1e-6)


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext"),
    [("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg"), ("MP3", "MPEG_LAYER_III", "mp3")],
)
def test_decode_audio_compressed_formats(fmt: str, subtype: str, ext: str) -> None:
    assert subtype in soundfile.available_subtypes(fmt)
    data = _audio_bytes(_tone(1.0, 44100, channels=2), 44100, fmt, subtype)
    out = decode_audio(data, f"a.{ext}")
    assert out.dtype == np.float32 and out.ndim == 1
    # lossy codecs may pad or trim a few milliseconds
    assert abs(len(out) - 16000) < 16000 * 0.1
    assert np.abs(out).max() > 0.2


def test_decode_audio_cuts_to_max_seconds() -> None:
    data = _audio_bytes(_tone(3.0, 22050), 22050, "WAV")
    assert decode_audio(data, "a.wav", max_seconds=1.0).shape == (16000,)
    assert decode_audio(data, "a.wav", max_seconds=1.5, target_rate=8000).shape == (12000,)
    assert decode_audio(data, "a.wav").shape == (48000,)


@pytest.mark.parametrize(
    "data",
    [
        b"not audio at all" * 50,
        b"RIFF\x24\x00\x00\x00WAVEfmt ",
        np.random.default_rng(2).bytes(4096),
    ],
)
def test_decode_audio_garbage_is_media_error(data: bytes) -> None:
    with pytest.raises(MediaError, match=r"^audio sounds/x\.wav: cannot decode \(.+\)$"):
        decode_audio(data, "sounds/x.wav")


def test_decode_audio_empty_is_media_error() -> None:
    with pytest.raises(MediaError, match="empty file"):
        decode_audio(b"", "a.wav")
    no_frames = _audio_bytes(np.zeros((0, 1), dtype=np.float32), 16000, "WAV")
    with pytest.raises(MediaError, match="no audio samples"):
        decode_audio(no_frames, "silent.wav")
