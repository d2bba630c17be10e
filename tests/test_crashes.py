"""Crashes and restarts, for real: a worker killed with SIGKILL mid-job, the broker (a redis-server
this module starts on its own port) killed and restarted mid-job, the database cut off mid-job
(a TCP proxy in front of PostgreSQL stops forwarding), and an upload cut off halfway.

Each job must end succeeded with every item holding exactly one result and counters that match
the results; while the database is unreachable the API answers 503 with the JSON error shape.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import requests
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from cli.client import Client
from cli.stack import Stack
from mmbatch.settings import Settings
from store.db import Database
from store.schema import Item, Job, Result
from tests.conftest import IN_CI, make_key
from tests.util import TcpProxy, free_port, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ITEMS = 120  # text items, two per batch: 60 batches, long enough to act in the middle


def _tar(path: Path, n: int, prefix: str) -> Path:
    return write_tar(path, {f"{prefix}/item_{i:03d}.txt":
                            f"caption {i} of {prefix}: a dog runs along the beach".encode()
                            for i in range(n)})


class RedisServer:
    """A redis-server of the test's own, on its own port, with an append-only file so that a
    restart keeps the queues (as the deployment's Redis does), killable and restartable."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.port = directory, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pg_url_module: str) -> Iterator[dict[str, Any]]:
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    data_dir = tmp_path_factory.mktemp("crashes")
    broker = RedisServer(tmp_path_factory.mktemp("redis"))
    broker.start()
    real = make_url(pg_url_module)
    proxy = TcpProxy((real.host or "127.0.0.1", real.port or 5432))
    proxy.restore()
    via_proxy = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = Settings.from_env({
        "MMBATCH_DATA_DIR": str(data_dir), "MMBATCH_DATABASE_URL": via_proxy,
        "MMBATCH_BROKER_URL": broker.url, "MMBATCH_BATCH_SIZE": "2",
        # the sweeper (beat, every 3 s) re-sends the work of a job that has not moved for 15 s
        "MMBATCH_SWEEP_INTERVAL_SECONDS": "3", "MMBATCH_STALE_AFTER_SECONDS": "15"})
    key = make_key(pg_url_module, "crashes")
    stack = Stack(settings, "127.0.0.1", free_port(), log_dir=data_dir / "logs", beat=True)
    stack.start(wait=180)
    db = Database(pg_url_module)  # the test's own view of the database, around the proxy
    try:
        yield {"client": Client(stack.url, api_key=key, timeout=30), "stack": stack, "db": db,
               "broker": broker, "proxy": proxy, "key": key, "data_dir": data_dir}
    finally:
        stack.stop()
        db.dispose()
        proxy.cut()
        broker.kill()


def _wait_until_mid_job(client: Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if job["done"] > 0:
            assert job["state"] == "running" and job["done"] < job["total"], job
            return job
        time.sleep(0.1)
    raise AssertionError("the job did not start")


def _assert_exactly_one_result_each(env: dict[str, Any], job_id: str, total: int) -> None:
    job = env["client"].wait(job_id, timeout=600)
    assert job["state"] == "succeeded", job
    assert (job["total"], job["done"], job["failed"]) == (total, total, 0)
    with env["db"].session() as s:
        items = s.scalar(select(func.count()).select_from(Item).where(Item.job_id == job_id))
        results = s.execute(
            select(Result.item_id, func.count()).join(Item, Item.id == Result.item_id)
            .where(Item.job_id == job_id).group_by(Result.item_id)).all()
        ok = s.scalar(select(func.count()).select_from(Result).join(Item, Item.id == Result.item_id)
                      .where(Item.job_id == job_id, Result.status == "ok"))
        stored = s.get(Job, job_id)
    assert items == total and len(results) == total
    assert {count for _, count in results} == {1}  # exactly one result per item
    assert ok == stored.done == total  # the counters match the results


def test_worker_killed_mid_job_the_job_completes(env: dict[str, Any], tmp_path: Path) -> None:
    client, stack = env["client"], env["stack"]
    job = client.submit(_tar(tmp_path / "k.tar", ITEMS, "kill"), "embed")
    _wait_until_mid_job(client, job["id"])
    worker = stack.procs["worker"]
    os.killpg(worker.pid, signal.SIGKILL)  # the machine dies: no warm shutdown, nothing acked
    worker.wait()
    stack.spawn("worker")
    _assert_exactly_one_result_each(env, job["id"], ITEMS)


def test_broker_restarted_mid_job_the_job_completes(env: dict[str, Any], tmp_path: Path) -> None:
    client = env["client"]
    job = client.submit(_tar(tmp_path / "b.tar", ITEMS, "broker"), "embed")
    _wait_until_mid_job(client, job["id"])
    env["broker"].kill()
    time.sleep(1)
    # the API reads jobs from the database: polling goes on while the broker is down
    assert client.job(job["id"])["state"] == "running"
    time.sleep(2)
    env["broker"].start()
    _assert_exactly_one_result_each(env, job["id"], ITEMS)


def test_database_unreachable_mid_job_tasks_retry_and_the_api_answers_503(
        env: dict[str, Any], tmp_path: Path) -> None:
    client = env["client"]
    job = client.submit(_tar(tmp_path / "d.tar", ITEMS, "db"), "embed")
    _wait_until_mid_job(client, job["id"])
    env["proxy"].cut()
    try:
        for path in (f"/api/v1/jobs/{job['id']}", "/api/v1/jobs"):
            response = requests.get(client.base + path, timeout=30,
                                    headers={"Authorization": f"Bearer {env['key']}"})
            assert response.status_code == 503, response.text
            assert response.headers["Content-Type"].startswith("application/json")
            error = response.json()["error"]
            assert error["code"] == "database_unavailable" and error["message"]
        time.sleep(8)  # long enough for batches to fail and retry with backoff
    finally:
        env["proxy"].restore()
    _assert_exactly_one_result_each(env, job["id"], ITEMS)
    log = (env["data_dir"] / "logs" / "worker.log").read_text()
    assert "transient_error" in log  # the worker did meet the outage, and retried


def test_an_upload_cut_off_halfway_leaves_no_job_and_no_blob(env: dict[str, Any],
                                                             tmp_path: Path) -> None:
    client, db = env["client"], env["db"]
    blobs = env["data_dir"] / "blobs"
    archive = _tar(tmp_path / "u.tar", 200, "upload").read_bytes()
    with db.session() as s:
        jobs_before = s.scalar(select(func.count()).select_from(Job))
    files_before = sorted(p for p in blobs.rglob("*") if p.is_file())
    boundary = "cutcutcut"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\nembed\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; "
            f"filename=\"u.tar\"\r\nContent-Type: application/x-tar\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + len(archive) + len(tail)
    port = env["stack"].port
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall((f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {env['key']}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {length}\r\n\r\n").encode() + head)
        conn.sendall(archive[:len(archive) // 2])
        time.sleep(0.5)  # the server has started writing the upload into blob storage
    # the client went away; the server notices and cleans up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        leftovers = sorted(p for p in blobs.rglob("*") if p.is_file())
        if leftovers == files_before:
            break
        time.sleep(0.2)
    assert leftovers == files_before  # no orphaned blob, no half-written temporary file
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == jobs_before
    assert client.health()["status"] == "ok"  # and the server is fine
