"""The poison guard's delivery count and the nightly retry count, without Celery (real SQLite).

A reprocess job delivers items that earlier jobs delivered already; its first delivery must not
look like a redelivery (which would split every batch), while every try still counts towards
``reprocess_max_attempts``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select

from mmbatch.settings import Settings
from store import jobs
from store.migrate import upgrade
from store.registry import promote, register_model
from store.reprocess import plan_members, start_reprocess
from store.schema import Item
from tests.test_pipeline import _job
from worker.batch import BatchProcessor, BatchReport
from worker.ingest import ingest_job
from worker.runtime import Runtime


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


def _admit(rt: Runtime, job_id: str, ids: list[int]) -> list[int] | BatchReport:
    """What the poison guard makes of one delivery of ``ids``: the ids to run, or a report."""
    return BatchProcessor(rt, job_id, ids).admit()


def _deliver(rt: Runtime, job_id: str, ids: list[int]) -> BatchReport:
    return BatchProcessor(rt, job_id, ids).run()


def _attempts(rt: Runtime, ids: list[int]) -> set[int]:
    with rt.db.session() as s:
        return set(s.scalars(select(Item.attempts).where(Item.id.in_(ids))))


def test_reprocess_batches_are_not_split_and_tries_stop_at_the_limit(rt: Runtime) -> None:
    model_id = _failing_model(rt)
    job_id = _job(rt, {f"{i}.txt": f"word {i}".encode() for i in range(3)}, kind="classify",
                  model_version_id=model_id)
    [batch] = ingest_job(rt, job_id)
    report = _deliver(rt, job_id, batch)
    assert report.new_failed == 3 and report.resend == []
    with rt.db.session() as s:
        assert jobs.get_job(s, job_id).failed == 3
    assert _attempts(rt, batch) == {1}

    runs = 0
    while True:
        started = start_reprocess(rt.db, None, limit=rt.settings.reprocess_limit,
                                  max_attempts=rt.settings.reprocess_max_attempts)
        if started.job_id is None:
            assert started.reason == "nothing to reprocess"
            break
        assert plan_members(rt.db, started.job_id, rt.settings.reprocess_max_attempts) == 3
        runs += 1
        with rt.db.session() as s:
            ids = jobs.item_ids(s, started.job_id)
        assert sorted(ids) == sorted(batch)
        # the first delivery of the reprocess batch runs it whole: no split, nothing re-sent
        report = _deliver(rt, started.job_id, ids)
        assert report.new_failed == len(ids) and report.resend == []
        with rt.db.session() as s:
            job = jobs.get_job(s, started.job_id)
            assert (job.state, job.failed) == ("succeeded", 3)
    # tries: one in the classify job, then reprocessing until reprocess_max_attempts (3)
    assert runs == 2
    assert _attempts(rt, batch) == {3}


def test_a_redelivered_batch_is_split_and_its_halves_count_afresh(rt: Runtime) -> None:
    job_id = _job(rt, {f"{i}.txt": f"word {i}".encode() for i in range(4)}, kind="embed")
    [batch] = ingest_job(rt, job_id)
    # a delivery whose worker died before writing anything: counted, then lost
    assert _admit(rt, job_id, batch) == batch
    again = _admit(rt, job_id, batch)  # delivered again: split
    assert isinstance(again, BatchReport) and again.resend == [batch[:2], batch[2:]]
    for half in again.resend:
        report = _deliver(rt, job_id, half)  # a half's first delivery runs
        assert report.new_done == len(half) and report.resend == []
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.done) == ("succeeded", 4)
