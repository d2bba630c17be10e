"""Throughput of the service against the bare model loop, a naive design and a new head.

    python -m bench.pipeline --items 500 [--scale 5] [--services] [--out var/bench/pipeline.json]

On one synthetic archive (bench.synth: 640x480 photos, 20-60 word captions, 5 s 44.1 kHz stereo
WAV), with the same machine and ``MMBATCH_BATCH_SIZE``, side by side:

- (a) the bare loop: decode + preprocess + encoders + fusion + head in this process, no queue,
  no database (bench.loops), and the plain fp32 batch-1 loop it must beat by 1.8x;
- (b) end to end: upload through the API (gunicorn), broker, one solo worker, results in the
  database, job succeeded; from the first byte uploaded to the server's finish time;
- (c) the naive design: one Celery task per item (bench.naive), run by a real worker process;
- (d) the same items again under a second classifier head: a ``reprocess`` job through the API
  (a classify job over the same archive if the server has no reprocess endpoint); the feature
  cache means no encoder runs, which the run checks.

It prints items/s, the ratios b/a, after_upload/a (b from the moment the upload is whole to
the last result, ingest included: it streams), b/c and d/b, the worker's peak RSS and whether the API process
ever mapped torch, and writes JSON. ``--scale 5`` then runs (b) again on 5x the items in a fresh
worker, to show how peak memory and per-item cost grow. The embedded default (SQLite, broker in
a SQLite file) is used unless ``--services`` points everything at Redis and PostgreSQL.

Archives are generated once under ``--data`` (var/bench/data) and reused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import synth
from bench.loops import bare_loop, plain_encoders, plain_loop
from cli.client import ApiError, Client
from cli.stack import Stack, child_env, free_port
from mmbatch.contract import DERIVED_MODALITIES, MODALITIES
from mmbatch.settings import Settings
from store import keys
from store.db import Database
from store.migrate import upgrade
from store.registry import ModelRow, get_model
from worker.model_cache import models_of
from worker.runtime import Runtime

# The modalities the sample's files hold (no clips: a clip's features come from the image encoder)
FILE_MODALITIES = tuple(m for m in MODALITIES if m not in DERIVED_MODALITIES)

TRAIN_ITEMS = 96
TRAIN_EPOCHS = 60
WARM_ITEMS = 32  # a full batch: the first batch of new shapes costs oneDNN kernel creation
REDIS_DB = 13  # the bench's own Redis database, flushed before use


# --- setup ------------------------------------------------------------------------------------



def service_env(work: Path, services: bool) -> dict[str, str]:
    """MMBATCH_ variables of the stack under test: embedded in ``work``, or Redis + PostgreSQL
    (a fresh database, and the bench's own Redis database)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MMBATCH_")}
    env.pop("MMBATCH_API_KEY", None)
    env["MMBATCH_DATA_DIR"] = str(work)
    if not services:
        env.pop("MMBATCH_DATABASE_URL", None)
        env.pop("MMBATCH_BROKER_URL", None)
        return env
    import psycopg
    import redis

    name = f"mmbatch_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    env["MMBATCH_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    env["MMBATCH_BROKER_URL"] = f"redis://127.0.0.1:6379/{REDIS_DB}"
    return env


def drop_database(settings: Settings) -> None:
    if not settings.database_url.startswith("postgresql"):
        return
    import psycopg

    name = settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def api_key(settings: Settings) -> tuple[str, int | None]:
    """MMBATCH_API_KEY if set, else a key made for the bench in its own database; and its
    tenant."""
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            given = os.environ.get("MMBATCH_API_KEY")
            if given:
                row = keys.authenticate(s, given)
                return given, None if row is None else row.tenant_id
            new = keys.create_key(s, "bench")
            return new.key, new.tenant_id
    finally:
        db.dispose()


def _ts(value: str) -> float:
    stamp = dt.datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def _api_loads_torch(stack: Stack) -> bool | None:
    """Whether the web process or any of its children has torch's library mapped (Linux)."""
    web = stack.procs.get("web")
    if web is None:
        return None
    pids = {web.pid}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) in pids:
            pids.add(int(stat.parent.name))
    for pid in pids:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            continue
    return False


# --- measurements through the service ---------------------------------------------------------


def submit_and_wait(client: Client, archive: Path, kind: str, **options: Any) -> dict[str, Any]:
    """Upload, wait, and time from the first byte sent to the server's finish time."""
    started = time.time()
    job = client.submit(archive, kind, **options)
    job = client.wait(job["id"], interval=0.2)
    if job["state"] != "succeeded":
        raise RuntimeError(f"{kind} job {job['id']} ended {job['state']}: {job.get('error')}")
    return _timing(job, started)


def _timing(job: dict[str, Any], started: float) -> dict[str, Any]:
    finished = _ts(job["finished_at"])
    seconds = finished - started
    out = {"job": job["id"], "items": job["total"], "failed": job["failed"],
           "started_at": round(started, 3), "ended_at": round(finished, 3),
           "seconds": round(seconds, 2), "items_per_s": round(job["total"] / seconds, 2),
           "load_average": round(os.getloadavg()[0], 2)}
    if job.get("created_at") and job.get("started_at"):
        # the job is created when its upload is whole; it starts when the walk has handed its
        # first items over (ingest streams: the rest of the walk overlaps the processing)
        out["upload_seconds"] = round(_ts(job["created_at"]) - started, 2)
        out["first_items_seconds"] = round(_ts(job["started_at"]) - _ts(job["created_at"]), 2)
        out["processing_seconds"] = round(finished - _ts(job["started_at"]), 2)
        out["after_upload_seconds"] = round(finished - _ts(job["created_at"]), 2)
    return out


def reprocess_and_wait(client: Client, model_id: int) -> dict[str, Any] | None:
    """(d) as the service does it: a reprocess job under ``model_id``; None without the
    endpoint."""
    before = {j["id"] for j in client.jobs(kind="reprocess")} if hasattr(client, "jobs") else set()
    started = time.time()
    try:
        client.reprocess(model=model_id)
    except (ApiError, AttributeError) as exc:
        if isinstance(exc, AttributeError) or exc.status in (404, 405):
            return None
        raise
    deadline = time.monotonic() + 120
    while True:
        new = [j for j in client.jobs(kind="reprocess") if j["id"] not in before]
        if new:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("no reprocess job appeared")
        time.sleep(0.1)
    job = client.wait(new[0]["id"], interval=0.2)
    if job["state"] != "succeeded":
        raise RuntimeError(f"reprocess job {job['id']} ended {job['state']}: {job.get('error')}")
    return _timing(job, started)


def feature_rows(settings: Settings) -> int:
    from sqlalchemy import func, select

    from store.db import Database
    from store.schema import Feature

    db = Database(settings.db_url)
    try:
        with db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Feature)) or 0)
    finally:
        db.dispose()


def model_dict(settings: Settings, model_id: int) -> ModelRow:
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            return ModelRow.of(get_model(s, model_id))
    finally:
        db.dispose()


def naive_run(settings: Settings, archive: Path, model_id: int, tenant_id: int | None,
              warm: Path, log_dir: Path) -> dict[str, Any]:
    """(c): the naive worker process on its own queue; the job is created here, as the API
    would, and its state read from the database."""
    from bench.naive import TASK_NAIVE_INGEST, create_naive_celery, worker_command
    from store import jobs
    from store.blobs import BlobStore
    from store.db import Database

    app = create_naive_celery(settings)
    db = Database(settings.db_url)
    blobs = BlobStore(settings.blobs)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "naive-worker.log", "ab") as out:
        proc = subprocess.Popen(worker_command(settings), env=child_env(settings),
                                cwd=Path(__file__).resolve().parent.parent, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def run(path: Path) -> dict[str, Any]:
            started = time.time()
            with open(path, "rb") as f:
                digest = blobs.put_stream(f)
            with db.session() as s:
                job_id = jobs.create_job(s, kind="classify", archive_blob=digest,
                                         archive_name=path.name, archive_bytes=path.stat().st_size,
                                         model_version_id=model_id, tenant_id=tenant_id).id
            app.send_task(TASK_NAIVE_INGEST, args=[job_id])
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the naive worker exited with {proc.returncode}")
                with db.session() as s:
                    job = jobs.get_job(s, job_id)
                    if job.state in ("succeeded", "failed"):
                        total, failed, state = job.total, job.failed, job.state
                        finished = job.finished_at
                        break
                time.sleep(0.2)
            if state != "succeeded" or finished is None:
                raise RuntimeError(f"naive job ended {state}")
            if finished.tzinfo is None:
                finished = finished.replace(tzinfo=dt.UTC)
            seconds = finished.timestamp() - started
            return {"job": job_id, "items": total, "failed": failed,
                    "seconds": round(seconds, 2), "items_per_s": round(total / seconds, 2)}

        run(warm)  # load the encoders, as a warm worker has them
        result = run(archive)
        result["worker_peak_rss_mib"] = _peak_rss_mib(proc.pid)
        return result
    finally:
        import os as _os
        import signal

        if proc.poll() is None:
            _os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                _os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        db.dispose()


def _peak_rss_mib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        return None
    return None


def _tenant_of(settings: Settings, model_id: int) -> int | None:
    from store.db import Database
    from store.registry import get_model

    db = Database(settings.db_url)
    try:
        with db.session() as s:
            return getattr(get_model(s, model_id), "tenant_id", None)
    finally:
        db.dispose()


# --- the run ----------------------------------------------------------------------------------


def prepare_archives(data: Path, n_items: int, scale: int) -> dict[str, Path]:
    paths = {
        "main": synth.write_archive(data / f"bench_{n_items}_s1.tar", n_items, seed=1),
        "naive": synth.write_archive(data / f"bench_{n_items}_s2.tar", n_items, seed=2),
        "train": synth.write_archive(data / f"train_{TRAIN_ITEMS}_s3.tar", TRAIN_ITEMS, seed=3,
                                     labels=True),
    }
    for i in range(4):  # one small archive per warm-up, so each one misses the cache
        paths[f"warm{i}"] = synth.write_archive(data / f"warm_{WARM_ITEMS}_s{100 + i}.tar",
                                                WARM_ITEMS, seed=100 + i)
    if scale > 1:
        paths["scaled"] = synth.write_archive(data / f"bench_{n_items * scale}_s5.tar",
                                              n_items * scale, seed=5)
    return paths


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    only = set(args.only.split(","))
    archives = prepare_archives(args.data, args.items, args.scale)
    env = service_env(work, args.services)
    settings = Settings.from_env(env)
    out: dict[str, Any] = {
        "machine": machine(),
        "deployment": "redis+postgresql" if args.services else "embedded (sqlite, sqlite broker)",
        "items": args.items, "batch_size": settings.batch_size,
        "encoder_batch_sizes": {"image": settings.image_batch_size,
                                "text": settings.text_batch_size,
                                "audio": settings.audio_batch_size},
        "precision_setting": settings.precision,
        "archive_mib": round(archives["main"].stat().st_size / 2**20, 1),
    }
    logs = args.out.parent / "logs"
    try:
        upgrade(settings.db_url)
        key, _ = api_key(settings)
        port = free_port()
        # Models: two heads trained on a small labelled archive, in a worker of their own so
        # that training never counts in a peak RSS below.
        with Stack(settings, "127.0.0.1", port, log_dir=logs) as stack:
            client = Client(stack.url, api_key=key)
            heads = []
            for seed in (0, 1):
                job = client.wait(client.submit(archives["train"], "train", name="bench",
                                                seed=seed, epochs=TRAIN_EPOCHS)["id"],
                                  interval=0.2)
                if job["state"] != "succeeded":
                    raise RuntimeError(f"training failed: {job.get('error')}")
                heads.append(max(m["id"] for m in client.models()))
            out["models"] = heads
        v1, v2 = heads
        model = model_dict(settings, v1)

        if "a" in only:
            out["a_bare"], out["a_plain"], out["a_speedup"] = bare_measurements(
                settings, archives["main"], model, args.plain_items)
        with Stack(settings, "127.0.0.1", port, log_dir=logs) as stack:
            client = Client(stack.url, api_key=key)
            submit_and_wait(client, archives["warm0"], "classify", model=v1)
            if "b" in only:
                out["b_end_to_end"] = submit_and_wait(client, archives["main"], "classify",
                                                      model=v1)
                out["b_end_to_end"]["worker_peak_rss_mib"] = _rss(stack)
            if "d" in only:
                rows = feature_rows(settings)
                d = reprocess_and_wait(client, v2)
                how = "reprocess job (POST /api/v1/reprocess, model v2)"
                if d is None:
                    d = submit_and_wait(client, archives["main"], "classify", model=v2)
                    how = "classify job, model v2, same archive uploaded again"
                d["how"] = how
                d["encoder_runs"] = feature_rows(settings) - rows  # new features written
                d["cache_hits"] = d["items"] * len(FILE_MODALITIES) if d["encoder_runs"] == 0 else None
                out["d_new_head"] = d
            out["api_loads_torch"] = _api_loads_torch(stack)
        if "c" in only:
            out["c_naive"] = naive_run(settings, archives["naive"], v1, _tenant_of(settings, v1),
                                       archives["warm1"], logs)
        if args.scale > 1:
            with Stack(settings, "127.0.0.1", port, log_dir=logs) as stack:
                client = Client(stack.url, api_key=key)
                submit_and_wait(client, archives["warm2"], "classify", model=v1)
                big = submit_and_wait(client, archives["scaled"], "classify", model=v1)
                big["worker_peak_rss_mib"] = _rss(stack)
                out["b_scaled"] = big
    finally:
        drop_database(settings)
    out["ratios"] = ratios(out)
    return out


def _rss(stack: Stack) -> int | None:
    peak = stack.worker_peak_rss()
    return None if peak is None else round(peak / 2**20)


def bare_measurements(settings: Settings, archive: Path, model: ModelRow,
                      plain_items: int) -> tuple[dict[str, Any], dict[str, Any], float]:
    """(a) over the whole archive, and the plain loop against the bare loop on the first
    ``plain_items`` items, in three rounds side by side, so a noisy neighbour hits both alike."""
    rt = Runtime(settings)
    models = models_of(rt)
    try:
        plain = plain_encoders(models.device)
        bare_loop(rt, archive, settings.batch_size, model, limit=settings.batch_size)  # warm
        plain_loop(rt, plain, archive, model, limit=4)
        pairs = []
        for _ in range(3):
            p = plain_loop(rt, plain, archive, model, limit=plain_items)
            b = bare_loop(rt, archive, settings.batch_size, model, limit=plain_items)
            pairs.append((p, b))
        # Each round's ratio is of two runs side by side in time; the median round is reported.
        pairs.sort(key=lambda pb: pb[1]["items_per_s"] / pb[0]["items_per_s"])
        plain_rate = pairs[1][0]["items_per_s"]
        bare_rate = pairs[1][1]["items_per_s"]
        started = time.time()
        full = bare_loop(rt, archive, settings.batch_size, model)
        full["started_at"], full["ended_at"] = round(started, 3), round(time.time(), 3)
        full["load_average"] = round(os.getloadavg()[0], 2)
        full["precision"] = {m: getattr(models.encoder(m), "precision", "fp32")
                             for m in FILE_MODALITIES}
        full["decode_threads"] = models.decode_threads
        plain_out = {"items": plain_items, "items_per_s": plain_rate,
                     "bare_items_per_s_same_items": bare_rate,
                     "runs": [{"plain": p["items_per_s"], "bare": b["items_per_s"]}
                              for p, b in pairs]}
        return full, plain_out, round(bare_rate / plain_rate, 2)
    finally:
        rt.close()


def ratios(out: dict[str, Any]) -> dict[str, float | None]:
    def rate(key: str) -> float | None:
        value = out.get(key)
        return None if value is None else float(value["items_per_s"])

    a, b, c, d = (rate(k) for k in ("a_bare", "b_end_to_end", "c_naive", "d_new_head"))
    r: dict[str, float | None] = {
        "b/a": round(b / a, 3) if a and b else None,
        "b/c": round(b / c, 2) if b and c else None,
        "d/b": round(d / b, 1) if b and d else None,
        "bare/plain": out.get("a_speedup"),
    }
    bb = out.get("b_end_to_end") or {}
    if a and bb.get("after_upload_seconds"):
        # From the moment the upload is whole to the last result: ingest and processing.
        r["after_upload/a"] = round(bb["items"] / bb["after_upload_seconds"] / a, 3)
    if a and bb.get("processing_seconds"):
        # The worker's part alone: from the first items handed over to the end.
        r["b_processing/a"] = round(bb["items"] / bb["processing_seconds"] / a, 3)
    big = out.get("b_scaled")
    if big and out.get("b_end_to_end"):
        small = out["b_end_to_end"]
        if big.get("worker_peak_rss_mib") and small.get("worker_peak_rss_mib"):
            r["rss_scaled/rss"] = round(big["worker_peak_rss_mib"] / small["worker_peak_rss_mib"], 3)
        r["per_item_scaled/per_item"] = round(float(small["items_per_s"]) / big["items_per_s"], 3)
    return r


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()[0]}


# --- output -----------------------------------------------------------------------------------


TARGETS = {  # ratio: (at least, at most) — the targets
    "bare/plain": (1.8, None), "b/a": (0.9, None), "b/c": (3.0, None), "d/b": (20.0, None),
    "after_upload/a": (0.85, None),
    "rss_scaled/rss": (0.9, 1.1),
}


# The measurements' rows: label, key in the results, note (from that result's fields).
ROWS = (
    ("(a) bare loop: decode + encoders + fusion + head, one process", "a_bare",
     "precision {precision}, decode threads {decode_threads}"),
    ("(b) end to end: upload, API, broker, worker, database", "b_end_to_end",
     "upload {upload_seconds} s, then first items in {first_items_seconds} s, last result "
     "{after_upload_seconds} s after the upload; worker peak RSS {worker_peak_rss_mib} MiB"),
    ("(c) naive: one Celery task per item", "c_naive", ""),
    ("(d) new head over the same items, features cached", "d_new_head",
     "{how}; encoders run: {encoder_runs} times"),
    ("(b) again with 5x the items, fresh worker", "b_scaled",
     "upload {upload_seconds} s, last result {after_upload_seconds} s after the upload; "
     "worker peak RSS {worker_peak_rss_mib} MiB"),
)


class _Blank(dict):  # type: ignore[type-arg]
    """A result's fields for a note; a field the result lacks shows as None."""

    def __missing__(self, key: str) -> None:
        return None


def table(out: dict[str, Any]) -> str:
    """The results as a Markdown table, then the ratios against their targets."""
    lines = ["| measurement | items | seconds | items/s | notes |", "| --- | --: | --: | --: | --- |"]

    plain = out.get("a_plain")
    if plain:
        lines.append("| plain loop: fp32, NCHW, BatchNorm unfolded, batch 1, decode inline | "
                     f"{plain['items']} | | "
                     f"{plain['items_per_s']:.1f} | bare loop on the same items: "
                     f"{plain['bare_items_per_s_same_items']:.1f} items/s |")
    for label, key, note in ROWS:
        v = out.get(key)
        if v:
            lines.append(f"| {label} | {v['items']} | {v.get('seconds', '')} | "
                         f"{v['items_per_s']:.1f} | {note.format_map(_Blank(v))} |")
    lines += ["", "| ratio | value | target | met |", "| --- | --: | --- | --- |"]
    for name, value in out["ratios"].items():
        if value is None:
            continue
        low, high = TARGETS.get(name, (None, None))
        target = ("" if low is None else f">= {low}") if high is None else f"{low} .. {high}"
        met = "" if low is None else ("yes" if value >= low and (high is None or value <= high)
                                      else "no")
        lines.append(f"| {name} | {value} | {target} | {met} |")
    if "api_loads_torch" in out:
        lines.append(f"| API process maps torch | {out['api_loads_torch']} | False | "
                     f"{'yes' if out['api_loads_torch'] is False else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--scale", type=int, default=1,
                        help="also run (b) on this many times the items (the 5x mode: 5)")
    parser.add_argument("--plain-items", type=int, default=96,
                        help="items for the plain fp32 batch-1 reference (it is slow)")
    parser.add_argument("--only", default="a,b,c,d", help="which of a,b,c,d to run")
    parser.add_argument("--services", action="store_true",
                        help="Redis + PostgreSQL on 127.0.0.1 instead of the embedded default")
    parser.add_argument("--data", type=Path, default=Path("var/bench/data"))
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the run's database and blobs here (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=Path("var/bench/pipeline.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if args.work is None:
            import tempfile

            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmbatch-bench-")))
        else:
            work = args.work
            work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
