"""One key=value log line per job state change, with the job id: written when the change
commits, never for a conditional UPDATE that matched nothing or a transaction rolled back."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from mmbatch.settings import Settings
from store import jobs
from store.joblog import format_fields
from store.migrate import upgrade
from tests.util import tar_bytes
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.runtime import Runtime

LINE = re.compile(r"^job_state job=(\S+) state=(\w+)((?: \w+=(?:\"(?:[^\"\\]|\\.)*\"|\S+))*)$")


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    data = tmp_path_factory.mktemp("joblog")
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data), "MMBATCH_BROKER_URL": "memory://",
                                  "MMBATCH_BATCH_SIZE": "2"})
    upgrade(settings.db_url)
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


def _states(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    """(job, state, rest) of every job_state line; every line must parse as key=value."""
    out = []
    for rec in caplog.records:
        message = rec.getMessage()
        if message.startswith("job_state "):
            match = LINE.match(message)
            assert match, message
            out.append((match[1], match[2], match[3].strip()))
    return out


def _archive(rt: Runtime, files: dict[str, bytes], kind: str = "embed") -> str:
    data = tar_bytes(files)
    digest = rt.blobs.put_bytes(data)
    with rt.db.session() as s:
        return jobs.create_job(s, kind=kind, archive_blob=digest, archive_name="t.tar",
                               archive_bytes=len(data), model_version_id=None).id


def test_a_job_run_logs_each_state_once(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    job_id = _archive(rt, {"a.txt": b"red", "b.txt": b"blue", "c.txt": b"green"})
    batches = ingest_job(rt, job_id)
    for ids in batches:
        BatchProcessor(rt, job_id, ids).run()
    BatchProcessor(rt, job_id, batches[-1]).run()  # redelivered after the end: no state change
    assert _states(caplog) == [(job_id, "queued", "kind=embed"),
                               (job_id, "ingesting", ""),
                               (job_id, "running", "total=3"),
                               (job_id, "succeeded", "")]


def test_a_failed_job_logs_its_error_quoted(rt: Runtime,
                                            caplog: pytest.LogCaptureFixture) -> None:
    job_id = _archive(rt, {"notes.md": b"# nothing a model reads"})
    caplog.set_level(logging.INFO)
    assert ingest_job(rt, job_id) == []
    states = _states(caplog)
    assert [s[:2] for s in states] == [(job_id, "ingesting"), (job_id, "failed")]
    assert states[1][2].startswith('error="the archive holds no usable image, text, audio or video file')


def test_no_line_for_an_update_that_matched_nothing_or_was_rolled_back(
        rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    job_id = _archive(rt, {"a.txt": b"x"})
    caplog.set_level(logging.INFO)
    with rt.db.session() as s:
        assert jobs.cancel_job(s, job_id)
    with rt.db.session() as s:
        assert not jobs.cancel_job(s, job_id)  # already cancelled: nothing moved
        assert not jobs.fail_job(s, job_id, "too late")
    assert _states(caplog) == [(job_id, "cancelled", "")]
    other = _archive(rt, {"b.txt": b"y"})
    caplog.clear()
    with pytest.raises(RuntimeError), rt.db.session() as s:
        assert jobs.transition(s, other, ("queued",), "ingesting")
        raise RuntimeError("the transaction fails after the UPDATE")
    assert _states(caplog) == []
    with rt.db.session() as s:
        assert jobs.get_job(s, other).state == "queued"
    caplog.clear()
    with rt.db.session() as s:
        jobs.transition(s, other, ("queued",), "ingesting")
    assert _states(caplog) == [(other, "ingesting", "")]


def test_values_are_quoted_only_when_they_must_be() -> None:
    assert format_fields({"job": "j1", "state": "failed", "error": 'bad "x" = y'}) == \
        'job=j1 state=failed error="bad \\"x\\" = y"'
    assert format_fields({"total": 3, "kind": "train"}) == "total=3 kind=train"
