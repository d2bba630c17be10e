"""The job lifecycle with real processes: Redis, PostgreSQL, a Celery worker and Celery beat.

Cancel mid-job; a poison item that kills its worker process; a webhook received by a local HTTP
server and checked against its signature; the stale-job sweeper after the broker's queue is
deleted; nightly reprocessing (beat, every minute here) after a new model version is promoted.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
from sqlalchemy import func, select

from cli.client import Client
from cli.stack import Stack
from mmbatch.contract import TASK_SWEEP
from mmbatch.settings import Settings
from store import keys
from store.db import Database
from store.registry import promote
from store.schema import Feature, Result
from tests.conftest import make_key
from tests.util import free_port, write_tar
from worker.app import QuietHousekeeping

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


class Hooks(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hooks.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def hook_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_url_module: str, redis_url: str,
          broker_prefix: str) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("lifecycle")
    settings = Settings.from_env({
        "MMBATCH_DATA_DIR": str(data_dir), "MMBATCH_DATABASE_URL": pg_url_module,
        "MMBATCH_BROKER_URL": redis_url, "MMBATCH_BROKER_PREFIX": broker_prefix,
        "MMBATCH_BATCH_SIZE": "4", "MMBATCH_POISON_LIMIT": "2",
        "MMBATCH_WEBHOOK_ALLOW": "127.0.0.1",
        "MMBATCH_REPROCESS_CRON": "* * * * *", "MMBATCH_SWEEP_INTERVAL_SECONDS": "3",
        "MMBATCH_STALE_AFTER_SECONDS": "30"})
    db = Database(settings.db_url)
    key = make_key(settings.db_url, "lifecycle")
    with db.session() as s:
        secret = keys.authenticate(s, key).webhook_secret
    # prefork with one child: a child that dies is replaced and its task redelivered; the
    # worker's app is tests.faults, whose batches die on an item called "poison"
    patch = pytest.MonkeyPatch()
    patch.setenv("MMBATCH_TEST_CRASH_KEY", "poison")  # read by tests.faults
    st = Stack(settings, "127.0.0.1", free_port(), log_dir=data_dir / "logs", beat=True,
               worker_args=["--pool", "prefork", "--concurrency", "1"], worker_app="tests.faults")
    st.start(wait=180)
    patch.undo()
    try:
        yield {"client": Client(st.url, api_key=key), "key": key, "settings": settings, "db": db,
               "secret": secret, "stack": st, "logs": data_dir / "logs"}
    finally:
        st.stop()
        db.dispose()


def _texts(n: int, prefix: str = "t") -> dict[str, bytes]:
    return {f"{prefix}/item_{i:03d}.txt": f"caption number {i} about {prefix}".encode()
            for i in range(n)}


def test_poison_item_fails_after_its_attempts_and_the_rest_succeeds(
        stack: dict[str, Any], tmp_path: Path) -> None:
    client = stack["client"]
    files = _texts(7, "p")
    files["p/poison.txt"] = b"this item kills the worker process that reads it"
    job = client.submit(write_tar(tmp_path / "p.tar", files), "embed")
    job = client.wait(job["id"], timeout=600)
    assert job["state"] == "succeeded", job
    assert (job["total"], job["done"], job["failed"]) == (8, 7, 1)
    page = stack["client"]._call("GET", f"/api/v1/jobs/{job['id']}/errors")
    [error] = page["items"]
    assert error["key"] == "p/poison" and "crashed or timed out" in error["error"]
    assert "fault_injection" in (stack["logs"] / "worker.log").read_text()


def test_webhook_is_signed_and_exports_stream(stack: dict[str, Any], tmp_path: Path,
                                              hook_server: str) -> None:
    client = stack["client"]
    job = client.submit(write_tar(tmp_path / "w.tar", _texts(5, "w")), "embed",
                        callback_url=hook_server)
    job = client.wait(job["id"], timeout=300)
    assert job["state"] == "succeeded" and job["callback_url"] == hook_server
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            json.loads(b)["job"]["id"] == job["id"] for _, b in Hooks.received):
        time.sleep(0.5)
    headers, body = next((h, b) for h, b in Hooks.received
                         if json.loads(b)["job"]["id"] == job["id"])
    expected = "sha256=" + hmac.new(stack["secret"].encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Mmbatch-Signature"], expected)
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" and payload["job"]["done"] == 5

    # exports: JSON lines, CSV and Parquet carry the same items
    jsonl = io.BytesIO()
    client.export(job["id"], "jsonl", jsonl, embeddings=True)
    lines = [json.loads(line) for line in jsonl.getvalue().decode().splitlines()]
    assert len(lines) == 5 and all(len(r["embedding"]) == 4480 for r in lines)
    out = io.BytesIO()
    client.export(job["id"], "csv", out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue().decode())))
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in lines)
    import pyarrow.parquet as pq

    pq_path = tmp_path / "r.parquet"
    with open(pq_path, "wb") as f:
        client.export(job["id"], "parquet", f, embeddings=True)
    table = pq.read_table(pq_path)
    assert table.num_rows == 5 and set(table.column("status").to_pylist()) == {"ok"}
    # the command line: Parquet to a redirected standard output, and to a file
    from click.testing import CliRunner

    from cli.main import main

    env = {"MMBATCH_API_KEY": stack["key"]}
    piped = CliRunner().invoke(main, ["results", job["id"], "--format", "parquet",
                                      "--url", client.base], env=env)
    assert piped.exit_code == 0, piped.output
    assert pq.read_table(io.BytesIO(piped.stdout_bytes)).num_rows == 5
    to_file = CliRunner().invoke(main, ["results", job["id"], "--format", "parquet", "-o",
                                        str(tmp_path / "cli.parquet"), "--url", client.base],
                                 env=env)
    assert to_file.exit_code == 0 and pq.read_table(tmp_path / "cli.parquet").num_rows == 5


def test_cancel_mid_job_keeps_written_results(stack: dict[str, Any], tmp_path: Path) -> None:
    client = stack["client"]
    job = client.submit(write_tar(tmp_path / "c.tar", _texts(120, "c")), "embed")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = client.job(job["id"])
        if state["done"] > 0:
            break
        time.sleep(0.2)
    cancelled = client.cancel(job["id"])
    assert cancelled["state"] == "cancelled"
    time.sleep(3)  # outstanding batches drain without effect
    final = client.job(job["id"])
    assert final["state"] == "cancelled" and 0 < final["done"] < final["total"] == 120
    rows = list(client.results(job["id"]))
    assert sum(r["status"] == "ok" for r in rows) == final["done"]
    assert {r["status"] for r in rows} <= {"ok", "pending"}


def test_sweeper_revives_a_job_whose_messages_were_lost(stack: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """Stop the ingest worker, submit, delete the broker's queue, start it: the sweeper wins."""
    st: Stack = stack["stack"]
    settings: Settings = stack["settings"]
    worker = st.procs["ingester"]  # (up runs ingest in a process of its own)
    worker.terminate()
    worker.wait(60)
    job = stack["client"].submit(write_tar(tmp_path / "s.tar", _texts(6, "s")), "embed")
    r = redis.Redis.from_url(settings.broker_url)
    queue = f"{settings.broker_prefix}ingest"
    assert r.llen(queue) >= 1  # the ingest message (and beat's housekeeping)
    r.delete(queue)  # the broker lost them all
    st.spawn("ingester")
    job = stack["client"].wait(job["id"], timeout=300)
    assert job["state"] == "succeeded" and job["done"] == 6


def test_beat_reprocesses_with_a_promoted_model_reusing_features(
        stack: dict[str, Any], sample_dir: Any) -> None:
    client, db = stack["client"], stack["db"]
    first = client.wait(client.submit(sample_dir.train, "train", name="m")["id"], timeout=600)
    assert first["state"] == "succeeded"
    job = client.wait(client.submit(sample_dir.unlabelled, "classify")["id"], timeout=600)
    assert job["state"] == "succeeded" and job["model"]["id"] == first["model"]["id"]
    second = client.wait(client.submit(sample_dir.train, "train", name="m", seed="1")["id"],
                         timeout=600)
    new_model = second["model"]["id"]
    with db.session() as s:
        features_before = s.scalar(select(func.count()).select_from(Feature))
        promote(s, new_model)
    # beat runs `reprocess` every minute here; wait for the job it makes
    deadline = time.monotonic() + 240
    reprocess = None
    while time.monotonic() < deadline and reprocess is None:
        done = [j for j in client.jobs(kind="reprocess") if j["model"]["id"] == new_model]
        reprocess = done[0] if done else None
        time.sleep(1)
    assert reprocess is not None, "beat did not start a reprocess job"
    reprocess = client.wait(reprocess["id"], timeout=300)
    assert reprocess["state"] == "succeeded" and reprocess["total"] == job["total"]
    with db.session() as s:
        per_item = s.execute(select(Result.item_id, func.count()).where(
            Result.model_version_id == new_model).group_by(Result.item_id)).all()
        assert len(per_item) == job["total"] and {n for _, n in per_item} == {1}
        assert s.scalar(select(func.count()).select_from(Feature)) == features_before
    rows = list(client.results(reprocess["id"]))
    assert len(rows) == job["total"] and all(r["status"] == "ok" for r in rows)
    # nothing left to do: a manual run starts no second job
    client.reprocess()
    time.sleep(5)
    assert len([j for j in client.jobs(kind="reprocess")]) == 1


def test_the_quiet_log_filter_never_raises_whatever_a_beat_line_carries() -> None:
    """Beat logs a broker error as (message, [traceback lines]): the filter once raised on the
    list (unhashable), which took beat down, and with it the sweeper."""
    quiet = QuietHousekeeping()

    def line(*args: object) -> logging.LogRecord:
        return logging.LogRecord("celery.beat", logging.INFO, __file__, 1, "%s %s", args, None)

    assert quiet.filter(line("Message Error: %s", ["Traceback…", "OSError"]))
    assert quiet.filter(line("Scheduler: Sending due task", "mmbatch.reprocess"))
    assert not quiet.filter(line("Scheduler: Sending due task", TASK_SWEEP))
