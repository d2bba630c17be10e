"""Throughput with one and with two model worker processes, one torch thread each, the same
settings otherwise, side by side in one run (target: two give at least 1.6x on two cores).

The stack ``mmbatch up`` runs (embedded by default; ``--services`` for Redis and PostgreSQL on
127.0.0.1), the synthetic archive of ``bench.synth`` (a photo-like JPEG, a caption and a sound
per item). A warm-up job first loads every worker's encoders; the figure is the measured job's
processing time (its ``started_at`` to ``finished_at``: the batches, not the upload or ingest).

    .venv/bin/python -m bench.scaleout [--items 192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import synth
from bench.pipeline import api_key, drop_database, service_env
from bench.report import save_json
from cli.client import Client
from cli.stack import Stack, free_port
from mmbatch.settings import Settings
from store.migrate import upgrade


def _seconds(job: dict[str, Any]) -> float:
    return (datetime.fromisoformat(job["finished_at"]).timestamp()
            - datetime.fromisoformat(job["started_at"]).timestamp())


def run(workers: int, archive: Path, warm: Path, items: int, work: Path,
        services: bool) -> dict[str, Any]:
    settings = Settings.from_env({**service_env(work, services), "MMBATCH_TORCH_THREADS": "1",
                                  "MMBATCH_DECODE_THREADS": "0", "MMBATCH_BATCH_SIZE": "16",
                                  "MMBATCH_DISPATCH_WINDOW": str(2 * workers)})
    upgrade(settings.db_url)
    key, _ = api_key(settings)
    try:
        return _measured(settings, key, workers, archive, warm, items, work)
    finally:
        drop_database(settings)


def _measured(settings: Settings, key: str, workers: int, archive: Path, warm: Path, items: int,
              work: Path) -> dict[str, Any]:
    with Stack(settings, "127.0.0.1", free_port(), log_dir=work / "logs",
               model_workers=workers) as stack:
        client = Client(stack.url, api_key=key)
        client.wait(client.submit(warm, "embed")["id"], timeout=1800)  # encoders loaded
        job = client.wait(client.submit(archive, "embed")["id"], timeout=3600)
    assert job["state"] == "succeeded" and job["done"] == items, job
    seconds = _seconds(job)
    return {"workers": workers, "items": items, "processing_s": round(seconds, 2),
            "items_per_s": round(items / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=192)
    parser.add_argument("--services", action="store_true",
                        help="Redis and PostgreSQL on 127.0.0.1 (a fresh database per run)")
    parser.add_argument("--json", type=Path, default=Path("var/bench/scaleout.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = synth.write_archive(root / "items.tar", args.items, seed=0)
        warm = synth.write_archive(root / "warm.tar", 64, seed=1)
        rows = [run(n, archive, warm, args.items, root / f"w{n}", args.services)
                for n in (1, 2)]
    speedup = rows[1]["items_per_s"] / rows[0]["items_per_s"]
    result = {"runs": rows, "speedup": round(speedup, 2), "target": 1.6,
              "met": speedup >= 1.6}
    print(json.dumps(result, indent=2))
    save_json(args.json, result)


if __name__ == "__main__":
    main()
