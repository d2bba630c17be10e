"""The ``mmbatch`` command line."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import difflib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import requests
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from sqlalchemy.engine import make_url

from cli.client import ApiError, Client
from cli.keyfile import client_key, ensure_first_key, key_path
from cli.resumable import UploadFailed, UploadState
from cli.stack import (
    ALL_QUEUES,
    Stack,
    child_env,
    free_port,
    port_holder,
    previous_up,
    read_record,
    search_command,
    start_record,
    web_command,
    worker_command,
    write_record,
)
from mmbatch.contract import (
    JOB_KINDS,
    PRIORITIES,
    SEARCH_MODALITIES,
    TASK_REPROCESS,
    TrainOptions,
)
from mmbatch.settings import Settings
from samples.sample import write_sample
from store import keys as key_store
from store.db import Database
from store.migrate import upgrade
from worker.app import create_celery
from worker.reprocess import reprocess_tenants
from worker.runtime import Runtime
from worker.sweeper import resend, sweep


def _settings() -> Settings:
    return Settings.from_env()


def _default_url(settings: Settings) -> str:
    """MMBATCH_URL, else where ``mmbatch up`` for this data directory serves (its up.json),
    else MMBATCH_HOST:MMBATCH_PORT."""
    recorded = (read_record(settings) or {}).get("url")
    return os.environ.get("MMBATCH_URL") or recorded or f"http://{settings.host}:{settings.port}"


def _client(url: str | None) -> Client:
    settings = _settings()
    return Client(url or _default_url(settings), api_key=client_key(settings))


@click.group()
@click.version_option(package_name="mmbatch")
def main() -> None:
    """mmbatch: upload media archives, get per-item features, fused embeddings and labels."""
    logging.basicConfig(level=os.environ.get("MMBATCH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations to MMBATCH_DATABASE_URL (or the embedded SQLite file)."""
    settings = _settings()
    upgrade(settings.db_url, revision)
    click.echo(f"database at revision {revision}: {_redact(settings.db_url)}")


@main.command()
@click.option("--host", default=None, help="Address to bind (default MMBATCH_HOST, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default MMBATCH_PORT, 8000).")
def up(host: str | None, port: int | None) -> None:
    """Run the web server, the workers and beat together, storing everything under
    MMBATCH_DATA_DIR (where up.json says where it serves, for the rest of the command line)."""
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    host, port = host or settings.host, port or settings.port
    running, unclean = previous_up(settings)
    if running is not None:
        raise click.ClickException(
            f"mmbatch up is already running for {settings.data_dir.resolve()} (pid "
            f"{running['pid']}, serving {running.get('url')}): stop it first")
    holder = port_holder(host, port)
    if holder is not None:
        raise click.ClickException(f"port {port} on {host} is taken by {holder}: stop it, or "
                                   "choose another port with --port")
    upgrade(settings.db_url)
    first = ensure_first_key(settings)
    if first:
        click.echo(f"created the first API key (saved to {key_path(settings)}; "
                   f"the command line uses it):\n  {first}")
    stack = Stack(settings, host, port, beat=True)
    # SIGTERM ends `up` like Ctrl-C does: through the finally below, which stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        stack.spawn_all()
        # recorded before the web server answers: whoever sees it healthy finds where it serves
        start_record(settings, stack)
        stack.wait_healthy()
        click.echo(f"mmbatch serving {stack.url}  (data in {settings.data_dir.resolve()}; "
                   "Ctrl-C stops)")
        if unclean:
            _revive(settings)
        code = stack.wait()
        click.echo(f"a child process exited with {code}; stopping", err=True)
    except RuntimeError as exc:  # a child died or the web server never answered
        raise click.ClickException(f"{exc} (the logs above say why)") from exc
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        write_record(settings, stopped=True)


def _revive(settings: Settings) -> None:
    """The last ``up`` was killed: its workers may have held messages that the embedded broker
    then lost (kombu's SQLAlchemy transport keeps a taken message only in the worker's memory).
    Send again at once what every active job still needs, instead of after the sweeper's
    MMBATCH_STALE_AFTER_SECONDS; what is sent twice counts once."""
    rt = Runtime(settings)
    try:
        revival = sweep(rt, older_than_seconds=0)
        resend(rt, revival, create_celery(settings).send_task)
    finally:
        rt.close()
    jobs = {*revival.ingest, *revival.train, *(job for job, _ in revival.batches)}
    if jobs:
        click.echo(f"the last mmbatch up was stopped hard: sent again the work of {len(jobs)} "
                   "active job(s)")


@main.command()
@click.option("--queues", default=ALL_QUEUES, show_default=True)
@click.option("--name", default="mmbatch", show_default=True)
def worker(queues: str, name: str) -> None:
    """Run one Celery worker process (solo pool: one model load, one batch at a time)."""
    settings = _settings()
    cmd = worker_command(settings, queues, name)
    os.execve(cmd[0], cmd, child_env(settings))


@main.command()
@click.option("--host", default=None, help="Address to bind (default MMBATCH_HOST).")
@click.option("--port", type=int, default=None, help="Port (default MMBATCH_SEARCH_PORT, 8001).")
def searcher(host: str | None, port: int | None) -> None:
    """Run the search service: encoders and indexes kept warm for the API's searches
    (docs/search.md). Run several and list them in MMBATCH_SEARCH_URL to scale out."""
    settings = _settings()
    cmd = search_command(settings, host, port)
    os.execve(cmd[0], cmd, child_env(settings))


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
def web(host: str | None, port: int | None) -> None:
    """Run the API server (gunicorn)."""
    settings = _settings()
    cmd = web_command(settings, host or settings.host, port or settings.port)
    os.execve(cmd[0], cmd, child_env(settings))


@main.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--kind", type=click.Choice(JOB_KINDS), required=True)
@click.option("--model", type=int, default=None, help="Model version id (default: the default).")
@click.option("--name", default=None, help="Name of the model a train or align job makes.")
@click.option("--wait/--no-wait", default=False, help="Wait for the job, with a progress bar.")
@click.option("--idempotency-key", default=None, help="Submitting again with it returns the same job.")
@click.option("--callback-url", default=None, help="POSTed (signed) when the job ends.")
@click.option("--url", default=None, help="API base URL (default MMBATCH_URL or host:port).")
@click.option("--set", "settings_", multiple=True, metavar="KEY=VALUE",
              help="A train option (repeatable; docs/models.md): "
                   + ", ".join(f.name for f in dataclasses.fields(TrainOptions)
                               if f.name != "name") + ".")
@click.option("--priority", type=click.Choice(PRIORITIES), default=None,
              help="Who goes first when workers are shared (default normal).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Upload resumably, going on after a broken connection or from where an "
                   "earlier run of the same command stopped: straight to S3 in presigned parts "
                   "when the server keeps blobs there, else in chunks through the API (tus); "
                   "--no-resume sends the archive in one request.")
@click.option("--adapt", is_flag=True,
              help="classify: adapt the (stacked) model to this archive's own items first; "
                   "the results come from the adapted version, which never becomes the "
                   "default by itself (docs/models.md).")
def submit(archive: Path, kind: str, model: int | None, name: str | None, wait: bool,
           idempotency_key: str | None, callback_url: str | None, url: str | None,
           settings_: tuple[str, ...], priority: str | None, resume: bool,
           adapt: bool) -> None:
    """Upload ARCHIVE as a new job."""
    client = _client(url)
    extra = dict(_key_value(item) for item in settings_)
    if priority is not None:
        extra["priority"] = priority
    if adapt:
        extra["adapt"] = "true"
    if resume:
        state = UploadState(_settings().data_dir / "uploads.json")
        with _upload_bar(archive) as progress:
            job = _run(lambda: client.submit_resumable(
                archive, kind, state, model=model, name=name, idempotency_key=idempotency_key,
                callback_url=callback_url, progress=progress, **extra))
    else:
        job = _run(lambda: client.submit(archive, kind, model=model, name=name,
                                         idempotency_key=idempotency_key,
                                         callback_url=callback_url, **extra))
    click.echo(f"job {job['id']} {job['state']}")
    if wait:
        _wait_to_end(client, job["id"])


@main.command()
@click.argument("job_id")
@click.option("--url", default=None)
def status(job_id: str, url: str | None) -> None:
    """Print a job's state as JSON."""
    client = _client(url)
    click.echo(json.dumps(_run(lambda: client.job(job_id)), indent=2))


@main.command()
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet", "table"]),
              default="jsonl")
@click.option("--embeddings", is_flag=True, help="Include fused embeddings.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: standard output, which for parquet must not be a "
                   "terminal).")
@click.option("--limit", type=int, default=100, show_default=True,
              help="table: at most this many rows.")
@click.option("--url", default=None)
def results(job_id: str, fmt: str, embeddings: bool, output: Path | None, limit: int,
            url: str | None) -> None:
    """Export a job's per-item results (streamed by the server) as JSON lines, CSV or Parquet,
    or show them as a table."""
    client = _client(url)
    if fmt == "table":
        _summary(client, _run(lambda: client.job(job_id)), show=limit)
        return
    if output is None:
        if fmt == "parquet" and sys.stdout.isatty():
            raise click.UsageError("Parquet is binary: give --output FILE or redirect the output")
        _run(lambda: client.export(job_id, fmt, sys.stdout.buffer, embeddings))
        return
    try:
        with open(output, "wb") as out:
            _run(lambda: client.export(job_id, fmt, out, embeddings))
    except BaseException:
        output.unlink(missing_ok=True)  # no half-written export left behind
        raise
    click.echo(f"wrote {output}", err=True)


@main.command()
@click.argument("job_id")
@click.option("--url", default=None)
def cancel(job_id: str, url: str | None) -> None:
    """Cancel a job: outstanding batches stop; results already written stay."""
    job = _run(lambda: _client(url).cancel(job_id))
    click.echo(f"job {job['id']} {job['state']}")


@main.command("jobs")
@click.option("--state", default=None)
@click.option("--kind", default=None)
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--url", default=None)
def list_jobs(state: str | None, kind: str | None, limit: int, url: str | None) -> None:
    """List recent jobs."""
    filters = {k: v for k, v in {"state": state, "kind": kind, "limit": limit}.items() if v}
    for job in _run(lambda: _client(url).jobs(**filters)):
        click.echo(f"{job['id']}  {job['kind']:<9} {job['state']:<10} "
                   f"{job['done'] + job['failed']}/{job['total']}  {job['created_at']}")


@main.command()
@click.option("--all-tenants", is_flag=True,
              help="Every tenant with a default model, as the nightly run does (an operator's "
                   "command: it talks to the broker, not to the API).")
@click.option("--now", is_flag=True,
              help="With --all-tenants: plan the reprocess jobs in this process and enqueue "
                   "their batches, instead of asking a worker to.")
@click.option("--model", type=int, default=None, help="Model version (default: the default).")
@click.option("--limit", type=int, default=None, help="At most this many items per tenant.")
@click.option("--url", default=None)
def reprocess(all_tenants: bool, now: bool, model: int | None, limit: int | None,
              url: str | None) -> None:
    """Reprocess items whose result is missing, failed, or from an older model: yours through
    the API, or every tenant's (--all-tenants)."""
    if not all_tenants:
        if now:
            raise click.UsageError("--now goes with --all-tenants")
        body = _run(lambda: _client(url).reprocess(model=model, limit=limit))
        if body.get("status") == "nothing to reprocess":
            click.echo(f"nothing to reprocess: {body['reason']}")
        else:
            click.echo(f"job {body['id']} {body['state']} (reprocess; mmbatch status "
                       f"{body['id']})")
        return
    settings = _settings()
    celery = create_celery(settings)
    if not now:
        celery.send_task(TASK_REPROCESS, kwargs={"model_id": model, "limit": limit})
        click.echo("reprocessing requested; a worker will start it (see: mmbatch jobs --kind "
                   "reprocess)")
        return
    rt = Runtime(settings)
    try:
        for plan in reprocess_tenants(rt, celery.send_task, None, model, limit):
            click.echo(f"tenant {plan.tenant_id}: {plan.reason}"
                       + (f" (job {plan.job_id}, {plan.items} items)" if plan.started else ""))
    finally:
        rt.close()


@main.group()
def keys() -> None:
    """API keys (stored hashed; a new key is printed once)."""


@keys.command("create")
@click.option("--name", required=True, help="What the key is for.")
@click.option("--tenant", default=None, help="Existing or new tenant (default: a new tenant).")
@click.option("--max-priority", type=click.Choice(PRIORITIES), default=PRIORITIES[0],
              show_default=True, help="The highest priority this key's jobs may ask for.")
def keys_create(name: str, tenant: str | None, max_priority: str) -> None:
    settings = _settings()
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            new = key_store.create_key(s, name, tenant, max_priority=max_priority)
    finally:
        db.dispose()
    click.echo(f"tenant: {new.tenant}\nkey: {new.key}\nwebhook secret: {new.webhook_secret}\n"
               "(shown once: store them now)")


@keys.command("list")
def keys_list() -> None:
    db = Database(_settings().db_url)
    try:
        with db.session() as s:
            for key, tenant in key_store.list_keys(s):
                state = "revoked" if key.revoked_at else "active"
                click.echo(f"{key.id}  {key.prefix}…  {key.name:<20} tenant={tenant:<20} {state}")
    finally:
        db.dispose()


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    db = Database(_settings().db_url)
    try:
        with db.session() as s:
            if not key_store.revoke(s, key_id):
                raise click.ClickException(f"no active key {key_id}")
    finally:
        db.dispose()
    click.echo(f"revoked key {key_id}")


@main.group()
def models() -> None:
    """Model versions."""


@models.command("list")
@click.option("--url", default=None)
def models_list(url: str | None) -> None:
    client = _client(url)
    click.echo(json.dumps(_run(client.models), indent=2))


@models.command("show")
@click.argument("model_id", type=int)
@click.option("--url", default=None)
def models_show(model_id: int, url: str | None) -> None:
    """Print one model version with all its metrics as JSON."""
    client = _client(url)
    click.echo(json.dumps(_run(lambda: client.model(model_id)), indent=2))


@models.command("promote")
@click.argument("model_id", type=int)
@click.option("--url", default=None)
def models_promote(model_id: int, url: str | None) -> None:
    """Make MODEL_ID the default model (classify jobs without --model use it)."""
    client = _client(url)
    model = _run(lambda: client.promote(model_id))
    click.echo(f"default model: {model['name']} v{model['version']} (id {model['id']})")


@main.command()
@click.argument("from_jobs", nargs=-1, required=True, metavar="JOB...")
@click.option("--holdout", type=click.Choice(["verified"]), default=None,
              help="validate on the items people labelled; train on the rest")
@click.option("--name", default=None, help="Name of the model it makes.")
@click.option("--wait/--no-wait", default=False)
@click.option("--url", default=None)
@click.option("--set", "settings_", multiple=True, metavar="KEY=VALUE",
              help="A train option, as for submit.")
def retrain(from_jobs: tuple[str, ...], holdout: str | None, name: str | None, wait: bool,
            url: str | None, settings_: tuple[str, ...]) -> None:
    """Train a model on the items of earlier JOBs with their labels now (corrections
    included), without uploading them again."""
    client = _client(url)
    extra = dict(_key_value(item) for item in settings_)
    job = _run(lambda: client.retrain(list(from_jobs), holdout, name=name, **extra))
    click.echo(f"job {job['id']} {job['state']} (train on {len(from_jobs)} job(s)' items)")
    if wait:
        model = _wait_to_end(client, job["id"])["model"]
        gate = _run(lambda: client.model(model["id"]))["metrics"].get("promotion") or {}
        if gate:
            click.echo(f"promotion gate: {gate['gate']}: {gate.get('why', '')}")


@main.command()
@click.argument("job_id", required=False, metavar="[JOB]")
@click.option("--strategy", type=click.Choice(["uncertain", "diverse", "label-issues"]),
              default="uncertain", show_default=True)
@click.option("--model", type=int, default=None, help="with --strategy label-issues")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--url", default=None)
def review(job_id: str | None, strategy: str, model: int | None, limit: int,
           url: str | None) -> None:
    """What to look at next in a classify JOB: the least sure predictions (or a page spread
    over them, --strategy diverse), or a model's label issues (--strategy label-issues --model
    ID). Accept or correct each with `mmbatch label ITEM LABEL`."""
    page = _run(lambda: _client(url).review(job_id, model, strategy, limit))
    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table("item", "key", "label", "confidence", "why")
    for i in page["items"]:
        table.add_row(str(i["item"]), i["key"], i["label"] or "",
                      "" if i["confidence"] is None else f"{i['confidence']:.3f}", i["reason"])
    console.print(table)
    console.print(f"{len(page['items'])} to review; accept or correct: mmbatch label ITEM LABEL")


@main.command("label-issues")
@click.argument("model_id", type=int, metavar="MODEL")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--url", default=None)
def label_issues(model_id: int, limit: int, url: str | None) -> None:
    """The items of MODEL's training archive whose given label looks wrong, worst first."""
    page = _run(lambda: _client(url).label_issues(model_id, limit))
    console = Console(width=None if sys.stdout.isatty() else 140)
    found = page.get("found")
    console.print(f"model {model_id}: {'no count (too few items)' if found is None else found} "
                  "label issues found in its training archive, worst first")
    table = Table("item", "key", "given", "suggested", "quality", "label now")
    for i in page["issues"]:
        table.add_row(str(i["item"]), i["key"], i["given_label"], i["suggested_label"],
                      f"{i['quality']:.3f}", i["label"] or "")
    console.print(table)
    if page.get("next_cursor"):
        console.print(f"… more: --limit {limit * 2}")
    console.print("correct one: mmbatch label ITEM LABEL")


@main.command()
@click.argument("item_id", type=int, metavar="ITEM")
@click.argument("new_label", required=False, metavar="[LABEL]")
@click.option("--model", type=int, default=None,
              help="the model version whose prediction you were shown")
@click.option("--url", default=None)
def label(item_id: int, new_label: str | None, model: int | None, url: str | None) -> None:
    """Set ITEM's label to LABEL (kept as an event: nothing is overwritten); without LABEL,
    print the item's label history."""
    client = _client(url)
    if new_label is not None:
        event = _run(lambda: client.set_label(item_id, new_label, model))["event"]
        click.echo(f"item {item_id}: {event['old_label']} -> {event['new_label']}")
        return
    history = _run(lambda: client.labels(item_id))
    click.echo(f"item {item_id} ({history['key']}): given {history['given_label']}, "
               f"now {history['label']}")
    for e in history["events"]:
        click.echo(f"  {e['created_at']}  {e['old_label']} -> {e['new_label']}  "
                   f"(key {e['key_id']}, model {e['model']})")


@main.command()
@click.argument("model_id", type=int, metavar="MODEL")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default=None)
def evaluate(model_id: int, archive: Path, url: str | None) -> None:
    """Score MODEL on a new labelled ARCHIVE (labels.csv): accuracy, macro F1, per class, ECE."""
    client = _client(url)
    job = _run(lambda: client.evaluate(model_id, archive))
    job = _wait(client, job["id"])
    if job["state"] != "succeeded":
        raise click.ClickException(f"job {job['id']} {job['state']}: {job.get('error')}")
    scores = _run(lambda: client.evaluation(job["id"]))
    click.echo(json.dumps(scores, indent=2))
    for direction, r in (scores.get("retrieval") or {}).items():  # an aligner's evaluation
        click.echo(f"{direction}: R@1 {r['r@1']:.3f}  R@5 {r['r@5']:.3f}  R@10 {r['r@10']:.3f}  "
                   f"median rank {r['median_rank']:g}  ({r['queries']} queries)")
    if scores.get("accuracy") is not None:
        click.echo(f"accuracy {_score(scores['accuracy'])}  macro F1 "
                   f"{_score(scores['macro_f1'])}  ECE {_score(scores['ece'])}  "
                   f"({scores['classified']} of {scores['items']} labelled items classified)")
    for warning in scores.get("warnings", []):  # classes the model lacks, shift
        click.echo(f"warning: {warning}")


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@main.command()
@click.argument("text", required=False)
@click.option("--k", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Search by example: an image, audio, video or text file.")
@click.option("--similar", "item", type=int, default=None, help="Items like this item id.")
@click.option("--job", "jobs", multiple=True, help="Only items of this job (repeatable).")
@click.option("--label", "labels", multiple=True, help="Only items with this label (repeatable).")
@click.option("--modality", type=click.Choice(SEARCH_MODALITIES), default="any",
              show_default=True, help="Match only this modality's vectors.")
@click.option("--model", type=int, default=None, help="Aligner id (default: the tenant's).")
@click.option("--min-score", type=float, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer as JSON.")
@click.option("--url", default=None)
def search(text: str | None, k: int, file: Path | None, item: int | None, jobs: tuple[str, ...],
           labels: tuple[str, ...], modality: str, model: int | None, min_score: float | None,
           as_json: bool, url: str | None) -> None:
    """Search your items by TEXT, by an example --file, or --similar to an item; prints the
    best first (docs/search.md)."""
    if sum(x is not None for x in (text, file, item)) != 1:
        raise click.UsageError("give one of TEXT, --file or --similar")
    client = _client(url)
    options: dict[str, Any] = {"model": model, "min_score": min_score,
                               "modality": modality if modality != "any" else None,
                               "jobs": list(jobs) or None, "labels": list(labels) or None}
    if item is not None:
        options = {key: ",".join(v) if isinstance(v, list) else v for key, v in options.items()}
        page = _run(lambda: client.similar(item, k=k, **options))
    else:
        page = _run(lambda: client.search(text, file=file, k=k, **options))
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else 140)
    m = page["model"]
    console.print(f"aligner {m['name']} v{m['version']} (id {m['id']})")
    table = Table("#", "score", "modality", "key", "label", "item", "job")
    for rank, r in enumerate(page["results"], 1):
        matched = r["modality"] + (f" at {r['time']:.2f} s" if "time" in r else "")  # a frame
        table.add_row(str(rank), f"{r['score']:.3f}", matched, r["key"], r["label"] or "",
                      str(r["item"]), r["job"])
    console.print(table)
    if not page["results"]:
        console.print("no results")


def _key_value(item: str) -> tuple[str, str]:
    """A --set KEY=VALUE: the key must be a train option (checked here, before the upload)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
    options = [f.name for f in dataclasses.fields(TrainOptions) if f.name != "name"]
    if key not in options:
        close = difflib.get_close_matches(key, options, n=1)
        raise click.BadParameter(
            f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; options: {', '.join(options)}", param_hint="--set")
    return key, value.strip()


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train", "n_train", type=int, default=240, show_default=True)
@click.option("--unlabelled", "n_unlabelled", type=int, default=80, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def sample(out_dir: Path, n_train: int, n_unlabelled: int, seed: int) -> None:
    """Write the sample archives (a labelled one and an unlabelled one) to OUT_DIR."""
    s = write_sample(out_dir, n_train=n_train, n_unlabelled=n_unlabelled, seed=seed)
    click.echo(f"train: {s.train}\nunlabelled: {s.unlabelled}\ntruth: {s.truth}")


DEMO_CLIPS = 0.25  # the demo's share of items given as video clips (samples.sample)


@main.command()
@click.option("--train", "n_train", type=int, default=240, show_default=True)
@click.option("--unlabelled", "n_unlabelled", type=int, default=80, show_default=True)
@click.option("--port", type=int, default=None, help="Port (default: a free one).")
def demo(n_train: int, n_unlabelled: int, port: int | None) -> None:
    """Start the embedded stack, train on the sample, classify the unlabelled sample."""
    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"writing the sample archives under {settings.data_dir / 'sample'}")
    # a quarter of the items that have a picture and a sound come as one video clip
    sample_set = write_sample(settings.data_dir / "sample", n_train=n_train,
                              n_unlabelled=n_unlabelled, clips=DEMO_CLIPS)
    upgrade(settings.db_url)
    ensure_first_key(settings)
    stack = Stack(settings, "127.0.0.1", port or free_port(),
                  log_dir=settings.data_dir / "logs")
    click.echo(f"starting web and worker on {stack.url} (logs in {stack.log_dir})")
    with stack:
        client = Client(stack.url, api_key=client_key(settings))
        click.echo("training a fusion classifier on the labelled sample")
        train = client.submit(sample_set.train, "train", name="demo")
        train = _wait(client, train["id"])
        _summary(client, train)
        if train["state"] != "succeeded":
            sys.exit(1)
        model = client.model(train["model"]["id"])
        click.echo("classifying the unlabelled sample with model "
                   f"{model['name']} v{model['version']} (id {model['id']})")
        job = client.submit(sample_set.unlabelled, "classify", model=model["id"])
        job = _wait(client, job["id"])
        rows = list(client.results(job["id"]))
        peak = stack.worker_peak_rss()
    _summary(client, job, rows=rows, show=20)
    truth = dict(csv.reader(open(sample_set.truth)))
    truth.pop("key", None)
    scored = [r for r in rows if r["status"] == "ok" and r["key"] in truth]
    correct = sum(1 for r in scored if r["label"] == truth[r["key"]])
    seconds = _duration(job)
    click.echo("")
    val_accuracy = model["metrics"].get("val_accuracy")
    if val_accuracy is not None:
        click.echo(f"validation accuracy (train job): {val_accuracy:.3f}")
    click.echo(f"accuracy on the unlabelled sample: {correct}/{len(scored)} = "
               f"{correct / max(1, len(scored)):.3f}  (chance: {1 / len(model['classes']):.2f})")
    if seconds:
        click.echo(f"classify job: {job['total']} items in {seconds:.1f}s = "
                   f"{job['total'] / seconds:.1f} items/s (ingest to finish)")
    if peak:
        click.echo(f"worker peak RSS: {peak / 2**20:.0f} MiB")
    if job["state"] != "succeeded":
        sys.exit(1)


@contextlib.contextmanager
def _upload_bar(archive: Path) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on standard error for an upload: bytes, speed, time left."""
    columns = (TextColumn("upload {task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(archive.name, total=archive.stat().st_size)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _run(fn: Any) -> Any:
    """Call the API; its errors, and a server that does not answer, as one line each."""
    try:
        return fn()
    except (ApiError, UploadFailed) as exc:
        if exc.status == 401:
            settings = _settings()
            source = ("MMBATCH_API_KEY" if os.environ.get("MMBATCH_API_KEY")
                      else f"{key_path(settings).resolve()}"
                      + ("" if key_path(settings).exists() else ", which does not exist"))
            raise click.ClickException(
                f"{exc} (the key comes from {source}; for data directory "
                f"{settings.data_dir.resolve()}: MMBATCH_DATA_DIR={settings.data_dir.resolve()} "
                "mmbatch keys create --name NAME)") from None
        raise click.ClickException(str(exc)) from None
    except requests.ConnectionError as exc:
        where = exc.request.url.split("/api/")[0] if exc.request is not None else "the API"
        raise click.ClickException(f"cannot reach mmbatch at {where}: is `mmbatch up` running? "
                                   "(or give --url, or set MMBATCH_URL)") from None


def _wait_to_end(client: Any, job_id: str) -> dict[str, Any]:
    """Wait for the job with a progress bar, print its summary, and exit 1 unless it
    succeeded."""
    job = _wait(client, job_id)
    _summary(client, job)
    if job["state"] != "succeeded":
        sys.exit(1)
    return job


def _wait(client: Any, job_id: str) -> dict[str, Any]:
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[eta]}"), TimeElapsedColumn(),
                  transient=False) as progress:
        bar = progress.add_task(f"job {job_id[:8]} queued", total=1.0, eta="")

        def update(job: dict[str, Any]) -> None:
            eta = job.get("eta_seconds")
            progress.update(bar, description=f"job {job_id[:8]} {describe(job)}",
                            completed=job.get("progress") or 0.0,
                            eta="" if eta is None else f"ETA {dt.timedelta(seconds=round(eta))}")

        return _run(lambda: client.wait(job_id, update))


def describe(job: dict[str, Any]) -> str:
    """Where a job is, in words: its stage (ingest, encode, train epochs with the validation
    score) and its counts."""
    if job["state"] != "running":
        return job["state"]
    counts = f"{job['done'] + job['failed']}/{job['total']}"
    training = job.get("training") or {}
    if job.get("stage") == "training" and training.get("phase") == "training":
        score = training.get("val_macro_f1")
        return (f"training epoch {training['epoch']}/{training.get('stops_by') or '?'}"
                + (f" (val F1 {score:.3f})" if score is not None else ""))
    if job.get("stage") == "training":
        return "training: reading the media again"
    return f"encoding {counts}"


def _duration(job: dict[str, Any]) -> float | None:
    if not job.get("finished_at"):
        return None
    start = dt.datetime.fromisoformat(job["created_at"])
    end = dt.datetime.fromisoformat(job["finished_at"])
    return (end - start).total_seconds()


def _summary(client: Any, job: dict[str, Any], rows: list[dict[str, Any]] | None = None,
             show: int = 10) -> None:
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"job {job['id']}: [bold]{job['state']}[/bold]  kind={job['kind']}  "
                  f"total={job['total']} done={job['done']} failed={job['failed']}"
                  + (f"  error={job['error']}" if job.get("error") else ""))
    if job.get("model"):
        console.print(f"model: {job['model']['name']} v{job['model']['version']} "
                      f"(id {job['model']['id']})")
    for warning in job.get("warnings") or []:
        console.print(f"warning: {warning}")
    if rows is None:  # one page: the first rows
        pages = client.results(job["id"], page_size=max(1, show)) if job["total"] else iter(())
        rows = list(itertools.islice(pages, show))
    table = Table("item", "key", "modalities", "status", "label", "confidence", "given", "error")
    for r in rows[:show]:
        table.add_row(str(r["item_id"]), r["key"], "+".join(r["modalities"]), r["status"],
                      r["label"] or "",
                      f"{r['confidence']:.3f}" if r["confidence"] is not None else "",
                      r["given_label"] or "", (r["error"] or "")[:60])
    if rows:
        console.print(table)
        more = max(job["total"], len(rows)) - min(len(rows), show)
        if more > 0:
            console.print(f"… {more} more (mmbatch results {job['id']} --format table "
                          f"--limit N, or an export format)")



def _redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    main()
