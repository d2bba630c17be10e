"""Fair sharing of the workers: how long a small job takes while a bulk flood runs.

On the stack ``mmbatch up`` runs (embedded by default; ``--services`` for Redis and PostgreSQL on
127.0.0.1), with text-only archives so that the model work is short: a small job (20 items,
normal priority) alone on an idle system, then the same while a bulk job (2,000 items, bulk
priority) runs. Done twice side by side in one run: with the dispatcher's window
(MMBATCH_DISPATCH_WINDOW, default 2) and with a window so large that every batch goes to the
broker at once, as before the database became the queue. Prints the small job's seconds in each
case and the ratio to idle (target: within 2x its idle time, plus one batch).

    .venv/bin/python -m bench.fairness [--bulk 2000] [--small 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.pipeline import api_key, drop_database, service_env
from bench.report import save_json
from cli.client import Client
from cli.stack import Stack, free_port
from mmbatch.settings import Settings
from store.migrate import upgrade

HUGE_WINDOW = 1_000_000  # every batch in the broker at once: the fan-out before the dispatcher


def _archive(path: Path, prefix: str, n: int) -> Path:
    """A tar of ``n`` one-sentence captions: items whose model work is short."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            data = f"{prefix} caption number {i}, a short sentence about nothing".encode()
            info = tarfile.TarInfo(f"{prefix}{i:05d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _timed(client: Client, archive: Path, **options: Any) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    job = client.wait(client.submit(archive, "embed", **options)["id"], timeout=3600)
    assert job["state"] == "succeeded", job
    return time.perf_counter() - started, job


def run(window: int, bulk: Path, small: Path, work: Path, services: bool) -> dict[str, Any]:
    settings = Settings.from_env({**service_env(work, services),
                                  "MMBATCH_DISPATCH_WINDOW": str(window)})
    upgrade(settings.db_url)
    key, _ = api_key(settings)
    try:
        return _measured(settings, key, window, bulk, small, work)
    finally:
        drop_database(settings)


def _measured(settings: Settings, key: str, window: int, bulk: Path, small: Path,
              work: Path) -> dict[str, Any]:
    with Stack(settings, "127.0.0.1", free_port(), log_dir=work / "logs") as stack:
        client = Client(stack.url, api_key=key)
        _timed(client, small)  # warm: encoders loaded
        idle, _ = _timed(client, small)
        flood = client.submit(bulk, "embed", priority="bulk")
        while client.job(flood["id"])["done"] < 64:
            time.sleep(0.1)
        loaded, _ = _timed(client, small)
        seen = client.job(flood["id"])
        flood_done = client.wait(flood["id"], timeout=3600)
    seconds = (datetime.fromisoformat(flood_done["finished_at"]).timestamp()
               - datetime.fromisoformat(flood_done["started_at"]).timestamp())
    return {"window": window, "small_idle_s": round(idle, 2),
            "small_during_flood_s": round(loaded, 2), "ratio": round(loaded / idle, 2),
            "flood_done_when_small_finished": seen["done"], "flood_items": seen["total"],
            "flood_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk", type=int, default=2000)
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--services", action="store_true",
                        help="Redis and PostgreSQL on 127.0.0.1 (a fresh database per run)")
    parser.add_argument("--windows", type=int, nargs="+", default=None,
                        help=f"dispatch windows to compare (default: the setting's, and "
                             f"{HUGE_WINDOW:,}: everything at once)")
    parser.add_argument("--json", type=Path, default=Path("var/bench/fairness.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bulk = _archive(root / "bulk.tar", "bulk", args.bulk)
        small = _archive(root / "small.tar", "small", args.small)
        for window in args.windows or (Settings().dispatch_window, HUGE_WINDOW):
            rows.append(run(window, bulk, small, root / f"w{window}", args.services))
            print(json.dumps(rows[-1]), flush=True)
    save_json(args.json, rows)


if __name__ == "__main__":
    main()
