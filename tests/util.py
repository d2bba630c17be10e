"""Small helpers the tests share: archives built in memory or on disk, a free TCP port, and
an embedded worker runtime."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path
from typing import Any


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``files`` (member name -> content), in memory."""
    buf = io.BytesIO()
    _write(tarfile.open(fileobj=buf, mode="w"), files)
    return buf.getvalue()


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    """The same tar, written to ``path``; returns ``path``."""
    _write(tarfile.open(path, "w"), files)
    return path


def _write(tf: tarfile.TarFile, files: dict[str, bytes]) -> None:
    with tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedded_runtime(data_dir: Path, **env: str) -> Any:
    """A worker Runtime on a migrated SQLite database and disk blobs under ``data_dir``, with no
    broker (jobs run as plain functions); ``env`` adds MMBATCH_* settings. Close it after."""
    from mmbatch.settings import Settings
    from store.migrate import upgrade
    from worker.runtime import Runtime

    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir),
                                  "MMBATCH_BROKER_URL": "memory://", **env})
    upgrade(settings.db_url)
    return Runtime(settings)
