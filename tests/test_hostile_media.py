"""Hostile media through the decoders, and the decode sandbox that bounds a decoder's time.

Each bad file ends as a MediaError with a message naming the file, or decodes within bounded time
and memory. The sandbox tests run children whose decoder hangs or crashes on purpose.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import soundfile
from PIL import Image

from media.decode import MediaError, decode_audio, decode_image, decode_text, read_text
from media.sandbox import DecodeSandbox


def _png(size: tuple[int, int] = (32, 24), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, "PNG")
    return buf.getvalue()


def _as_format(fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, fmt, **kw)
    return buf.getvalue()


def _wav(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * channels, axis=1).astype(np.float32)


def _forge_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR chunk's size (with a valid CRC): the pixels are not there."""
    out = bytearray(data)
    struct.pack_into(">II", out, 16, width, height)
    struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    return bytes(out)


# --- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kw", [("TIFF", {}), ("PPM", {}), ("ICO", {}), ("TGA", {}),
                                    ("PCX", {}), ("SGI", {}), ("DDS", {})])
def test_other_image_formats_are_refused_whatever_the_name(fmt: str, kw: dict) -> None:
    data = _as_format(fmt, **kw)
    Image.open(io.BytesIO(data)).load()  # PIL itself would decode it
    with pytest.raises(MediaError, match=r"^image x\.jpg: cannot identify image file \(truncated"
                                         r", or not a JPEG, PNG, WebP, BMP or GIF image\)$"):
        decode_image(data, "x.jpg")


def test_eps_never_reaches_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(MediaError, match="cannot identify image file"):
        decode_image(eps, "x.png")


@pytest.mark.timeout(30)  # a hang guard, not a speed check: allocating 10^10 pixels would not end
@pytest.mark.parametrize("width,height", [(100_000, 100_000), (70_000, 1_000), (2**31 - 1, 1)])
def test_pixel_bomb_headers_fail_before_any_pixel_is_allocated(width: int, height: int) -> None:
    data = _forge_png_size(_png(), width, height)
    with pytest.raises(MediaError, match=r"^image b\.png: .*(over the limit of 64000000|too many"
                                         r" pixels)"):
        decode_image(data, "b.png")


def test_forged_png_size_within_the_limit_is_a_corrupt_image() -> None:
    with pytest.raises(MediaError, match=r"^image f\.png: truncated or corrupt image data"):
        decode_image(_forge_png_size(_png(), 3000, 2000), "f.png")


@pytest.mark.parametrize("cut", [8, 16, 33, 60])
def test_png_cut_anywhere_is_a_media_error(cut: int) -> None:
    with pytest.raises(MediaError, match=r"^image c\.png: "):
        decode_image(_png((64, 64))[:cut], "c.png")


# --- text --------------------------------------------------------------------------------------


def test_huge_text_is_cut_without_decoding_all_of_it() -> None:
    data = "ä".encode() * (20 * 1024 * 1024)  # 40 MiB
    # the invalid byte at the very end is never reached: what is past the kept part is not decoded
    text = decode_text(data + b"\xff", "big.txt", max_chars=1000)
    assert text == "ä" * 1000


@pytest.mark.parametrize("data,text,encoding", [
    (b"\xff", "\u00ff", "windows-1252"),  # a lone byte
    (b"ok \xc3", "ok \u00c3", "windows-1252"),  # a sequence cut short: not UTF-8
    (b"\xed\xa0\x80", "\u00ed\u00a0\u20ac", "windows-1252"),  # an encoded surrogate
    (b"\xc0\xaf", "\u00c0\u00af", "windows-1252"),  # an overlong slash
    (b"\x81\x8d", "\x81\x8d", "latin-1"),  # bytes Windows-1252 leaves undefined
])
def test_text_that_is_not_utf8_is_read_as_windows_1252(data: bytes, text: str,
                                                        encoding: str) -> None:
    assert read_text(data, "t.txt") == (text, encoding, False)


def test_text_with_a_nul_byte_is_binary_unless_marked_utf16() -> None:
    with pytest.raises(MediaError, match=r"^text t\.txt: binary data, not text \(a NUL byte at "
                                         r"offset 1; UTF-16 text needs a byte order mark\)$"):
        decode_text(b"a\x00b\xfe", "t.txt")
    assert read_text(b"\xfe\xff\x00a\x00b", "t.txt") == ("ab", "utf-16", False)


# --- audio -------------------------------------------------------------------------------------


@pytest.mark.timeout(30)  # a hang guard: the exact kernel took 45 s (and 12 GB); now ~0.1 s
def test_odd_sample_rate_resamples_in_bounded_time() -> None:
    """44,101 Hz took 45 s and 12 GB with the exact sinc kernel; now it is rounded first."""
    out = decode_audio(_wav(_tone(1.0, 44_101), 44_101), "odd.wav")
    assert abs(len(out) - 16_000) <= 2


@pytest.mark.parametrize("rate", [500, 999])
def test_implausible_sample_rate_is_refused(rate: int) -> None:
    with pytest.raises(MediaError, match=rf"sample rate {rate} Hz is outside 1000\.\.384000 Hz"):
        decode_audio(_wav(_tone(1.0, rate), rate), "r.wav")


def test_too_many_channels_are_refused() -> None:
    with pytest.raises(MediaError, match=r"^audio c\.wav: 40 channels \(at most 32\)$"):
        decode_audio(_wav(_tone(0.1, 16000, channels=40), 16000), "c.wav")


@pytest.mark.parametrize("fmt", ["AIFF", "AU", "CAF", "W64", "VOC"])
def test_other_audio_containers_are_refused(fmt: str) -> None:
    data = _wav(_tone(0.2, 16000), 16000, fmt)
    with pytest.raises(MediaError, match=r"^audio a\.wav: cannot decode \(not a WAV, FLAC, Ogg or "
                                         r"MP3 file\)$"):
        decode_audio(data, "a.wav")


def test_wav_whose_header_claims_4_gib_of_data_reads_what_is_there() -> None:
    data = bytearray(_wav(_tone(1.0, 16000), 16000))
    data[4:8] = struct.pack("<I", 0xFFFFFFFF)
    at = data.find(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFF0)
    out = decode_audio(bytes(data), "liar.wav")
    assert len(out) == 16000


def test_too_long_audio_is_cut_or_refused_by_setting() -> None:
    data = _wav(_tone(5.0, 8000), 8000)
    assert decode_audio(data, "l.wav", max_seconds=2.0).shape == (32_000,)
    assert decode_audio(data, "l.wav", max_seconds=5.0, too_long="fail").shape == (80_000,)
    with pytest.raises(MediaError, match=r"^audio l\.wav: longer than 2 s \(the limit "
                                         r"MMBATCH_AUDIO_MAX_SECONDS\)$"):
        decode_audio(data, "l.wav", max_seconds=2.0, too_long="fail")


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.5])
def test_truncated_audio_is_a_media_error_or_a_shorter_clip(fmt: str, ext: str,
                                                            fraction: float) -> None:
    buf = io.BytesIO()
    subtype = "VORBIS" if fmt == "OGG" else "PCM_16"
    soundfile.write(buf, _tone(1.0, 16000), 16000, format=fmt, subtype=subtype)
    data = buf.getvalue()
    cut = data[: max(4, int(len(data) * fraction))]
    try:
        out = decode_audio(cut, f"t.{ext}")
    except MediaError as exc:
        assert str(exc).startswith(f"audio t.{ext}: ")
    else:
        assert 0 < len(out) < 16_000 and np.isfinite(out).all()


# --- the decode sandbox ------------------------------------------------------------------------

# A child whose decoder hangs on names containing "hang", dies of SIGSEGV on "crash" and grabs
# memory on "hog"; everything else goes to the real decoders.
FAULTY_CHILD = [sys.executable, "-c", """
import os, signal, time
import media.sandbox as m
real_image = m.decode_image
def decode_image(data, name, **kw):
    if "hang" in name:
        time.sleep(3600)
    if "crash" in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "hog" in name:
        hog = bytearray(2 * 1024**3)
    return real_image(data, name, **kw)
m.decode_image = decode_image
m.serve()
"""]


@pytest.fixture
def sandbox():  # type: ignore[no-untyped-def]
    box = DecodeSandbox(processes=2, timeout=3.0, memory_bytes=1024**3, command=FAULTY_CHILD)
    yield box
    box.close()


def test_sandbox_decodes_like_the_module_functions() -> None:
    jpeg = _as_format("JPEG", quality=90)
    wav = _wav(_tone(1.5, 22050, channels=2), 22050)
    with DecodeSandbox(processes=1, timeout=30) as box:
        img = box.decode_image(jpeg, "a.jpg")
        assert img.mode == "RGB" and img.tobytes() == decode_image(jpeg, "a.jpg").tobytes()
        np.testing.assert_array_equal(box.decode_audio(wav, "a.wav"), decode_audio(wav, "a.wav"))
        with pytest.raises(MediaError, match=r"^image n\.png: cannot identify image file"):
            box.decode_image(b"not an image at all", "n.png")
        with pytest.raises(MediaError, match=r"^audio l\.wav: longer than 1 s"):
            box.decode_audio(wav, "l.wav", max_seconds=1.0, too_long="fail")
        assert box.restarts == 0 and len(box.pids) == 1  # one child did all of it


@pytest.mark.timeout(60)  # a hang guard: the child sleeps for an hour unless it is stopped
def test_a_hanging_decoder_fails_its_item_within_the_limit(sandbox: DecodeSandbox) -> None:
    with pytest.raises(MediaError, match=r"^image x/hang\.png: decoding took longer than 3 s "
                                         r"\(stopped\)$"):
        sandbox.decode_image(_png(), "x/hang.png")
    assert sandbox.decode_image(_png(), "next.png").size == (32, 24)  # a new child took over
    assert sandbox.restarts == 1


def test_a_crashing_decoder_fails_its_item_and_the_next_one_works(
        sandbox: DecodeSandbox) -> None:
    with pytest.raises(MediaError, match=r"^image crash\.png: the decoder crashed \(killed by "
                                         r"SIGSEGV\)$"):
        sandbox.decode_image(_png(), "crash.png")
    assert sandbox.decode_image(_png(), "fine.png").size == (32, 24)


def test_a_decoder_over_its_memory_limit_fails_its_item(sandbox: DecodeSandbox) -> None:
    with pytest.raises(MediaError, match=r"^image hog\.png: cannot decode \(out of memory\)$"):
        sandbox.decode_image(_png(), "hog.png")
    assert sandbox.decode_image(_png(), "fine.png").size == (32, 24)


def test_a_poison_file_among_many_threads_fails_alone(sandbox: DecodeSandbox) -> None:
    """Eight threads share two children; one file hangs, one crashes, the other 18 decode."""
    names = [f"ok{i}.png" for i in range(18)] + ["hang.png", "crash.png"]
    outcomes: dict[str, str] = {}

    def run(name: str) -> None:
        try:
            sandbox.decode_image(_png(), name)
            outcomes[name] = "ok"
        except MediaError as exc:
            outcomes[name] = str(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)  # a hang guard; the 20 files take a few seconds
    assert not any(t.is_alive() for t in threads)
    assert sum(v == "ok" for v in outcomes.values()) == 18
    assert "took longer than 3 s" in outcomes["hang.png"]
    assert "crashed" in outcomes["crash.png"]


def test_a_child_that_died_while_idle_is_replaced_without_blaming_the_file() -> None:
    with DecodeSandbox(processes=1, timeout=10) as box:
        box.decode_image(_png(), "a.png")
        [pid] = box.pids
        os.kill(pid, 9)
        time.sleep(0.2)
        assert box.decode_image(_png(), "b.png").size == (32, 24)
        assert box.pids != [pid]


def test_closing_the_sandbox_ends_its_children() -> None:
    box = DecodeSandbox(processes=2, timeout=10)
    box.decode_image(_png(), "a.png")
    pids = box.pids
    box.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped: gone
    with pytest.raises(RuntimeError, match="closed"):
        box.decode_image(_png(), "b.png")
