"""Ingest: walk a job's archive, store its media once, insert its items, plan its batches (rows
that ``worker.dispatch`` sends a window at a time). A train
job on earlier jobs' items (``from_jobs``) copies them instead, with their current labels."""

from __future__ import annotations

import logging

from media.archive import ArchiveError, LabelRow, Limits, walk
from mmbatch.contract import training_step
from store import dispatch as plans
from store import jobs
from store.blobs import BlobNotFound
from store.labels import labelled_copies
from store.registry import get_model
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def ingest_job(rt: Runtime, job_id: str) -> list[list[int]]:
    """Turn the archive into items; returns the batches of item ids to process.

    Safe to run twice: a redelivered ingest either starts over (still ingesting) or, once the
    items are in, returns the batches that have no result yet.
    """
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state == "running":
            pending = jobs.item_ids(s, job_id, pending_only=True)
            if not plans.planned(s, job_id):  # its batches were never planned (or all done)
                plans.replan(s, job_id, pending, rt.settings.batch_size)
            return _batches(rt, job_id, pending)
        if job.state not in ("queued", "ingesting"):
            return []
        jobs.transition(s, job_id, ("queued", "ingesting"), "ingesting")
        jobs.reset_items(s, job_id)
        kind, archive_blob = job.kind, job.archive_blob
        step = training_step(kind, job.options)
        sources, holdout = job.options.get("from_jobs"), job.options.get("holdout")
        model = (get_model(s, job.model_version_id)
                 if job.model_version_id is not None and kind != "train" else None)
        known = (list(model.classes), f"{model.name} v{model.version}") if model else None

    if sources:
        return _copy_items(rt, job_id, sources, holdout)
    try:
        # The walker seeks (zip directories): it reads a local file, the blob's own or a copy.
        with rt.blobs.local_path(archive_blob) as path:
            found = walk(path, rt.blobs.put_stream, Limits.from_settings(rt.settings))
    except ArchiveError as exc:
        _fail(rt, job_id, str(exc))
        return []
    except BlobNotFound:
        _fail(rt, job_id, "the job's archive is no longer in blob storage")
        return []
    if not found.items:
        _fail(rt, job_id, found.why_empty(), found.report())
        return []
    labels = {found.labels[k].label for k in found.items if k in found.labels}
    if kind == "train":
        if not found.labels:
            _fail(rt, job_id, "a train job needs labels.csv (key,label[,split]) at the archive "
                              "root or in the one folder that holds everything", found.report())
            return []
        if len(labels) < 2:
            _fail(rt, job_id, "a train job needs labelled items of at least two classes; "
                              f"found {len(labels)}", found.report())
            return []
    warnings = class_warnings(labels, *known) if known else []

    unlabelled = LabelRow(None, None, None)  # type: ignore[arg-type]
    rows = ({"key": key, "media": media, "label": row.label, "split": row.split,
             "group": row.group}
            for key, media in found.items.items()
            for row in (found.labels.get(key, unlabelled),))
    with rt.db.session() as s:
        total = jobs.add_items(s, job_id, rows)
        moved = jobs.transition(s, job_id, ("ingesting",), "running", total=total,
                                report=found.report(), started_at=jobs.utcnow(),
                                stage="extracting" if step else None,
                                warnings=warnings)
        ids = jobs.item_ids(s, job_id) if moved else []
        plans.plan(s, job_id, ids, rt.settings.batch_size)  # with the items, in one commit
    if moved:
        log.info("ingest_done job=%s items=%d skipped=%d", job_id, total, found.skipped_count)
    return _batches(rt, job_id, ids)


def _copy_items(rt: Runtime, job_id: str, sources: list[str], holdout: str | None
                ) -> list[list[int]]:
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
        return []
    if holdout == "verified" and not verified:
        _fail(rt, job_id, "holdout=verified needs items a person labelled (mmbatch label, or "
                          "POST /api/v1/items/<id>/label); the jobs named have none", report)
        return []
    with rt.db.session() as s:
        total = jobs.add_items(s, job_id, rows)
        moved = jobs.transition(s, job_id, ("ingesting",), "running", total=total,
                                report=report, started_at=jobs.utcnow(), stage="extracting")
        ids = jobs.item_ids(s, job_id) if moved else []
        plans.plan(s, job_id, ids, rt.settings.batch_size)
    if moved:
        log.info("ingest_done job=%s items=%d from_jobs=%d", job_id, total, len(sources))
    return _batches(rt, job_id, ids)


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
    with rt.db.session() as s:
        if jobs.fail_job(s, job_id, error) and report is not None:
            jobs.get_job(s, job_id).report = report
