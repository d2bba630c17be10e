"""The database is the queue: which planned batch the dispatcher sends next (``store.dispatch``).

Real SQLite and PostgreSQL databases, migrated; jobs and batches made directly. The order is
priority first, then tenants in turn, then each tenant's jobs in turn; the broker never holds
more than the window; lost batches come back; cancelled jobs send nothing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from cli.client import Client
from cli.stack import Stack
from mmbatch.settings import Settings
from store import dispatch, jobs, keys
from store.db import Database
from store.keys import get_or_create_tenant
from store.migrate import upgrade
from store.schema import Batch
from tests.conftest import make_key
from tests.util import free_port, tar_bytes, write_tar
from web.app import create_app
from worker.dispatch import dispatch as worker_dispatch


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (f"sqlite:///{tmp_path / 'q.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def _job(db: Database, tenant: str, priority: str = "normal", batches: int = 10,
         state: str = "running") -> str:
    with db.session() as s:
        owner = get_or_create_tenant(s, tenant)
        job = jobs.create_job(s, kind="embed", archive_blob="", archive_name=tenant,
                              archive_bytes=0, model_version_id=None, tenant_id=owner.id,
                              priority=priority, state=state)
        dispatch.plan(s, job.id, list(range(batches * 2)), 2)
        return job.id


def _next(db: Database, window: int = 1) -> list[str]:
    """Claim what the window allows, then finish it: the jobs served, in order."""
    with db.session() as s:
        claimed = dispatch.claim(s, window)
        for c in claimed:
            dispatch.finish(s, c.batch_id)
    return [c.job_id for c in claimed]


def test_the_window_caps_what_is_in_flight(db: Database) -> None:
    job = _job(db, "a")
    with db.session() as s:
        first = dispatch.claim(s, 3)
    assert [c.job_id for c in first] == [job] * 3
    assert [c.item_ids for c in first] == [[0, 1], [2, 3], [4, 5]]  # in plan order
    with db.session() as s:
        assert dispatch.claim(s, 3) == []  # full
        dispatch.finish(s, first[0].batch_id)
    with db.session() as s:
        again = dispatch.claim(s, 3)
    assert [c.item_ids for c in again] == [[6, 7]]  # one freed, one sent


def test_a_higher_priority_goes_first_whatever_waits(db: Database) -> None:
    bulk = _job(db, "a", "bulk", batches=50)
    assert _next(db) == [bulk]
    normal = _job(db, "b", "normal", batches=2)
    urgent = _job(db, "a", "interactive", batches=1)
    assert [_next(db)[0] for _ in range(5)] == [urgent, normal, normal, bulk, bulk]


def test_tenants_take_turns_then_their_jobs(db: Database) -> None:
    a1, a2 = _job(db, "a"), _job(db, "a")
    b1 = _job(db, "b")
    served = [_next(db)[0] for _ in range(8)]
    # tenant a, tenant b, tenant a, …; a's two jobs alternate within a's turns
    assert [("a" if j in (a1, a2) else "b") for j in served] == ["a", "b"] * 4
    assert [j for j in served if j != b1] == [a1, a2, a1, a2]
    # a flood of one tenant does not push back another's small job
    flood = _job(db, "c", batches=500)
    assert _next(db) == [flood]
    small = _job(db, "d", batches=1)
    assert small in _next(db, window=2)


def test_jobs_not_running_send_nothing_and_hold_no_window(db: Database) -> None:
    cancelled = _job(db, "a")
    with db.session() as s:
        dispatch.claim(s, 2)  # two sent, then the job is cancelled with them in the broker
        jobs.get_job(s, cancelled).state = "cancelled"
    queued = _job(db, "b", state="queued")
    running = _job(db, "c")
    assert _next(db, window=2) == [running, running]  # the cancelled job's sent batches free
    assert queued not in _next(db, window=5)


def test_lost_batches_are_planned_again(db: Database) -> None:
    job = _job(db, "a", batches=3)
    with db.session() as s:
        sent = dispatch.claim(s, 2)
    with db.session() as s:
        assert dispatch.requeue_lost(s, []) == 0  # no job stalled
        assert dispatch.requeue_lost(s, [job]) == 2
    with db.session() as s:
        again = dispatch.claim(s, 2)
    assert sorted(c.batch_id for c in again) == sorted(c.batch_id for c in sent)
    assert all(c.job_id == job for c in again)


def test_batches_the_broker_refused_wait_again(db: Database, tmp_path: Path) -> None:
    job = _job(db, "a", batches=4)
    rt = SimpleNamespace(db=db, settings=SimpleNamespace(dispatch_window=3))
    sent: list[Any] = []

    def broker(name: str, args: list[Any]) -> None:
        if len(sent) == 1:
            raise ConnectionError("the broker is restarting")
        sent.append(args)

    assert worker_dispatch(rt, broker) == 1  # one went, then the broker refused
    with db.session() as s:
        states = [b.state for b in s.scalars(select(Batch).where(Batch.job_id == job)
                                             .order_by(Batch.id))]
    assert states == ["sent", "planned", "planned", "planned"]
    assert worker_dispatch(rt, lambda name, args: sent.append(args)) == 2  # the window's rest
    assert [a[1] for a in sent] == [[0, 1], [2, 3], [4, 5]]


def test_the_batches_of_ended_jobs_are_forgotten(db: Database) -> None:
    ended, running = _job(db, "a", batches=3), _job(db, "b", batches=2)
    with db.session() as s:
        jobs.get_job(s, ended).state = "succeeded"
    with db.session() as s:
        assert dispatch.forget_finished(s) == 3
        left = list(s.scalars(select(Batch.job_id)))
    assert left == [running, running]


def test_a_stale_job_replanned_keeps_nothing_twice(db: Database) -> None:
    job = _job(db, "a", batches=4)
    with db.session() as s:
        dispatch.claim(s, 1)
        dispatch.replan(s, job, [100, 101, 102], 2)
    with db.session() as s:
        rows: list[Any] = list(s.scalars(select(Batch).where(Batch.job_id == job)))
    assert [(b.state, b.item_ids) for b in rows] == [("planned", [100, 101]),
                                                     ("planned", [102])]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_small_job_does_not_wait_for_a_bulk_flood(tmp_path: Path) -> None:
    """Real processes (mmbatch up's, embedded): a 320-item bulk job is running when an 8-item
    job arrives; the small one finishes while the flood still has batches waiting (with every
    batch in the broker at once, as before the dispatcher, it finished after all of them)."""
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path / "data"),
                                  "MMBATCH_BATCH_SIZE": "8"})
    key = make_key(settings.db_url)
    flood = write_tar(tmp_path / "flood.tar", {f"f{i:04d}.txt": f"caption {i} of a flood".encode()
                                               for i in range(320)})
    small = write_tar(tmp_path / "small.tar", {f"s{i}.txt": f"a small job {i}".encode()
                                               for i in range(8)})
    with Stack(settings, "127.0.0.1", free_port(), log_dir=tmp_path / "logs") as running:
        client = Client(running.url, api_key=key)
        bulk = client.submit(flood, "embed", priority="bulk")
        deadline = time.monotonic() + 300
        while client.job(bulk["id"])["done"] < 8:  # the flood is under way (encoder loaded)
            assert time.monotonic() < deadline
            time.sleep(0.2)
        quick = client.wait(client.submit(small, "embed")["id"], timeout=300)
        at_that_moment = client.job(bulk["id"])
        assert quick["state"] == "succeeded" and quick["done"] == 8
        assert at_that_moment["state"] == "running"
        # ten batches or more of the flood still waited (fixed latencies, the small job's
        # ingest and the broker's polling, let a few tiny batches pass meanwhile)
        assert at_that_moment["done"] <= 240, at_that_moment
        assert client.wait(bulk["id"], timeout=300)["done"] == 320


def test_a_job_asks_for_at_most_its_keys_priority(tmp_path: Path) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    with db.session() as s:
        capped = keys.create_key(s, "ci", max_priority="normal").key
    app = create_app(settings)
    app.extensions["mmbatch"].celery.send_task = lambda *a, **kw: None
    client = app.test_client()
    archive = tar_bytes({"a.txt": b"hello"})

    def submit(priority: str) -> Any:
        return client.post("/api/v1/jobs", headers={"Authorization": f"Bearer {capped}"},
                           data={"kind": "embed", "priority": priority,
                                 "archive": (io.BytesIO(archive), "a.tar")})

    with db.session() as s:
        bulk_only = keys.create_key(s, "nightly", max_priority="bulk").key
    r = client.post("/api/v1/jobs", headers={"Authorization": f"Bearer {bulk_only}"},
                    data={"kind": "embed", "archive": (io.BytesIO(archive), "a.tar")})
    assert r.get_json()["priority"] == "bulk"  # its default: not above what it may ask
    for asked, status in (("interactive", 400), ("urgent", 400), ("normal", 202),
                          ("bulk", 202)):
        r = submit(asked)
        assert r.status_code == status, (asked, r.get_json())
        if status == 400:
            assert r.get_json()["error"]["code"] == "invalid_priority"
        else:
            assert r.get_json()["priority"] == asked
    db.dispose()
