"""Big jobs stay cheap: an archive of a million tiny captions through the embedded stack.

    .venv/bin/python -m bench.bigjob [--members 1000000] [--slice 20000] [--json var/bench/bigjob.json]

A tar.gz of ``--members`` one-line .txt members, each caption unique, is generated once under
``--data`` (var/bench/data) and reused; so is the ``--slice`` archive (its first members). The
member limit (MMBATCH_MAX_ARCHIVE_MEMBERS, 100,000 by default) is raised to fit. On the stack
``mmbatch up`` runs (cli.stack.Stack: web, model worker, ingester, trainer, search; SQLite and
the SQLite broker file), in one run:

- the slice (an embed job) end to end: seconds and items/s, then its results export streamed
  (jsonl and csv through GET /api/v1/jobs/<id>/results?format=…): seconds, first byte, bytes,
  chunks, and the web worker's peak RSS before and after;
- the big job (embed): upload, then ingest (upload whole to the walk's end) in members/s; the
  ingester's RSS and peak RSS (VmHWM from /proc) as its total passes 1k, 10k, 100k, 1M items
  (one process, so the peaks compare side by side: flat memory means the same figure);
  GET /api/v1/jobs/<id> latency p50/p95 while it is walked and, over 50 polls, after; the
  most batches ever in state ``sent`` (the dispatch window) and messages in the broker file;
- cancelling it once walked: the POST's own time, to ``cancelled``, and until no result is
  written any more;
- cancelling a second copy while it is walked: to ``cancelled``, until no item is inserted any
  more, and until the ingester gives up the walk (it reads on, storing nothing, to count the
  archive's items: the job's total).

The model worker runs the big job's batches while it is walked (the window is the setting's),
as in production: ingest shares the machine with them. The counts of rows are read from the
database file directly (no process of the stack is needed for that).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sqlite3
import statistics
import tarfile
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, select

from bench.pipeline import api_key, service_env
from bench.report import save_json
from cli.client import Client
from cli.stack import Stack, free_port
from mmbatch.settings import Settings
from store.db import Database
from store.migrate import upgrade
from store.schema import Batch, Item, Result

MARKS = (1_000, 10_000, 100_000, 1_000_000)
POLLS = 50


def archive(path: Path, n: int) -> Path:
    """A tar.gz of ``n`` tiny captions ``0000000.txt``…, each one different; reused."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with tarfile.open(part, "w:gz", compresslevel=1) as tar:
        for i in range(n):
            data = f"caption {i}: a short line about thing {i * 7919 % 1_000_003}".encode()
            info = tarfile.TarInfo(f"{i:07d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    part.rename(path)
    return path


def memory(pid: int) -> dict[str, float]:
    """A process's resident and peak resident memory, MB."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "hwm_mb": round(int(status["VmHWM"].split()[0]) / 1024, 1)}


def web_worker(stack: Stack) -> int:
    """The gunicorn worker (the child of the web process) that serves the requests."""
    pid = stack.procs["web"].pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


class Counts:
    """Rows read from the stack's SQLite files, beside it."""

    def __init__(self, settings: Settings) -> None:
        self.db = Database(settings.db_url)
        self.broker = settings.broker.removeprefix("sqla+sqlite:///")

    def sent(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Batch)
                                .where(Batch.state == "sent")) or 0)

    def queued(self) -> int | None:
        """Messages waiting in the broker file (None before it has its table)."""
        try:
            with sqlite3.connect(f"file:{self.broker}?mode=ro", uri=True, timeout=5) as c:
                return int(c.execute("SELECT count(*) FROM kombu_message WHERE visible = 1"
                                     ).fetchone()[0])
        except sqlite3.Error:
            return None

    def rows(self, job_id: str) -> tuple[int, int]:
        """The job's items and results."""
        with self.db.session() as s:
            items = s.scalar(select(func.count()).select_from(Item).where(Item.job_id == job_id))
            results = s.scalar(select(func.count()).select_from(Result)
                               .where(Result.job_id == job_id))
        return int(items or 0), int(results or 0)

    def close(self) -> None:
        self.db.dispose()


def timed_job(client: Client, job_id: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    job = client.job(job_id)
    return job, (time.perf_counter() - started) * 1000


def percentiles(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"n": len(ms), "p50_ms": round(statistics.median(ordered), 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1)}


def until_stable(probe: Any, since: float, quiet: float = 3.0, limit: float = 120.0
                 ) -> tuple[Any, float]:
    """Poll ``probe()`` until it has not changed for ``quiet`` seconds: its last value, and
    seconds from ``since`` to the last change."""
    last, changed = probe(), time.perf_counter()
    while time.perf_counter() - changed < quiet and time.perf_counter() - since < limit:
        time.sleep(0.1)
        now = probe()
        if now != last:
            last, changed = now, time.perf_counter()
    return last, round(changed - since, 2)


def slice_job(client: Client, stack: Stack, path: Path, n: int) -> dict[str, Any]:
    started = time.perf_counter()
    job = client.wait(client.submit(path, "embed")["id"], interval=0.2, timeout=7200)
    seconds = time.perf_counter() - started
    assert job["state"] == "succeeded" and job["done"] == n, job
    out: dict[str, Any] = {"items": n, "seconds": round(seconds, 1),
                           "items_per_s": round(n / seconds, 1),
                           "ingester_after": memory(stack.procs["ingester"].pid)}
    web = web_worker(stack)
    for fmt in ("jsonl", "csv"):
        before = memory(web)
        t0 = time.perf_counter()
        first, size, chunks, lines = None, 0, 0, 0
        with requests.get(f"{client.base}/api/v1/jobs/{job['id']}/results",
                          params={"format": fmt}, headers=client.http.headers, stream=True,
                          timeout=600) as response:
            response.raise_for_status()
            for chunk in response.iter_content(None):  # as the server sends them
                first = first or time.perf_counter() - t0
                size, chunks, lines = size + len(chunk), chunks + 1, lines + chunk.count(b"\n")
        out[f"export_{fmt}"] = {"seconds": round(time.perf_counter() - t0, 2),
                                "first_byte_s": round(first or 0.0, 3), "bytes": size,
                                "chunks": chunks, "lines": lines,
                                "web_before": before, "web_after": memory(web)}
    return out


def big_job(client: Client, stack: Stack, counts: Counts, path: Path, n: int
            ) -> dict[str, Any]:
    ingester = stack.procs["ingester"].pid
    t0 = time.perf_counter()
    job_id = client.submit(path, "embed")["id"]
    uploaded = time.perf_counter()
    marks: dict[str, Any] = {}
    walking_ms: list[float] = []
    most_sent, most_queued = 0, 0
    while True:
        job, ms = timed_job(client, job_id)
        if job["state"] not in ("queued", "ingesting") and not job["walking"]:
            break
        if job["walking"]:
            walking_ms.append(ms)
        for mark in MARKS:
            if job["total"] >= mark and str(mark) not in marks:
                marks[str(mark)] = {"at_s": round(time.perf_counter() - uploaded, 1),
                                    **memory(ingester)}
        most_sent = max(most_sent, counts.sent())
        most_queued = max(most_queued, counts.queued() or 0)
        time.sleep(0.25)
    walked = time.perf_counter()
    assert job["state"] == "running" and job["total"] == n, job
    marks["end"] = {"at_s": round(walked - uploaded, 1), **memory(ingester)}
    after_ms = [timed_job(client, job_id)[1] for _ in range(POLLS)]
    out = {"members": n, "upload_s": round(uploaded - t0, 1),
           "ingest_s": round(walked - uploaded, 1),
           "members_per_s": round(n / (walked - uploaded), 1),
           "done_when_walked": job["done"], "ingester": marks,
           "job_get_walking": percentiles(walking_ms), "job_get_after": percentiles(after_ms),
           "most_batches_sent": most_sent, "most_broker_messages": most_queued,
           "window": stack.settings.dispatch_window}
    out["cancel_after_walk"] = cancel(client, counts, job_id)
    return out


def cancel(client: Client, counts: Counts, job_id: str) -> dict[str, Any]:
    before = counts.rows(job_id)
    t0 = time.perf_counter()
    client.cancel(job_id)
    post = time.perf_counter() - t0
    while client.job(job_id)["state"] != "cancelled":
        time.sleep(0.05)
    cancelled = time.perf_counter() - t0
    (items, results), settled = until_stable(lambda: counts.rows(job_id), t0)
    return {"post_ms": round(post * 1000, 1), "to_cancelled_ms": round(cancelled * 1000, 1),
            "rows_stable_after_s": settled, "items_results_at_cancel": before,
            "items_results_final": [items, results]}


def cancel_walking(client: Client, counts: Counts, path: Path, n: int) -> dict[str, Any]:
    job_id = client.submit(path, "embed")["id"]
    at = min(50_000, n // 4)
    while client.job(job_id)["total"] < at:
        time.sleep(0.1)
    t0 = time.perf_counter()
    out = cancel(client, counts, job_id)
    while client.job(job_id)["walking"]:
        time.sleep(0.1)
    out["walk_given_up_s"] = round(time.perf_counter() - t0, 1)
    out["total_counted"] = client.job(job_id)["total"]
    out["cancelled_at_items"] = at
    return out


def run(members: int, slice_n: int, data: Path, work: Path) -> dict[str, Any]:
    big = archive(data / f"bigjob_{members}.tar.gz", members)
    piece = archive(data / f"bigjob_{slice_n}.tar.gz", slice_n)
    settings = Settings.from_env({**service_env(work, False),
                                  "MMBATCH_MAX_ARCHIVE_MEMBERS": str(max(members, slice_n))})
    upgrade(settings.db_url)
    key, _ = api_key(settings)
    counts = Counts(settings)
    out: dict[str, Any] = {"members": members, "archive_bytes": big.stat().st_size,
                           "slice": slice_n}
    try:
        with Stack(settings, "127.0.0.1", free_port(), log_dir=work / "logs") as stack:
            client = Client(stack.url, api_key=key, timeout=600)
            out["ingester_idle"] = memory(stack.procs["ingester"].pid)
            out["slice_job"] = slice_job(client, stack, piece, slice_n)
            print(json.dumps(out["slice_job"]), flush=True)
            out["big_job"] = big_job(client, stack, counts, big, members)
            print(json.dumps(out["big_job"]), flush=True)
            out["cancel_walking"] = cancel_walking(client, counts, big, members)
            print(json.dumps(out["cancel_walking"]), flush=True)
    finally:
        counts.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--slice", type=int, default=20_000)
    parser.add_argument("--data", type=Path, default=Path("var/bench/data"))
    parser.add_argument("--work", type=Path, default=None,
                        help="the stack's data directory (default var/bench/bigjob-<members>, "
                             "emptied first)")
    parser.add_argument("--json", type=Path, default=Path("var/bench/bigjob.json"))
    args = parser.parse_args()
    work = (args.work or Path(f"var/bench/bigjob-{args.members}")).resolve()
    if work.exists():
        shutil.rmtree(work)
    result = run(args.members, args.slice, args.data, work)
    save_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
