"""Run the web server and a worker as child processes: the embedded stack of ``mmbatch up``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from mmbatch.settings import Settings


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


def worker_command(settings: Settings, queues: str = "ingest,model",
                   name: str = "mmbatch", app: str = "worker.celery_app") -> list[str]:
    """A worker process of the Celery app in module ``app`` (the service's own by default)."""
    return [sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool", "solo", "-Q", queues, "-n", f"{name}@%h",
            "--loglevel", settings.log_level, "--without-gossip", "--without-mingle"]


def beat_command(settings: Settings) -> list[str]:
    schedule = settings.data_dir.resolve() / "celerybeat-schedule"
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat",
            "--schedule", str(schedule), "--loglevel", settings.log_level]


class Stack:
    """A web process, a worker process and optionally beat; ``stop()`` ends them all."""

    def __init__(self, settings: Settings, host: str, port: int,
                 log_dir: Path | None = None, beat: bool = False,
                 worker_args: list[str] | None = None,
                 worker_app: str = "worker.celery_app") -> None:
        self.settings, self.host, self.port = settings, host, port
        self.log_dir = log_dir
        self.beat = beat
        self.worker_args = worker_args or []
        self.worker_app = worker_app
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, wait: float = 120.0) -> "Stack":
        for name in self.commands():
            self.spawn(name)
        self._wait_healthy(wait)
        return self

    def commands(self) -> dict[str, list[str]]:
        commands = {"worker": worker_command(self.settings, app=self.worker_app)
                    + self.worker_args,
                    "web": web_command(self.settings, self.host, self.port)}
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
            self.commands()[name], env=child_env(self.settings),
            cwd=Path(__file__).resolve().parent.parent, stdout=out,
            stderr=subprocess.STDOUT if out else None, start_new_session=True)
        return self.procs[name]

    def _wait_healthy(self, wait: float) -> None:
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
