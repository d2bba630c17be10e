"""ingest and a batch (BatchProcessor) as plain functions (no Celery), on a real SQLite database."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import pytest

from mmbatch.settings import Settings
from store import jobs
from store.migrate import upgrade
from store.registry import register_model
from tests.util import tar_bytes
from worker.batch import BatchProcessor
from worker.ingest import ingest_job
from worker.model_cache import models_of
from worker.runtime import Runtime


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    data = tmp_path_factory.mktemp("pipeline")
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data), "MMBATCH_BROKER_URL": "memory://",
                                  "MMBATCH_BATCH_SIZE": "2"})
    upgrade(settings.db_url)
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


def _job(rt: Runtime, files: dict[str, bytes], kind: str = "embed",
         model_version_id: int | None = None) -> str:
    archive = tar_bytes(files)
    digest = rt.blobs.put_bytes(archive)
    with rt.db.session() as s:
        return jobs.create_job(s, kind=kind, archive_blob=digest, archive_name="t.tar",
                               archive_bytes=len(archive),
                               model_version_id=model_version_id).id


def test_ingest_then_batches_finish_the_job_and_redelivery_changes_nothing(rt: Runtime) -> None:
    files = {"a.png": _png((255, 0, 0)), "a.txt": b"red", "b.txt": b"blue", "c.txt": b"green"}
    job_id = _job(rt, files)
    batches = ingest_job(rt, job_id)
    assert [len(b) for b in batches] == [2, 1]  # MMBATCH_BATCH_SIZE=2
    assert ingest_job(rt, job_id) == batches  # redelivered after fan-out: the same pending work
    first = BatchProcessor(rt, job_id, batches[0]).run()
    assert (first.new_done, first.completed) == (2, False)
    again = BatchProcessor(rt, job_id, batches[0]).run()
    assert (again.new_done, again.new_failed) == (0, 0)
    last = BatchProcessor(rt, job_id, batches[1]).run()
    assert last.completed
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.total, job.done, job.failed) == ("succeeded", 3, 3, 0)
    assert BatchProcessor(rt, job_id, batches[1]).run().new_done == 0  # after the end: a no-op


def test_identical_files_are_encoded_once(rt: Runtime) -> None:
    from sqlalchemy import func, select

    from store.schema import Feature

    with rt.db.session() as s:
        before = s.scalar(select(func.count()).select_from(Feature))
    job_id = _job(rt, {"x.txt": b"same words", "y.txt": b"same words", "z.txt": b"other words"})
    for batch in ingest_job(rt, job_id):
        BatchProcessor(rt, job_id, batch).run()
    with rt.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Feature)) - before == 2


def test_a_job_with_no_media_fails_with_a_reason(rt: Runtime) -> None:
    job_id = _job(rt, {"readme.md": b"# nothing to see"})
    assert ingest_job(rt, job_id) == []
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "failed" and "no usable image, text, audio or video file" in job.error


def test_train_without_labels_fails_with_a_reason(rt: Runtime) -> None:
    job_id = _job(rt, {"a.txt": b"x", "b.txt": b"y"}, kind="train")
    assert ingest_job(rt, job_id) == []
    with rt.db.session() as s:
        assert "labels.csv" in jobs.get_job(s, job_id).error


def test_a_model_trained_on_other_encoder_versions_fails_items_with_the_reason(rt: Runtime) -> None:
    with rt.db.session() as s:
        model = register_model(s, name="old", fusion="concat", classes=["a", "b"],
                               encoders={"text": {"name": "minilm", "version": "older-v0",
                                                  "dim": 384}},
                               metrics={}, config={}, checkpoint_blob="0" * 64, job_id=None)
        model_id = model.id
    job_id = _job(rt, {"a.txt": b"x"}, kind="classify", model_version_id=model_id)
    [batch] = ingest_job(rt, job_id)
    report = BatchProcessor(rt, job_id, batch).run()
    assert (report.new_done, report.new_failed, report.completed) == (0, 1, True)
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded" and job.failed == 1
        [(_, result)] = jobs.results_page(s, job, after=0, limit=5)
        assert "older-v0" in result.error and "retrain" in result.error


def test_decoding_runs_in_the_sandbox_unless_isolation_is_off(rt: Runtime, tmp_path: Path) -> None:
    from media.sandbox import DecodeSandbox

    assert isinstance(models_of(rt).sandbox, DecodeSandbox)
    off = Runtime(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                     "MMBATCH_DECODE_ISOLATION": "off"}))
    assert models_of(off).sandbox is None
    off.close()


def test_a_hanging_and_a_crashing_decoder_fail_their_items_and_the_batch_goes_on(
        tmp_path: Path) -> None:
    from media.sandbox import DecodeSandbox
    from tests.test_hostile_media import FAULTY_CHILD

    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_BROKER_URL": "memory://",
                                  "MMBATCH_BATCH_SIZE": "8"})
    upgrade(settings.db_url)
    runtime = Runtime(settings)
    # what the runtime would build, but with children whose decoder hangs on "hang" and dies of
    # SIGSEGV on "crash" (a C library fault), and a 3 s limit per file
    models_of(runtime)._sandbox = DecodeSandbox(processes=1, timeout=3.0, command=FAULTY_CHILD)
    try:
        files = {"hang.png": _png((1, 2, 3)), "crash.png": _png((4, 5, 6)),
                 "ok.png": _png((7, 8, 9)), "ok.txt": b"still here"}
        job_id = _job(runtime, files)
        [batch] = ingest_job(runtime, job_id)
        report = BatchProcessor(runtime, job_id, batch).run()
        assert (report.new_done, report.new_failed, report.completed) == (1, 2, True)
        with runtime.db.session() as s:
            job = jobs.get_job(s, job_id)
            rows = {item.key: result for item, result in
                    jobs.results_page(s, job, after=0, limit=10)}
        assert (job.state, job.done, job.failed) == ("succeeded", 1, 2)
        assert "longer than 3 s" in rows["hang"].error
        assert "crashed" in rows["crash"].error
        assert rows["ok"].status == "ok"
        assert models_of(runtime).sandbox.restarts == 2
    finally:
        runtime.close()
