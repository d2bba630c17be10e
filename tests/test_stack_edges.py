"""The edges a new user meets first, on the lifecycle side, with real processes on the embedded
default (``mmbatch up``: SQLite, the SQLite broker, the worker processes ``up`` starts): cancel
reaches a running training and frees the worker; training does not hold classify jobs hostage; a
restart during training goes on at once; a hard-killed ``up`` takes its children with it and a
taken port is refused with what holds it; the command line finds where ``up`` serves.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from cli import main as cli_main
from cli.client import Client
from cli.stack import Stack
from mmbatch.settings import Settings
from store.migrate import upgrade
from tests.conftest import make_key
from tests.util import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
# minutes of training on the sample (by gradient descent: the default stacking takes seconds)
LONG = {"epochs": "10000", "patience": "10000", "strategy": "concat"}


def _until(what: str, check: Any, timeout: float = 300.0, every: float = 0.5) -> Any:
    """Poll ``check()`` until it returns something true; a hang guard, not a speed check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def _stage(client: Client, job_id: str, stage: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = client.job(job_id)
        assert job["state"] in ("queued", "ingesting", "running"), job
        return job if job["stage"] == stage else None
    return _until(f"job {job_id} in stage {stage}", reached)  # type: ignore[no-any-return]


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[Settings, str]]:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)})
    upgrade(settings.db_url)
    yield settings, make_key(settings.db_url)


def test_training_neither_blocks_classify_jobs_nor_outlives_its_cancel(
        embedded: tuple[Settings, str], sample_dir: Any, tmp_path: Path) -> None:
    settings, key = embedded
    stack = Stack(settings, "127.0.0.1", free_port(), log_dir=tmp_path / "logs").start()
    try:
        client = Client(stack.url, api_key=key)
        first = client.wait(client.submit(sample_dir.train, "train", epochs=5)["id"],
                            timeout=600)
        assert first["state"] == "succeeded", first
        long = client.submit(sample_dir.train, "train", name="long", **LONG)
        _stage(client, long["id"], "training")
        # 13.4: a classify job runs while the training goes on
        classify = client.wait(client.submit(sample_dir.unlabelled, "classify")["id"],
                               timeout=300)
        assert classify["state"] == "succeeded", classify
        during = client.job(long["id"])
        assert (during["state"], during["stage"]) == ("running", "training")
        # 13.13: the training says how far it is
        assert during["training"]["epoch"] >= 1 and during["training"]["epochs"] == 10000
        assert during["eta_seconds"] is not None and during["progress"] < 1
        # 13.1: cancel reaches it, registers nothing, and frees the worker that trained it
        assert client.cancel(long["id"])["state"] == "cancelled"
        again = client.wait(client.submit(sample_dir.train, "train", name="after",
                                          epochs=5)["id"], timeout=300)
        assert again["state"] == "succeeded", again
        models = {m["name"] for m in client.models()}
        assert models == {"fusion", "after"}
        assert client.job(long["id"])["model"] is None
        log = (tmp_path / "logs" / "trainer.log").read_text()
        assert f"training_cancelled job={long['id']}" in log
    finally:
        stack.stop()


def test_a_restart_during_training_goes_on_at_once(embedded: tuple[Settings, str],
                                                   sample_dir: Any, tmp_path: Path) -> None:
    settings, key = embedded
    assert settings.stale_after_seconds == 600  # the sweeper cannot be what saves it
    port = free_port()
    stack = Stack(settings, "127.0.0.1", port, log_dir=tmp_path / "logs").start()
    client = Client(stack.url, api_key=key)
    try:
        job = client.submit(sample_dir.train, "train", epochs="400", patience="400")
        _stage(client, job["id"], "training")
    finally:
        stack.stop()  # SIGTERM to every process, SIGKILL after 20 s: as `up` stops
    stack = Stack(settings, "127.0.0.1", port, log_dir=tmp_path / "logs").start()
    try:
        done = client.wait(job["id"], timeout=420)
        assert done["state"] == "succeeded", done
        assert done["model"] is not None
    finally:
        stack.stop()


def _up(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMBATCH_")}
    env["MMBATCH_DATA_DIR"] = str(data_dir)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, set()).add(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_hard_killed_up_takes_its_children_and_a_taken_port_is_refused(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    up = _up(tmp_path, port, log)
    try:
        _until("up serving", lambda: _healthy(url) or up.poll() is not None, timeout=180)
        assert up.poll() is None, log.read_text()
        children = _descendants(up.pid)
        assert len(children) >= 3, children  # web, workers, beat
        os.kill(up.pid, signal.SIGKILL)
        up.wait()
        _until("the children of a killed `up` to end",
               lambda: not any(_alive(p) for p in children), timeout=60)
        again = _up(tmp_path, port, log)
        _until("up serving again", lambda: _healthy(url) or again.poll() is not None,
               timeout=180)
        assert again.poll() is None, log.read_text()[-3000:]
        os.killpg(again.pid, signal.SIGTERM)
        again.wait(60)
    finally:
        for p in (up,):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        refused = subprocess.run([sys.executable, "-m", "cli.main", "up", "--port", str(port)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "MMBATCH_DATA_DIR": str(tmp_path)})
    assert refused.returncode != 0
    assert f"port {port}" in refused.stderr and f"pid {os.getpid()}" in refused.stderr, \
        refused.stderr


def test_the_command_line_finds_where_up_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    up = _up(tmp_path, port, log)
    try:
        _until("up serving", lambda: _healthy(f"http://127.0.0.1:{port}") or up.poll() is not None,
               timeout=180)
        started = time.monotonic()
        monkeypatch.chdir(tmp_path)
        for name in [k for k in os.environ if k.startswith("MMBATCH_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("MMBATCH_DATA_DIR", str(tmp_path))
        out = CliRunner().invoke(cli_main.main, ["jobs"])
        assert out.exit_code == 0, out.output  # talked to `up`'s port, not 8000
        # elsewhere, with another data directory: the 401 names the directory it used
        monkeypatch.setenv("MMBATCH_DATA_DIR", str(tmp_path / "elsewhere"))
        monkeypatch.setenv("MMBATCH_URL", f"http://127.0.0.1:{port}")
        out = CliRunner().invoke(cli_main.main, ["jobs"])
        assert out.exit_code != 0 and str(tmp_path / "elsewhere") in out.output, out.output
        # nothing listening: one line saying what to do, no traceback
        monkeypatch.setenv("MMBATCH_URL", f"http://127.0.0.1:{free_port()}")
        out = CliRunner().invoke(cli_main.main, ["jobs"])
        assert out.exit_code != 0 and len(out.output.strip().splitlines()) == 1, out.output
        assert "mmbatch up" in out.output
        time.sleep(max(0.0, 12 - (time.monotonic() - started)))  # beat sends webhooks every 5 s
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(60)
    noisy = [line for line in log.read_text().splitlines()
             if "mmbatch.webhooks" in line and not line.strip().startswith(".")]  # not the banner
    assert noisy == []
