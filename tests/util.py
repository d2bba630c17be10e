"""Small helpers the tests share: archives built in memory or on disk, a free TCP port, and
an embedded worker runtime."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import threading
from pathlib import Path
from typing import Any

from cli.stack import free_port  # noqa: F401  (the tests' way to it)

# CI=true: a missing service or browser is a failure, not a skip
IN_CI = os.environ.get("CI", "").lower() == "true"


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


def run_in_process(rt: Any, client: Any, path: Path, kind: str, headers: dict[str, str],
                   **form: str) -> str:
    """Submit ``path`` through the app's test ``client`` and run the job to its end with the
    worker's own functions on ``rt`` (ingest, batches, training), as a worker would; its id.
    The app must not enqueue (its producer's ``send_task`` replaced by a no-op)."""
    from worker.batch import BatchProcessor
    from worker.ingest import ingest_job
    from worker.training import train_job

    with open(path, "rb") as f:
        r = client.post("/api/v1/jobs", headers=headers,
                        data={"kind": kind, "archive": (f, path.name), **form})
    assert r.status_code == 202, r.get_json()
    job_id = str(r.get_json()["id"])
    for ids in ingest_job(rt, job_id):
        if BatchProcessor(rt, job_id, ids).run().next_step == "train":
            train_job(rt, job_id)
    return job_id


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; ``cut()`` drops every connection and refuses new
    ones (the database has become unreachable), ``restore()`` listens again on the same port.
    With a ``budget``, each connection is cut once that many bytes went towards the target (a
    link that keeps breaking mid-request); ``cuts`` counts those."""

    def __init__(self, target: tuple[str, int], budget: int | None = None) -> None:
        self.target, self.port = target, free_port()
        self.budget, self.cuts = budget, 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if listener is not None:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            for a, b, limit in ((client, upstream, self.budget), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(a, b, limit), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        sent = 0
        try:
            while chunk := src.recv(65536):
                if budget is not None and sent + len(chunk) > budget:
                    dst.sendall(chunk[:budget - sent])
                    self.cuts += 1
                    break
                dst.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
