"""Ingest: walk a job's archive, store its media once, insert its items and plan their batches
(rows that ``worker.dispatch`` sends a window at a time) as the walk goes. A train
job on earlier jobs' items (``from_jobs``) copies them instead, with their current labels."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from media.archive import MAX_REPORTED, ArchiveError, Limits, Walk, join_media, walk
from mmbatch.contract import STEP_TASKS, TASK_WEBHOOKS, training_step
from store import dispatch as plans
from store import jobs, uploads
from store.blobs import BlobNotFound
from store.labels import labelled_copies
from store.registry import get_model
from store.s3blobs import S3BlobStore
from worker.dispatch import dispatch
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def ingest_job(rt: Runtime, job_id: str, send_task: Callable[..., Any] | None = None
               ) -> list[list[int]]:
    """:func:`ingest`, then the batches of item ids still to process, for a caller that runs
    them itself (tests, benches); the ingest task leaves them to the dispatcher and never lists
    a big job's ids."""
    if not ingest(rt, job_id, send_task):
        return []
    with rt.db.session() as s:
        return _batches(rt, job_id, jobs.item_ids(s, job_id, pending_only=True))


def ingest(rt: Runtime, job_id: str, send_task: Callable[..., Any] | None = None) -> bool:
    """Turn the archive into items; whether the job has items to process.

    Items are inserted and their batches planned as the walk finds them complete, so work on
    them starts while the archive is still being walked: with ``send_task`` (the ingest task's)
    each planned chunk fills the dispatch window at once, and the job's next step (training, or
    its end) is sent here when its last batch finished before the walk did. The first items
    make the job ``running``; it stays ``walking`` (and cannot finish) until the walk ends:
    only then does it know its total, its labels and its late members.

    Safe to run twice: a redelivered ingest walks again, adding the items the first walk did
    not reach (those it did keep their batches and results), or, once the items are in,
    plans again the items that have no result yet when their batches were lost.
    """
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state == "running" and not job.walking:
            if plans.planned(s, job_id):
                return True
            # its batches were never planned (or all done)
            pending = jobs.item_ids(s, job_id, pending_only=True)
            plans.replan(s, job_id, pending, rt.settings.batch_size)
            return bool(pending)
        if job.state not in ("queued", "ingesting", "running"):
            return False
        again = job.walking  # a redelivered ingest: the first walk's items stay
        kind, archive_blob = job.kind, job.archive_blob
        step = training_step(kind, job.options)
        jobs.transition(s, job_id, ("queued",), "ingesting",
                        stage="extracting" if step else None)
        sources, holdout = job.options.get("from_jobs"), job.options.get("holdout")
        model = (get_model(s, job.model_version_id)
                 if job.model_version_id is not None and kind != "train" else None)
        known = (list(model.classes), f"{model.name} v{model.version}") if model else None

    if sources:
        return _copy_items(rt, job_id, sources, holdout)
    stream = Stream(rt, job_id, send_task, again)
    try:
        # The walker seeks (zip directories): it reads a local file, the blob's own or a copy.
        with (_adopted(rt, job_id, archive_blob) if archive_blob.startswith(uploads.STAGED)
              else rt.blobs.local_path(archive_blob)) as path:
            found = walk(path, stream.store, Limits.from_settings(rt.settings),
                         ready=stream.take, chunk=rt.settings.batch_size)
    except ArchiveError as exc:
        _fail(rt, job_id, str(exc))
        return False
    except BlobNotFound:
        _fail(rt, job_id, "the job's archive is no longer in blob storage")
        return False
    if stream.stopped:
        total = stream.count + stream.uncounted
        with rt.db.session() as s:  # cancelled while walking: it says how many items it had
            jobs.set_total(s, job_id, total)
        log.info("ingest_stopped job=%s items=%d of %d", job_id, stream.count, total)
        return False
    with rt.db.session() as s:  # the walk's items are the database's: counted there
        stream.finish(s, found)
        report = found.report(jobs.held(s, job_id, found.labels, MAX_REPORTED))
        labels = jobs.classes(s, job_id)
    if not report["items"]:
        _fail(rt, job_id, found.why_empty(), report)
        return False
    if kind == "train":
        if not found.labels:
            _fail(rt, job_id, "a train job needs labels.csv (key,label[,split]) at the archive "
                              "root or in the one folder that holds everything", report)
            return False
        if len(labels) < 2:
            _fail(rt, job_id, "a train job needs labelled items of at least two classes; "
                              f"found {len(labels)}", report)
            return False
    warnings = class_warnings(labels, *known) if known else []

    with rt.db.session() as s:
        moved = jobs.walked(s, job_id, report=report, warnings=warnings)
        job = jobs.get_job(s, job_id)
        # every batch finished before the walk did: what the last batch would have done
        following = (jobs.move_on(s, job_id, step)
                     if moved and job.done + job.failed >= job.total else None)
    if moved:
        log.info("ingest_done job=%s items=%d skipped=%d late=%d", job_id, report["items"],
                 found.skipped_count, stream.late)
    stream.send(following)
    return moved


@contextlib.contextmanager
def _adopted(rt: Runtime, job_id: str, archive_blob: str) -> Iterator[Path]:
    """The archive of a job made from a direct upload, as a file on this machine: the job names
    the staged object in S3 (``store.uploads.staged_archive``) instead of a blob, and its bytes
    become one here, where they are read anyway (the API never reads them), hashed as they
    download and copied inside S3 to their content-addressed key; the job then names the blob,
    and the staged object goes. A redelivery before the job named the blob does it again."""
    upload_id = uploads.staged_upload(archive_blob)
    if upload_id is None or not isinstance(rt.blobs, S3BlobStore):
        raise BlobNotFound(archive_blob)  # blobs moved off S3 since the upload
    with rt.blobs.adopt_staged(upload_id) as (path, digest):
        with rt.db.session() as s:
            uploads.adopt_archive(s, job_id, upload_id, digest)
        rt.blobs.abort_staged(upload_id, None)  # the blob is the archive now
        log.info("upload_adopted job=%s upload=%s blob=%s", job_id, upload_id, digest)
        yield path


class Stream:
    """The items a walk hands over as they are complete: inserted with their labels so far,
    planned as batches and sent, a chunk at a time. Nothing of them stays in memory: a key
    that comes back (a tar's late member) is known by its insert finding it there, and is
    joined at once; labels.csv read after the media is joined by ``finish``."""

    def __init__(self, rt: Runtime, job_id: str, send_task: Callable[..., Any] | None,
                 again: bool = False) -> None:
        self.rt, self.job_id, self.send_task = rt, job_id, send_task
        self.again = again  # a redelivered walk: the first one's items are in
        self.unlabelled = 0  # items handed over before labels.csv was read
        self.count = 0  # items inserted
        self.late = 0  # items that gained files after they were inserted: processed again
        # The job was cancelled while its archive was walked: the walk goes on only to count
        # its items (the job's total), storing and inserting nothing more. (A key that comes
        # back after that counts twice.)
        self.stopped = False
        self.uncounted = 0

    def store(self, f: IO[bytes]) -> str:
        if not self.stopped:
            return self.rt.blobs.put_stream(f)
        while f.read(1 << 20):
            pass
        return ""

    def take(self, found: Walk, keys: list[str]) -> None:
        if self.stopped:
            self.uncounted += len(keys)
            return
        rows = []
        for key in keys:
            row = found.label_of(key)
            rows.append({"key": key, "media": found.media_of(key),
                         "label": row.label if row else None, "split": row.split if row else None,
                         "group": row.group if row else None})
        try:
            with self.rt.db.session() as s:
                new = jobs.insert_new_items(s, self.job_id, rows)
                if not jobs.grow(s, self.job_id, len(new)):
                    raise _Cancelled()  # (rolled back: nothing of this chunk is kept)
                ids = sorted(new.values())
                if len(new) < len(rows):
                    ids += self.join(s, found, [r for r in rows if r["key"] not in new])
                plans.plan(s, self.job_id, ids, self.rt.settings.batch_size)  # same commit
        except _Cancelled:
            self.stopped = True
            self.uncounted += len(keys)
            return
        self.count += len(new)
        if not found.has_labels:
            self.unlabelled += len(new)
        if self.send_task is not None:
            dispatch(self.rt, self.send_task)

    def join(self, s: Any, found: Walk, rows: list[dict[str, Any]]) -> list[int]:
        """Items the job has already (a key that came back, or one a first walk inserted)
        with the files handed over now: those that gained one go again; their ids."""
        had = jobs.media_by_key(s, self.job_id, [r["key"] for r in rows])
        changed = {}
        for row in rows:
            key = row["key"]
            media, skipped = join_media(key, had[key], row["media"], self.again)
            for name, reason in skipped:
                found.skip(name, reason)
            if media != had[key]:
                changed[key] = media
        self.late += len(changed)
        return jobs.rejoin(s, self.job_id, changed) if changed else []

    def finish(self, s: Any, found: Walk) -> None:
        """Join what the walk learnt after handing items over: labels.csv."""
        if found.labels_revoked:
            jobs.unlabel_all(s, self.job_id)
        elif found.has_labels and (self.again or self.unlabelled):
            # the first walk may have labelled differently what it reached
            jobs.relabel(s, self.job_id, found.labels)

    def send(self, following: str | None) -> None:
        if self.send_task is None:
            return
        dispatch(self.rt, self.send_task)
        if following in STEP_TASKS:
            self.send_task(STEP_TASKS[following], args=[self.job_id])
        elif following == "finished":
            self.send_task(TASK_WEBHOOKS)


class _Cancelled(Exception):
    """The job was stopped while its archive was walked."""


def _copy_items(rt: Runtime, job_id: str, sources: list[str], holdout: str | None) -> bool:
    """A train job's items from earlier jobs: those with a label now, corrections included;
    their features are cached, so extraction runs no encoder."""
    with rt.db.session() as s:
        rows, verified = labelled_copies(s, sources, holdout)
    labels = {r["label"] for r in rows}
    report = {"from_jobs": sources, "items": len(rows), "labelled": len(rows),
              "verified": verified, "holdout": holdout, "skipped": [], "skipped_count": 0}
    if len(labels) < 2:
        _fail(rt, job_id, "a train job needs labelled items of at least two classes; the jobs "
                          f"named hold {len(labels)} ({', '.join(map(str, labels))})", report)
        return False
    if holdout == "verified" and not verified:
        _fail(rt, job_id, "holdout=verified needs items a person labelled (mmbatch label, or "
                          "POST /api/v1/items/<id>/label); the jobs named have none", report)
        return False
    with rt.db.session() as s:
        total = jobs.add_items(s, job_id, rows)
        moved = jobs.transition(s, job_id, ("ingesting",), "running", total=total,
                                report=report, started_at=jobs.utcnow(), stage="extracting")
        ids = jobs.item_ids(s, job_id) if moved else []
        plans.plan(s, job_id, ids, rt.settings.batch_size)
    if moved:
        log.info("ingest_done job=%s items=%d from_jobs=%d", job_id, total, len(sources))
    return bool(ids)


def _batches(rt: Runtime, job_id: str, ids: list[int]) -> list[list[int]]:
    size = rt.settings.batch_size
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def class_warnings(labels: set[str], classes: list[str], model: str) -> list[str]:
    """What to tell the user when an archive's labels are not all classes of the model that
    classifies it: it cannot predict them, so accuracy on them is zero by construction."""
    unknown = sorted(labels - set(classes))
    if not unknown:
        return []
    theirs = ", ".join(sorted(classes))
    if len(unknown) == len(labels):
        return [f"none of the archive's labels ({', '.join(unknown)}) is a class of model "
                f"{model} ({theirs}): it cannot predict them"]
    return [f"the archive's labels {', '.join(unknown)} are not classes of model {model} "
            f"({theirs}): it cannot predict them"]


def _fail(rt: Runtime, job_id: str, error: str, report: dict[str, object] | None = None
          ) -> None:
    """Fail the job with the reason; what its walk streamed before it failed goes (a batch
    still running on it writes nothing: its items are gone)."""
    with rt.db.session() as s:
        if jobs.fail_job(s, job_id, error):
            jobs.drop_items(s, job_id)
            if report is not None:
                jobs.get_job(s, job_id).report = report
