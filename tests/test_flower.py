"""Flower against the broker, as docker-compose.yml runs it: ``celery -A worker.ingest_app
flower`` beside a real ingest worker of the same torch-free app, started with task events (-E)
on Redis; Flower sees the worker and the tasks it ran, and neither process loads torch (both
run from the web image, which has none)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from cli.stack import child_env, worker_command
from mmbatch.contract import TASK_WEBHOOKS
from mmbatch.settings import Settings
from tests.util import free_port
from worker.app import create_celery

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent


def _poll(fn: Any, what: str, procs: dict[str, Path], wait: float = 90) -> Any:
    deadline = time.monotonic() + wait
    while True:
        try:
            found = fn()
            if found:
                return found
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{p.read_text()[-3000:]}" for n, p in procs.items())
            raise AssertionError(f"{what} within {wait:.0f}s\n{logs}")
        time.sleep(0.5)


def test_flower_sees_the_worker_and_its_tasks(redis_url: str, broker_prefix: str,
                                              tmp_path: Path) -> None:
    from store.migrate import upgrade

    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": redis_url,
                                  "MMBATCH_BROKER_PREFIX": broker_prefix + "flower:"})
    upgrade(settings.db_url)
    env = child_env(settings)
    env["FLOWER_UNAUTHENTICATED_API"] = "true"  # the JSON API, for this test only
    port = free_port()
    logs = {"worker": tmp_path / "worker.log", "flower": tmp_path / "flower.log"}
    commands = {
        "worker": worker_command(settings, "ingest", "flowertest",
                                 app="worker.ingest_app") + ["-E"],
        "flower": [sys.executable, "-m", "celery", "-A", "worker.ingest_app", "flower",
                   f"--port={port}", "--address=127.0.0.1"],
    }
    procs = {}
    try:
        for name, cmd in commands.items():
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        assert _poll(lambda: requests.get(url + "/healthcheck", timeout=5).text == "OK",
                     "Flower did not answer", logs)
        _poll(lambda: "ready." in logs["worker"].read_text(), "the worker did not start", logs)
        workers = _poll(lambda: requests.get(url + "/api/workers", params={"refresh": "1"},
                                             timeout=30).json(),
                        "Flower saw no worker", logs)
        assert any(name.startswith("flowertest@") for name in workers), workers
        create_celery(settings).send_task(TASK_WEBHOOKS)
        tasks = _poll(lambda: {t["name"]: t["state"] for t in requests.get(
            url + "/api/tasks", timeout=10).json().values()}.get(TASK_WEBHOOKS) == "SUCCESS",
            "Flower did not see the task succeed", logs)
        assert tasks
        for name, proc in procs.items():
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            assert "libtorch" not in maps, f"{name} loaded torch"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
