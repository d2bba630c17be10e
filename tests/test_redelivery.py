"""The poison guard's delivery count and the nightly retry count, without Celery (real SQLite).

A reprocess job delivers items that earlier jobs delivered already; its first delivery must not
look like a redelivery (which would split every batch), while every try still counts towards
``reprocess_max_attempts``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from mmbatch.settings import Settings
from store import jobs
from store.migrate import upgrade
from store.registry import promote, register_model
from tests.test_pipeline import _job
from worker import reprocess
from worker.ingest import ingest_job
from worker.pipeline import process_batch
from worker.runtime import Runtime
from worker.tasks import _count_attempt


class _App:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []

    def send_task(self, name: str, args: list[Any] | None = None) -> None:
        self.sent.append((name, args or []))


class _Task:
    def __init__(self) -> None:
        self.app = _App()


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_BROKER_URL": "memory://",
                                  "MMBATCH_BATCH_SIZE": "4", "MMBATCH_REPROCESS_MAX_ATTEMPTS": "3"})
    upgrade(settings.db_url)
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


def _failing_model(rt: Runtime) -> int:
    """A default model whose text encoder version the worker does not have: every item fails."""
    with rt.db.session() as s:
        model = register_model(s, name="stale", fusion="concat", classes=["a", "b"],
                               encoders={"text": {"name": "minilm", "version": "older-v0",
                                                  "dim": 384}},
                               metrics={}, config={}, checkpoint_blob="0" * 64, job_id=None)
        promote(s, model.id)
        return model.id


def _deliver(rt: Runtime, task: _Task, job_id: str, ids: list[int]) -> list[int] | None:
    pending = _count_attempt(rt, task, job_id, ids)
    if pending:
        process_batch(rt, job_id, pending)
    return pending


def test_reprocess_batches_are_not_split_and_tries_stop_at_the_limit(rt: Runtime) -> None:
    model_id = _failing_model(rt)
    job_id = _job(rt, {f"{i}.txt": f"word {i}".encode() for i in range(3)}, kind="classify",
                  model_version_id=model_id)
    [batch] = ingest_job(rt, job_id)
    task = _Task()
    assert _deliver(rt, task, job_id, batch) == batch
    with rt.db.session() as s:
        assert jobs.get_job(s, job_id).failed == 3
        assert {it.attempts for it in jobs.items_by_id(s, batch)} == {1}

    runs = 0
    while True:
        started = reprocess.start(rt, None)
        if started.job_id is None:
            assert started.reason == "nothing to reprocess"
            break
        runs += 1
        with rt.db.session() as s:
            ids = jobs.item_ids(s, started.job_id)
        assert sorted(ids) == sorted(batch)
        # the first delivery of the reprocess batch runs it whole: no split, nothing re-sent
        assert _deliver(rt, task, started.job_id, ids) == ids
        assert task.app.sent == []
        with rt.db.session() as s:
            job = jobs.get_job(s, started.job_id)
            assert (job.state, job.failed) == ("succeeded", 3)
    # tries: one in the classify job, then reprocessing until reprocess_max_attempts (3)
    assert runs == 2
    with rt.db.session() as s:
        assert {it.attempts for it in jobs.items_by_id(s, batch)} == {3}


def test_a_redelivered_batch_is_split_and_its_halves_count_afresh(rt: Runtime) -> None:
    job_id = _job(rt, {f"{i}.txt": f"word {i}".encode() for i in range(4)}, kind="embed")
    [batch] = ingest_job(rt, job_id)
    task = _Task()
    # a delivery whose worker died before writing anything: counted, then lost
    assert _count_attempt(rt, task, job_id, batch) == batch
    assert _count_attempt(rt, task, job_id, batch) is None  # delivered again: split
    assert [args for _, args in task.app.sent] == [[job_id, batch[:2]], [job_id, batch[2:]]]
    for _, (jid, half) in list(task.app.sent):
        assert _deliver(rt, task, jid, half) == half  # a half's first delivery runs
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.done) == ("succeeded", 4)
