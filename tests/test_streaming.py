"""Streaming ingest: items reach the workers while their archive is still being walked.

The walker hands over complete items as it goes (a tar's key is complete when the next begins;
a zip's members are read grouped by key); ingest inserts and plans them a chunk at a time and
fills the dispatch window. Here the "broker" runs each sent batch at once, in this process, so
batches finish while the walk goes on, as with a separate ingest process.
"""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image
from sqlalchemy import select

from media.archive import Limits, Walk, walk
from mmbatch.contract import TASK_PROCESS_BATCH, TASK_TRAIN, TASK_WEBHOOKS
from mmbatch.settings import Settings
from store import dispatch as plans
from store import jobs
from store.migrate import upgrade
from store.schema import Item, Result
from tests.util import tar_bytes
from worker import ingest
from worker.batch import BatchProcessor
from worker.dispatch import dispatch
from worker.ingest import ingest_job
from worker.runtime import Runtime

BATCH = 2


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path / "data"),
                                  "MMBATCH_BROKER_URL": "memory://",
                                  "MMBATCH_BATCH_SIZE": str(BATCH)})
    upgrade(settings.db_url)
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


class Broker:
    """A send_task that runs each batch as soon as it is sent (and tops the window up after
    it, as the batch task does), and records every message."""

    def __init__(self, rt: Runtime, run: bool = True) -> None:
        self.rt, self.run, self.sent = rt, run, []  # type: ignore[var-annotated]
        self.items_seen_while_walking: list[int] = []

    def __call__(self, name: str, args: list[Any] | None = None, **_: Any) -> None:
        self.sent.append((name, args))
        if name != TASK_PROCESS_BATCH or not self.run:
            return
        job_id, ids, batch_id = args  # type: ignore[misc]
        with self.rt.db.session() as s:
            if jobs.get_job(s, job_id).walking:
                self.items_seen_while_walking += ids
        report = BatchProcessor(self.rt, job_id, ids).run()
        with self.rt.db.session() as s:
            plans.finish(s, batch_id)
            plans.plan_parts(s, job_id, report.resend)
        dispatch(self.rt, self)

    def drain(self) -> None:
        while dispatch(self.rt, self):
            pass

    def named(self, name: str) -> int:
        return sum(1 for n, _ in self.sent if n == name)


def _png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (shade, 255 - shade, 90)).save(buf, "PNG")
    return buf.getvalue()


def _job(rt: Runtime, archive: bytes, kind: str = "embed", name: str = "a.tar",
         **options: Any) -> str:
    digest = rt.blobs.put_bytes(archive)
    with rt.db.session() as s:
        return jobs.create_job(s, kind=kind, archive_blob=digest, archive_name=name,
                               archive_bytes=len(archive), options=options,
                               model_version_id=None).id


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _walk(tmp_path: Path, data: bytes, name: str, chunk: int = 2, media: dict[str, Any] | None = None
          ) -> tuple[Walk, list[tuple[list[str], int]]]:
    """Walk ``data``; every hand-over with how many members had been read by then (and, in
    ``media``, each key's modalities every time it was handed over)."""
    path = tmp_path / name
    path.write_bytes(data)
    calls: list[tuple[list[str], int]] = []

    def ready(w: Walk, keys: list[str]) -> None:
        calls.append((keys, w.members))
        for key in keys:
            (media if media is not None else {}).setdefault(key, []).append(set(w.media_of(key)))

    found = walk(path, lambda f: f.read().hex()[:16], ready=ready, chunk=chunk)
    return found, calls


def test_a_tar_hands_items_over_as_they_complete(tmp_path: Path) -> None:
    files = {f"k{i}.{ext}": f"{i}{ext}".encode() for i in range(5) for ext in ("txt", "png")}
    found, calls = _walk(tmp_path, tar_bytes(files), "a.tar")
    assert [keys for keys, _ in calls] == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    assert calls[0][1] < found.members  # before the walk was over
    assert found.handed == 5 and not found.items  # handed over, and no longer held


def test_a_zip_is_read_grouped_by_key_with_labels_first(tmp_path: Path) -> None:
    files = {"b.txt": b"b", "a.txt": b"a", "b.png": b"B", "a.png": b"A",
             "labels.csv": b"a,x\nb,y\n"}
    media: dict[str, Any] = {}
    found, calls = _walk(tmp_path, _zip(files), "a.zip", chunk=1, media=media)
    assert [keys for keys, _ in calls] == [["a"], ["b"]]
    assert media["a"] == [{"text", "image"}]  # once, whole
    assert found.label_of("a").label == "x"  # type: ignore[union-attr]


def test_a_key_that_comes_back_after_it_was_handed_over_is_handed_over_again(
        tmp_path: Path) -> None:
    """The walk keeps nothing of what it handed over: the caller, which has it, joins the
    late file (ingest finds the key in the database: see the labels-after-the-media test)."""
    files = {"k0.png": b"0", "k1.png": b"1", "k2.png": b"2", "k0.txt": b"zero"}
    media: dict[str, Any] = {}
    found, calls = _walk(tmp_path, tar_bytes(files), "a.tar", chunk=1, media=media)
    assert [keys for keys, _ in calls] == [["k0"], ["k1"], ["k2"], ["k0"]]
    assert media["k0"] == [{"image"}, {"text"}] and not found.items


def test_a_streamed_walk_holds_no_more_for_more_members(tmp_path: Path) -> None:
    """What a streamed walk keeps does not grow with the archive: its items leave it as they
    are handed over (ingest keeps nothing of them either)."""
    peaks = {}
    for n in (2_000, 20_000):
        files = {f"t/{i:06d}.txt": f"caption {i}".encode() for i in range(n)}
        path = tmp_path / f"{n}.tar"
        path.write_bytes(tar_bytes(files))
        tracemalloc.start()
        found = walk(path, lambda f: f.read().hex()[:16], Limits(max_members=n),
                     ready=lambda w, keys: None, chunk=32)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert found.handed == n and len(found.items) == 0
    assert peaks[20_000] < 2 * peaks[2_000], peaks  # 10x the members, not 10x the memory


def test_batches_run_while_the_walk_goes_on_and_the_job_then_finishes(rt: Runtime) -> None:
    files = {f"t/{i:02d}.txt": f"caption {i}".encode() for i in range(9)}
    job_id = _job(rt, tar_bytes(files))
    broker = Broker(rt)
    ingest_job(rt, job_id, broker)
    broker.drain()
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.total, job.done, job.failed) == ("succeeded", 9, 9, 0)
        assert job.started_at is not None
    assert len(broker.items_seen_while_walking) >= 4  # two windows went out before the end
    assert broker.named(TASK_WEBHOOKS) == 1  # finished once, by ingest or by the last batch


def test_labels_after_the_media_and_late_members_are_joined(rt: Runtime) -> None:
    """A tar as `tar cf a.tar *.png *.txt labels.csv` makes it: every caption comes after
    every picture, and the labels after both."""
    n = 6
    files = {f"{i}.png": _png(i * 40) for i in range(n)}
    files |= {f"{i}.txt": f"caption {i}".encode() for i in range(n)}
    files["labels.csv"] = "".join(f"{i},{'ab'[i % 2]}\n" for i in range(n)).encode()
    job_id = _job(rt, tar_bytes(files))
    broker = Broker(rt)
    ingest_job(rt, job_id, broker)
    broker.drain()
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.total, job.done, job.failed) == ("succeeded", n, n, 0)
        items = s.scalars(select(Item).where(Item.job_id == job_id)).all()
        assert {i.key: i.label for i in items} == {str(i): "ab"[i % 2] for i in range(n)}
        assert all(set(i.media) == {"image", "text"} for i in items)
        results = s.scalars(select(Result).where(Result.job_id == job_id)).all()
        assert len(results) == n
        # each result was computed from the caption too (read while making it)
        assert all((r.info or {}).get("text_encoding") for r in results), \
            [(r.item_id, r.info) for r in results]
    assert len(broker.items_seen_while_walking) >= 2


def test_a_train_job_trains_once_after_the_walk_even_when_its_batches_finished_first(
        rt: Runtime) -> None:
    files = {"labels.csv": b"".join(f"{i},{'ab'[i % 2]}\n".encode() for i in range(6))}
    files |= {f"{i}.txt": f"{'ab'[i % 2]} caption {i}".encode() for i in range(6)}
    job_id = _job(rt, tar_bytes(files), kind="train")
    broker = Broker(rt)
    ingest_job(rt, job_id, broker)
    broker.drain()
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.stage, job.done) == ("running", "training", 6)
    assert broker.named(TASK_TRAIN) == 1


def test_cancelling_while_the_archive_is_walked_stops_its_work(rt: Runtime) -> None:
    files = {f"{i:02d}.txt": f"caption {i}".encode() for i in range(20)}
    job_id = _job(rt, tar_bytes(files))

    class Cancelling(Broker):
        def __call__(self, name: str, args: list[Any] | None = None, **kw: Any) -> None:
            with self.rt.db.session() as s:
                jobs.cancel_job(s, job_id)
            super().__call__(name, args, **kw)

    broker = Cancelling(rt)
    assert ingest_job(rt, job_id, broker) == []
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "cancelled"
        assert len(jobs.item_ids(s, job_id)) < 20  # nothing more inserted after the cancel
        assert job.done == 0  # the batch sent after the cancel skipped
        assert job.total == 20  # the walk went on to count them


def test_a_walk_that_fails_part_way_keeps_nothing(rt: Runtime) -> None:
    data = tar_bytes({f"{i:02d}.txt": f"caption {i}".encode() for i in range(12)})
    job_id = _job(rt, data[:len(data) // 2])  # cut half way
    broker = Broker(rt)
    assert ingest_job(rt, job_id, broker) == []
    assert broker.named(TASK_PROCESS_BATCH) >= 1  # it streamed items before the cut
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "failed" and "truncated" in (job.error or "")
        assert jobs.item_ids(s, job_id) == [] and (job.total, job.done) == (0, 0)
        assert s.scalars(select(Result).where(Result.job_id == job_id)).all() == []


def test_an_ingest_redelivered_mid_walk_adds_what_the_first_did_not_reach(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {f"{i:02d}.txt": f"caption {i}".encode() for i in range(7)}
    job_id = _job(rt, tar_bytes(files))
    take = ingest.Stream.take

    def crash_after_first(self: ingest.Stream, found: Walk, keys: list[str]) -> None:
        if self.count:
            raise SystemExit("the ingest worker died")
        take(self, found, keys)

    monkeypatch.setattr(ingest.Stream, "take", crash_after_first)
    broker = Broker(rt)
    with pytest.raises(SystemExit):
        ingest_job(rt, job_id, broker)
    monkeypatch.setattr(ingest.Stream, "take", take)
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.walking) == ("running", True)  # it cannot finish yet
        assert len(jobs.item_ids(s, job_id)) == BATCH
    ingest_job(rt, job_id, broker)
    broker.drain()
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert (job.state, job.total, job.done) == ("succeeded", 7, 7)
        assert len(s.scalars(select(Result).where(Result.job_id == job_id)).all()) == 7
