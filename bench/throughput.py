"""End-to-end throughput of the embedded stack: items/s of a classify job and the worker's memory.

    python -m bench.throughput [--train 240] [--items 400] [--out var/bench/throughput.json]

Starts the web server and one worker exactly as ``mmbatch up`` does (SQLite, kombu's SQLAlchemy
transport, a solo-pool worker), trains on the labelled sample, then classifies an unlabelled
sample of ``--items`` items twice: once cold (encoders run) and once again with the same files
(every feature comes from the cache). Times are measured from job creation to job completion as
the server records them, so they include upload handling, ingest, queueing and the database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import tempfile
from pathlib import Path
from typing import Any

from mmbatch.client import Client
from mmbatch.sample import write_sample
from mmbatch.settings import Settings
from mmbatch.stack import Stack
from store.migrate import upgrade


def _seconds(job: dict[str, Any]) -> float:
    start = dt.datetime.fromisoformat(job["created_at"])
    return (dt.datetime.fromisoformat(job["finished_at"]) - start).total_seconds()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(n_train: int, n_items: int, work: Path) -> dict[str, Any]:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(work)})
    sample = write_sample(work / "sample", n_train=n_train, n_unlabelled=n_items, seed=1)
    upgrade(settings.db_url)
    with Stack(settings, "127.0.0.1", _free_port(), log_dir=work / "logs") as stack:
        client = Client(stack.url)
        train = client.wait(client.submit(sample.train, "train", name="bench")["id"])
        assert train["state"] == "succeeded", train
        cold = client.wait(client.submit(sample.unlabelled, "classify")["id"])
        warm = client.wait(client.submit(sample.unlabelled, "classify")["id"])
        peak = stack.worker_peak_rss()
    for job in (cold, warm):
        assert job["state"] == "succeeded" and job["failed"] == 0, job
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "batch_size": settings.batch_size,
        "train": {"items": train["total"], "seconds": round(_seconds(train), 2)},
        "classify_cold": {"items": cold["total"], "seconds": round(_seconds(cold), 2),
                          "items_per_s": round(cold["total"] / _seconds(cold), 2)},
        "classify_cached_features": {"items": warm["total"], "seconds": round(_seconds(warm), 2),
                                     "items_per_s": round(warm["total"] / _seconds(warm), 2)},
        "worker_peak_rss_mib": None if peak is None else round(peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("var/bench/throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmbatch-bench-") as tmp:
        result = run(args.train, args.items, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"classify: {result['classify_cold']['items_per_s']} items/s cold, "
          f"{result['classify_cached_features']['items_per_s']} items/s from the feature cache; "
          f"worker peak RSS {result['worker_peak_rss_mib']} MiB  (written to {args.out})")


if __name__ == "__main__":
    main()
