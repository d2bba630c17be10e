"""Run the web server, the workers and beat as child processes: the embedded stack of
``mmbatch up``.

The children die with the process that started them (Linux: the parent-death signal), so a
killed ``up`` leaves nothing running; ``$DATA_DIR/up.json`` records where ``up`` serves (the
command line talks to it), its children, and whether it stopped cleanly; the next ``up`` refuses
to start beside a live one, and refuses a port something else holds, saying what.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from mmbatch.contract import INGEST_QUEUE, MODEL_QUEUE, TRAIN_QUEUE
from mmbatch.settings import Settings

RECORD = "up.json"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.to_env())
    env["MMBATCH_DATA_DIR"] = str(settings.data_dir.resolve())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def web_command(settings: Settings, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--bind", f"{host}:{port}",
            "--config", "python:web.gunicorn_conf",  # /metrics over all gunicorn workers
            "--worker-class", "gthread", "--workers", "1", "--threads", "8",
            "--timeout", "600", "--graceful-timeout", "10", "--log-level", "warning",
            "web.wsgi:app"]


ALL_QUEUES = f"{INGEST_QUEUE},{MODEL_QUEUE},{TRAIN_QUEUE}"


def worker_command(settings: Settings, queues: str = ALL_QUEUES,
                   name: str = "mmbatch", app: str = "worker.celery_app") -> list[str]:
    """A worker process of the Celery app in module ``app`` (the service's own by default)."""
    return [sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool", "solo", "-Q", queues, "-n", f"{name}@%h",
            "--loglevel", settings.log_level, "--without-gossip", "--without-mingle"]


def search_command(settings: Settings, host: str | None = None, port: int | None = None
                   ) -> list[str]:
    """The search service (worker.search_service): one process holding the encoders and the
    indexes, MMBATCH_SEARCH_THREADS request threads."""
    return [sys.executable, "-m", "gunicorn", "--bind",
            f"{host or settings.host}:{port or settings.search_port}",
            "--worker-class", "gthread", "--workers", "1",
            "--threads", str(settings.search_threads), "--timeout", "600",
            "--graceful-timeout", "10", "--log-level", "warning", "worker.search_wsgi:app"]


def beat_command(settings: Settings) -> list[str]:
    schedule = settings.data_dir.resolve() / "celerybeat-schedule"
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat",
            "--schedule", str(schedule), "--loglevel", settings.log_level]


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Stack:
    """A web process, a worker for batches, a torch-free worker for ingest (archives are walked
    while the batches of their first items run), a worker for training (so a long training
    never holds the batches' worker), the search service, and optionally beat; ``stop()``
    ends them all."""

    def __init__(self, settings: Settings, host: str, port: int,
                 log_dir: Path | None = None, beat: bool = False,
                 worker_args: list[str] | None = None,
                 worker_app: str = "worker.celery_app", model_workers: int = 1) -> None:
        if not settings.search_url and not _port_free(settings.host, settings.search_port):
            # the search service's usual port is taken (another stack on this machine): the
            # children learn the one it got through the settings they are started with
            settings = dataclasses.replace(settings, search_port=free_port(settings.host))
        self.settings, self.host, self.port = settings, host, port
        self.log_dir = log_dir
        self.beat = beat
        self.worker_args = worker_args or []
        self.worker_app = worker_app
        self.model_workers = model_workers
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, wait: float = 120.0) -> "Stack":
        self.spawn_all()
        self.wait_healthy(wait)
        return self

    def spawn_all(self) -> None:
        for name in self.commands():
            self.spawn(name)

    def commands(self) -> dict[str, list[str]]:
        commands = {"worker": worker_command(self.settings, MODEL_QUEUE,
                                             app=self.worker_app) + self.worker_args,
                    "ingester": worker_command(self.settings, INGEST_QUEUE, "ingest",
                                               app="worker.ingest_app"),
                    "trainer": worker_command(self.settings, TRAIN_QUEUE, "trainer",
                                              app=self.worker_app) + self.worker_args,
                    **{f"worker{i}": worker_command(self.settings, MODEL_QUEUE, f"model{i}",
                                                    app=self.worker_app) + self.worker_args
                       for i in range(2, self.model_workers + 1)},
                    "web": web_command(self.settings, self.host, self.port),
                    "search": search_command(self.settings)}
        if self.beat:
            commands["beat"] = beat_command(self.settings)
        return commands

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start one of the stack's processes (again, after it died), in its own session."""
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            self.commands()[name], env=child_env(self._settings_of(name)),
            cwd=Path(__file__).resolve().parent.parent, stdout=out,
            stderr=subprocess.STDOUT if out else None, start_new_session=True,
            preexec_fn=_die_with_parent)
        return self.procs[name]

    def _settings_of(self, name: str) -> Settings:
        """The settings a child starts with: the other worker processes on this machine serve
        their metrics beside the first worker's port: the trainer on + 1, model worker N on
        + N, the ingest worker after the last of them."""
        port = self.settings.worker_metrics_port
        if port and name == "trainer":
            return dataclasses.replace(self.settings, worker_metrics_port=port + 1)
        if port and name == "ingester":
            return dataclasses.replace(self.settings,
                                       worker_metrics_port=port + self.model_workers + 1)
        if port and name.startswith("worker") and name != "worker":
            return dataclasses.replace(self.settings, worker_metrics_port=port + int(name[6:]))
        return self.settings

    def wait_healthy(self, wait: float = 120.0) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the {name} process exited with {proc.returncode}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the web server did not answer on {self.url} within {wait:.0f}s")

    def worker_peak_rss(self) -> int | None:
        """Peak resident memory of the worker process in bytes (Linux), or None."""
        proc = self.procs.get("worker")
        if proc is None:
            return None
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def wait(self) -> int:
        """Block until one child exits; returns its exit code."""
        while True:
            for proc in self.procs.values():
                if proc.poll() is not None:
                    return proc.returncode
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In a child, before it runs: SIGTERM it when the process that started it dies, however
    that dies (Linux; elsewhere the pid file below is the only guard)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# --- what `up` leaves in the data directory -----------------------------------------------------

def record_path(settings: Settings) -> Path:
    return settings.data_dir.resolve() / RECORD


def read_record(settings: Settings) -> dict[str, Any] | None:
    """What the last ``up`` for this data directory recorded, if any."""
    try:
        record = json.loads(record_path(settings).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(settings: Settings, **values: Any) -> None:
    path = record_path(settings)
    record = {**(read_record(settings) or {}), **values}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def start_record(settings: Settings, stack: Stack) -> None:
    write_record(settings, pid=os.getpid(), url=stack.url, stopped=False,
                 started_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                 children={name: proc.pid for name, proc in stack.procs.items()})


def previous_up(settings: Settings) -> tuple[dict[str, Any] | None, bool]:
    """The record of a previous ``up`` for this data directory that is still running (None
    when none is), and whether the last one ended uncleanly (killed: its workers may have
    taken messages the broker no longer shows). Children a dead ``up`` left are stopped."""
    record = read_record(settings)
    if record is None:
        return None, False
    pid = record.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and _is_up(pid):
        return record, False
    for child in (record.get("children") or {}).values():
        if isinstance(child, int) and _alive(child) and "python" in _cmdline(child):
            os.kill(child, signal.SIGTERM)
    return None, not record.get("stopped", True)


def port_holder(host: str, port: int) -> str | None:
    """Who holds ``host:port`` (a pid and its command line where this machine says), or None
    when the port is free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
            return None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"({exc.strerror})"
    for pid in _listeners(port):
        return f"pid {pid} ({_cmdline(pid)[:200]})"
    return "another process (not one this user may inspect)"


def _listeners(port: int) -> list[int]:
    """Processes with a listening TCP socket on ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            pids.append(int(proc.name))
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _is_up(pid: int) -> bool:
    line = _cmdline(pid)
    return _alive(pid) and " up" in f" {line} " and ("cli.main" in line or "mmbatch" in line)
