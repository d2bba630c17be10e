"""Decode isolation: images, audio and video decode in long-lived child processes.

PIL, libsndfile and FFmpeg (PyAV) are C libraries fed bytes from strangers. In the worker's thread pool, a file
that makes one of them loop forever holds a thread (and the batch) forever, and one that makes it
crash takes the whole worker process down. :class:`DecodeSandbox` runs the same decode functions
(:mod:`media.decode`) in child processes instead: each call has a wall-clock limit, each child an
address-space limit, and a child that overruns, crashes or misbehaves is killed and replaced while
only its item fails. Nothing crosses the process boundary but JSON headers and raw sample bytes
(never a pickle: a child that parsed hostile data is not trusted either), and the parent checks
the shape and size of everything it gets back.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from media.decode import (
    AUDIO_MAX_RATE,
    AUDIO_MIN_RATE,
    MediaError,
    decode_image,
    read_audio,
    resample,
)
from media.video import (
    FRAME_MAX_ASPECT,
    FRAME_SIDE,
    Clip,
    Frame,
    decode_video,
    read_sound_track,
)

_FRAME = struct.Struct("!IQ")  # header length, payload length
_MAX_REPLY_HEADER = 64 * 1024
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])


class _ChildFailed(Exception):
    """The child died, timed out or broke the protocol; ``during_write``: before it had the file."""

    def __init__(self, message: str, *, timed_out: bool = False, during_write: bool = False):
        super().__init__(message)
        self.timed_out = timed_out
        self.during_write = during_write


class _Child:
    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, close_fds=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        self.uses = 0

    def call(self, header: dict[str, Any], payload: bytes, timeout: float,
             max_reply: int) -> tuple[dict[str, Any], bytes]:
        deadline = time.monotonic() + timeout
        head = json.dumps(header).encode()
        try:
            self._write(_FRAME.pack(len(head), len(payload)) + head, deadline)
            self._write(payload, deadline)
        except _ChildFailed as exc:
            exc.during_write = True
            raise
        hlen, plen = _FRAME.unpack(self._read(_FRAME.size, deadline))
        if hlen > _MAX_REPLY_HEADER or plen > max_reply:
            raise _ChildFailed(f"the decoder sent a reply of {plen} bytes (at most {max_reply})")
        try:
            reply = json.loads(self._read(hlen, deadline))
        except ValueError as exc:
            raise _ChildFailed("the decoder sent an unreadable reply") from exc
        if not isinstance(reply, dict):
            raise _ChildFailed("the decoder sent an unreadable reply")
        body = self._read(plen, deadline)
        self.uses += 1
        return reply, body

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        poller = select.poll()
        poller.register(self._in, select.POLLOUT)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise _ChildFailed("timed out", timed_out=True)
            try:
                n = os.write(self._in, view[: 1 << 16])
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE: the child is gone
                raise _ChildFailed(self._death(f"broken pipe: {exc}")) from exc
            view = view[n:]

    def _read(self, n: int, deadline: float) -> bytes:
        parts: list[bytes] = []
        poller = select.poll()
        poller.register(self._out, select.POLLIN)
        while n > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise _ChildFailed("timed out", timed_out=True)
            chunk = os.read(self._out, min(n, 1 << 20))
            if not chunk:
                raise _ChildFailed(self._death("it closed its output"))
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _death(self, fallback: str) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return fallback
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        self.proc.wait()


class DecodeSandbox:
    """Decode images and audio in child processes, with a time limit per file.

    Thread-safe: at most ``processes`` decodes run at once (callers beyond that wait), one per
    child. The pipeline's thread pool calls :meth:`decode_image` / :meth:`decode_audio` where it
    called the module functions; they take the same arguments, return the same values and raise
    :class:`MediaError` for a file that times out, crashes its decoder or is simply bad. Text is
    pure Python and bounded; it needs no sandbox.

    ``memory_bytes`` caps each child's address space (``RLIMIT_AS``); ``max_uses`` recycles a
    child after that many files. ``command`` replaces the child's command line (tests use it to
    run a child whose decoder hangs or crashes on purpose).
    """

    def __init__(self, processes: int = 2, timeout: float = 60.0,
                 memory_bytes: int = 4 * 1024**3, max_uses: int = 1000,
                 command: list[str] | None = None) -> None:
        if processes < 1 or timeout <= 0:
            raise ValueError("processes must be >= 1 and timeout > 0")
        self.timeout = timeout
        self.max_uses = max_uses
        self._command = command or [sys.executable, "-c",
                                    "from media.sandbox import serve; serve()"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PROJECT_ROOT, env.get("PYTHONPATH", "")) if p)
        env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1", "MMBATCH_DECODE_MEMORY_BYTES": str(memory_bytes)})
        self._env = env
        self._slots = threading.BoundedSemaphore(processes)
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._all: set[_Child] = set()
        self._closed = False
        self.restarts = 0  # children killed for a timeout, a crash or a protocol error

    def decode_image(self, data: bytes, name: str, max_pixels: int = 64_000_000) -> Image.Image:
        if not data:
            raise MediaError(f"image {name}: empty file")
        reply, body = self._call("image", name, {"max_pixels": max_pixels}, data,
                                 max_reply=3 * max_pixels)
        size = reply.get("size")
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and v > 0 for v in size)
                and size[0] * size[1] <= max_pixels and len(body) == 3 * size[0] * size[1]):
            raise MediaError(f"image {name}: cannot decode (the decoder sent a malformed image)")
        return Image.frombytes("RGB", (size[0], size[1]), body)

    def decode_audio(self, data: bytes, name: str, target_rate: int = 16000,
                     max_seconds: float = 30.0, too_long: str = "cut",
                     track: bool = False) -> np.ndarray:
        """An audio file's samples; ``track``: a clip's sound track's."""
        op, what = ("track", "video") if track else ("audio", "audio")
        if not data:
            raise MediaError(f"{what} {name}: empty file")
        max_frames = math.ceil(max_seconds * AUDIO_MAX_RATE) + 1
        reply, body = self._call(op, name,
                                 {"max_seconds": max_seconds, "too_long": too_long}, data,
                                 max_reply=4 * max_frames)
        rate = reply.get("rate")
        if not (isinstance(rate, int) and AUDIO_MIN_RATE <= rate <= AUDIO_MAX_RATE
                and 0 < len(body) and len(body) % 4 == 0
                and len(body) // 4 <= math.ceil(max_seconds * rate)):
            raise MediaError(f"{what} {name}: cannot decode (the decoder sent malformed samples)")
        mono = np.frombuffer(body, dtype="<f4").astype(np.float32)
        if not np.isfinite(mono).all():
            raise MediaError(f"{what} {name}: contains non-finite samples (corrupt file)")
        if rate != target_rate:
            mono = resample(mono, rate, target_rate, name)
        return np.ascontiguousarray(mono, dtype=np.float32)

    def decode_sound_track(self, data: bytes, name: str, target_rate: int = 16000,
                           max_seconds: float = 30.0, too_long: str = "cut") -> np.ndarray:
        """:func:`media.video.decode_sound_track` in a child (the samples checked as audio's
        are, resampled here)."""
        return self.decode_audio(data, name, target_rate, max_seconds, too_long, track=True)

    def decode_video(self, data: bytes, name: str, frames: int = 8, max_seconds: float = 600.0,
                     too_long: str = "cut", max_pixels: int = 3840 * 2160,
                     with_audio: bool = False, audio_max_seconds: float = 30.0,
                     poster: bool = False) -> Clip:
        """:func:`media.video.decode_video` in a child: the sampled frames and the sound track
        come back as raw bytes, checked against the sizes the reply declares."""
        if not data:
            raise MediaError(f"video {name}: empty file")
        side = FRAME_SIDE * FRAME_MAX_ASPECT
        max_track = math.ceil(audio_max_seconds * AUDIO_MAX_RATE) if with_audio else 0
        reply, body = self._call("video", name,
                                 {"frames": frames, "max_seconds": max_seconds,
                                  "too_long": too_long, "max_pixels": max_pixels,
                                  "with_audio": with_audio, "poster": poster,
                                  "audio_max_seconds": audio_max_seconds}, data,
                                 max_reply=frames * 3 * side * side + 4 * max_track)
        bad = MediaError(f"video {name}: cannot decode (the decoder sent a malformed clip)")
        shapes, rate, samples = reply.get("frames"), reply.get("rate"), reply.get("samples")
        info = reply.get("info")
        if not (isinstance(shapes, list) and len(shapes) <= frames and isinstance(info, dict)
                and isinstance(rate, int) and isinstance(samples, int)
                and 0 <= samples <= max_track
                and (samples == 0 or AUDIO_MIN_RATE <= rate <= AUDIO_MAX_RATE)):
            raise bad
        clip = Clip(info=info, rate=rate if samples else 0)
        offset = 0
        for entry in shapes:
            if not (isinstance(entry, list) and len(entry) == 3
                    and isinstance(entry[0], (int, float)) and math.isfinite(entry[0])
                    and all(isinstance(v, int) and 0 < v <= side for v in entry[1:])):
                raise bad
            t, h, w = entry
            size = h * w * 3
            if offset + size > len(body):
                raise bad
            rgb = np.frombuffer(body, dtype=np.uint8, count=size, offset=offset)
            clip.frames.append(Frame(float(t), rgb.reshape(h, w, 3)))
            offset += size
        if len(body) != offset + 4 * samples:
            raise bad
        if samples:
            mono = np.frombuffer(body, dtype="<f4", offset=offset).astype(np.float32)
            if not np.isfinite(mono).all():
                raise MediaError(f"video {name}: its sound track has non-finite samples "
                                 "(corrupt)")
            clip.audio = mono
        if not clip.frames and clip.audio is None:
            raise bad
        return clip

    def _call(self, op: str, name: str, args: dict[str, Any], data: bytes,
              max_reply: int) -> tuple[dict[str, Any], bytes]:
        header = {"op": op, "name": name, **args}
        with self._slots:
            for attempt in (1, 2):
                child, fresh = self._take()
                try:
                    reply, body = child.call(header, data, self.timeout, max_reply)
                except _ChildFailed as exc:
                    self._drop(child)
                    if exc.during_write and not fresh and attempt == 1:
                        continue  # it had died while idle: not this file's doing
                    if exc.timed_out:
                        raise MediaError(f"{op} {name}: decoding took longer than "
                                         f"{self.timeout:g} s (stopped)", kind="timeout") from None
                    raise MediaError(f"{op} {name}: the decoder crashed ({exc})",
                                     kind="crash") from None
                self._give_back(child)
                break
        if not reply.get("ok"):
            kind = reply.get("kind")
            raise MediaError(str(reply.get("error") or f"{op} {name}: cannot decode"),
                             kind=kind if kind in ("invalid", "decoder", "absent") else "decoder")
        return reply, body

    def _take(self) -> tuple[_Child, bool]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode sandbox is closed")
            if self._idle:
                return self._idle.pop(), False
            child = _Child(self._command, self._env)
            self._all.add(child)
            return child, True

    def _give_back(self, child: _Child) -> None:
        with self._lock:
            if self._closed or child.uses >= self.max_uses:
                self._all.discard(child)
                child.kill()
            else:
                self._idle.append(child)

    def _drop(self, child: _Child) -> None:
        with self._lock:
            self._all.discard(child)
            self.restarts += 1
        child.kill()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self._all]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            children, self._all, self._idle = list(self._all), set(), []
        for child in children:
            child.kill()

    def __enter__(self) -> "DecodeSandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve() -> None:
    """A sandbox child: decode requests from stdin, replies on the original stdout."""
    import resource

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a C library prints goes to stderr, not into the replies
    memory = int(os.environ.get("MMBATCH_DECODE_MEMORY_BYTES", "0"))
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    inp = sys.stdin.buffer
    while True:
        head = inp.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return  # the parent closed the pipe
        hlen, plen = _FRAME.unpack(head)
        header = json.loads(inp.read(hlen))
        payload = inp.read(plen)
        op, name = header["op"], header["name"]
        body = b""
        try:
            if op == "image":
                img = decode_image(payload, name, max_pixels=header["max_pixels"])
                reply: dict[str, Any] = {"ok": True, "size": list(img.size)}
                body = img.tobytes()
            elif op == "audio":
                mono, rate = read_audio(payload, name, max_seconds=header["max_seconds"],
                                        too_long=header["too_long"])
                reply = {"ok": True, "rate": rate}
                body = np.ascontiguousarray(mono, dtype="<f4").tobytes()
            elif op == "track":
                mono, rate = read_sound_track(payload, name, max_seconds=header["max_seconds"],
                                              too_long=header["too_long"])
                reply = {"ok": True, "rate": rate}
                body = np.ascontiguousarray(mono, dtype="<f4").tobytes()
            elif op == "video":
                clip = decode_video(payload, name, frames=header["frames"],
                                    max_seconds=header["max_seconds"],
                                    too_long=header["too_long"],
                                    max_pixels=header["max_pixels"],
                                    with_audio=header["with_audio"],
                                    audio_max_seconds=header["audio_max_seconds"],
                                    poster=header["poster"])
                audio = (np.zeros(0, dtype="<f4") if clip.audio is None
                         else np.ascontiguousarray(clip.audio, dtype="<f4"))
                reply = {"ok": True, "info": clip.info, "rate": clip.rate,
                         "samples": int(audio.size),
                         "frames": [[f.time, *f.rgb.shape[:2]] for f in clip.frames]}
                body = b"".join(f.rgb.tobytes() for f in clip.frames) + audio.tobytes()
            else:
                reply = {"ok": False, "error": f"unknown operation {op!r}"}
        except MediaError as exc:
            reply = {"ok": False, "error": str(exc), "kind": exc.kind}
        except MemoryError:
            reply = {"ok": False, "error": f"{op} {name}: cannot decode (out of memory)",
                     "kind": "invalid"}
        except Exception as exc:  # a decoder bug fails the file, not the child
            reply = {"ok": False, "error": f"{op} {name}: cannot decode "
                                           f"({type(exc).__name__}: {exc})", "kind": "decoder"}
        data = json.dumps(reply).encode()
        out.write(_FRAME.pack(len(data), len(body)) + data)
        out.write(body)
        out.flush()
