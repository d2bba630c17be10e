"""Latency of ``GET /api/v1/jobs/<id>`` under concurrent pollers, for a job of 100,000 items.

    python -m bench.api [--items 100000] [--pollers 50] [--seconds 20] [--services]

Rows are inserted directly through store/ (no encoding): a finished job of ``--items`` items with
a result each, and a 100-item job for comparison. The web process is the production one
(gunicorn, ``cli.stack.web_command``); ``--pollers`` clients (spread over processes, so the
client's own GIL does not queue them) poll as fast as they can for ``--seconds``. It prints
latency percentiles for both jobs and checks that job status is O(1) in the size of the job:
the statements one GET runs are recorded in-process and must read neither items nor results
(the job's counters answer it), and the two jobs' latencies must match.

The per-key rate limit is turned off for the run (MMBATCH_RATE_LIMIT_PER_MINUTE=0): 50 pollers
are one client hammering on purpose.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from cli.stack import child_env, free_port, web_command
from mmbatch.settings import Settings
from store.migrate import upgrade

CHUNK = 5000


def make_job(settings: Settings, n_items: int, tenant_id: int | None) -> str:
    """A succeeded classify job with ``n_items`` items and a result each, via store/."""
    from store import jobs
    from store.db import Database

    db = Database(settings.db_url)
    try:
        with db.session() as s:
            job_id = jobs.create_job(s, kind="classify", archive_blob="0" * 64,
                                     archive_name="bench.tar", archive_bytes=0,
                                     model_version_id=None, tenant_id=tenant_id).id
        for start in range(0, n_items, CHUNK):
            rows = [{"key": f"item_{i:07d}",
                     "media": {"text": {"blob": f"{i:064x}", "name": f"item_{i:07d}.txt"}},
                     "label": None, "split": None}
                    for i in range(start, min(n_items, start + CHUNK))]
            with db.session() as s:
                jobs.add_items(s, job_id, rows)
        with db.session() as s:
            jobs.transition(s, job_id, ("queued",), "running", total=n_items,
                            started_at=jobs.utcnow())
            ids = jobs.item_ids(s, job_id)
        vec = np.zeros(8, dtype="<f4")
        for start in range(0, len(ids), CHUNK):
            outcomes = [jobs.ItemOutcome(i, embedding=vec) for i in ids[start:start + CHUNK]]
            with db.session() as s:
                jobs.record_outcomes(s, job_id, 0, outcomes)
        with db.session() as s:
            assert jobs.finish_job(s, job_id)
        return job_id
    finally:
        db.dispose()


def statements_of_one_get(settings: Settings, key: str | None, job_id: str) -> list[str]:
    """The SQL one ``GET /api/v1/jobs/<id>`` runs, from an app built in this process."""
    from sqlalchemy import event

    from web.app import create_app

    app = create_app(settings)
    engine = app.extensions["mmbatch"].db.engine
    seen: list[str] = []

    def record(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        seen.append(" ".join(statement.split()))

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    client = app.test_client()
    assert client.get(f"/api/v1/jobs/{job_id}", headers=headers).status_code == 200  # warm
    event.listen(engine, "before_cursor_execute", record)
    response = client.get(f"/api/v1/jobs/{job_id}", headers=headers)
    event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200, response.get_json()
    app.extensions["mmbatch"].db.dispose()
    return seen


def _poller(url: str, headers: dict[str, str], threads: int, seconds: float,
            queue: Any) -> None:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop() -> None:
        session = requests.Session()
        mine: list[float] = []
        bad = 0
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                ok = session.get(url, headers=headers, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                mine.append(time.perf_counter() - t)
            else:
                bad += 1
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put((latencies, errors[0]))


def poll(url: str, headers: dict[str, str], pollers: int, seconds: float) -> dict[str, Any]:
    procs_n = max(1, min(pollers, 10))
    per = [pollers // procs_n + (1 if i < pollers % procs_n else 0) for i in range(procs_n)]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_poller, args=(url, headers, n, seconds, queue)) for n in per]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    lat = np.array([x for r in results for x in r[0]]) * 1000
    errors = sum(r[1] for r in results)
    if lat.size == 0:
        return {"requests": 0, "errors": errors}
    return {"requests": int(lat.size), "errors": errors,
            "requests_per_s": round(lat.size / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p90_ms": round(float(np.percentile(lat, 90)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1)}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench.pipeline import api_key, drop_database, service_env

    env = service_env(work, args.services)
    env["MMBATCH_RATE_LIMIT_PER_MINUTE"] = "0"
    settings = Settings.from_env(env)
    out: dict[str, Any] = {"deployment": "postgresql" if args.services else "embedded (sqlite)",
                           "pollers": args.pollers, "seconds": args.seconds}
    try:
        upgrade(settings.db_url)
        key, tenant = api_key(settings)
        started = time.perf_counter()
        big = make_job(settings, args.items, tenant)
        out["insert_seconds"] = round(time.perf_counter() - started, 1)
        small = make_job(settings, 100, tenant)
        sql = statements_of_one_get(settings, key, big)
        out["statements_per_get"] = sql
        bad = [q for q in sql if re.search(r"\b(items|results)\b", q, re.IGNORECASE)
               or re.search(r"count\(", q, re.IGNORECASE)]
        out["o1_statements"] = not bad
        port = free_port()
        cmd = web_command(settings, "127.0.0.1", port)
        web = subprocess.Popen(cmd, env=child_env(settings), start_new_session=True,
                               cwd=Path(__file__).resolve().parent.parent)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_healthy(base, web)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            out["web_command"] = " ".join(cmd[1:])
            for name, job_id, n in (("job_100", small, 100), (f"job_{args.items}", big,
                                                               args.items)):
                poll(f"{base}/api/v1/jobs/{job_id}", headers, args.pollers, 2)  # warm up
                out[name] = poll(f"{base}/api/v1/jobs/{job_id}", headers, args.pollers,
                                 args.seconds)
                out[name]["items"] = n
        finally:
            import signal

            os.killpg(web.pid, signal.SIGTERM)
            web.wait(20)
    finally:
        drop_database(settings)
    a, b = out.get("job_100", {}), out.get(f"job_{args.items}", {})
    if a.get("p50_ms") and b.get("p50_ms"):
        out["p50_ratio_big_over_small"] = round(b["p50_ms"] / a["p50_ms"], 2)
    return out


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], wait: float = 60) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the web process exited with {proc.returncode}")
        try:
            if requests.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError("the web process did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--services", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument("--out", type=Path, default=Path("var/bench/api.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmbatch-bench-api-") as tmp:
        result = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "statements_per_get"}, indent=2))
    print(f"job status statements: {len(result['statements_per_get'])}, "
          f"touching items/results or COUNT: {'none' if result['o1_statements'] else 'YES'}")
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
