"""Jobs, their items and results: state transitions, bulk inserts, counters and pages.

State moves only through conditional UPDATEs (``… WHERE state = :expected``) so that a task
delivered twice cannot move a job twice; results are inserted keyed by (item, model version) and
the job's counters move only for rows that were new.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.orm import Session

from store.schema import NO_MODEL, TERMINAL_STATES, Item, Job, Result, utcnow
from store.upsert import insert_new

INSERT_CHUNK = 500


class JobNotFound(LookupError):
    pass


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def create_job(session: Session, *, kind: str, archive_blob: str, archive_name: str,
               archive_bytes: int, model_version_id: int | None,
               options: dict[str, Any] | None = None) -> Job:
    job = Job(kind=kind, state="queued", archive_blob=archive_blob, archive_name=archive_name,
              archive_bytes=archive_bytes, model_version_id=model_version_id,
              options=options or {}, report={})
    session.add(job)
    session.flush()
    return job


def transition(session: Session, job_id: str, expected: Sequence[str], new: str,
               **values: Any) -> bool:
    """Move a job from one of ``expected`` to ``new``; False if it was not in those states."""
    stmt = (update(Job).where(Job.id == job_id, Job.state.in_(list(expected)))
            .values(state=new, updated_at=utcnow(), **values))
    return session.execute(stmt).rowcount == 1


def fail_job(session: Session, job_id: str, error: str) -> bool:
    non_terminal = ("queued", "ingesting", "running")
    return transition(session, job_id, non_terminal, "failed", error=error,
                      finished_at=utcnow(), stage=None)


def reset_items(session: Session, job_id: str) -> None:
    """Forget a half-finished ingest so that a redelivered ingest starts clean."""
    session.execute(delete(Item).where(Item.job_id == job_id))


def add_items(session: Session, job_id: str, items: Iterable[dict[str, Any]]) -> int:
    """Bulk-insert items (dicts with key, media, label, split); returns how many were new."""
    count = 0
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append({"job_id": job_id, **item})
        if len(chunk) >= INSERT_CHUNK:
            count += len(insert_new(session, Item.__table__, chunk, ("job_id", "key"), ("id",)))
            chunk = []
    count += len(insert_new(session, Item.__table__, chunk, ("job_id", "key"), ("id",)))
    return count


def item_ids(session: Session, job_id: str, *, pending_only: bool = False,
             model_version_id: int = NO_MODEL) -> list[int]:
    stmt = select(Item.id).where(Item.job_id == job_id).order_by(Item.id)
    if pending_only:
        done = select(Result.item_id).where(Result.job_id == job_id,
                                            Result.model_version_id == model_version_id)
        stmt = stmt.where(Item.id.not_in(done))
    return list(session.scalars(stmt))


def items_by_id(session: Session, ids: Sequence[int]) -> list[Item]:
    rows = session.scalars(select(Item).where(Item.id.in_(list(ids))).order_by(Item.id))
    return list(rows)


@dataclasses.dataclass
class ItemOutcome:
    """What processing made of one item: a prediction and/or embedding, or an error."""

    item_id: int
    error: str | None = None
    label: str | None = None
    confidence: float | None = None
    top_k: list[dict[str, Any]] | None = None
    embedding: np.ndarray | None = None
    explanation: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class BatchCommit:
    new_done: int
    new_failed: int
    completed: bool  # this batch brought done + failed to total


def record_outcomes(session: Session, job_id: str, model_version_id: int,
                    outcomes: Sequence[ItemOutcome]) -> BatchCommit:
    """Insert results and move the job's counters, in the caller's transaction.

    Only rows that were new count, so a batch delivered twice changes nothing the second time.
    """
    rows = [{
        "item_id": o.item_id,
        "job_id": job_id,
        "model_version_id": model_version_id,
        "status": "failed" if o.error else "ok",
        "error": o.error,
        "label": o.label,
        "confidence": o.confidence,
        "top_k": o.top_k,
        "embedding": None if o.embedding is None
        else np.asarray(o.embedding, dtype="<f4").tobytes(),
        "explanation": o.explanation,
        "created_at": utcnow(),
    } for o in outcomes]
    inserted = insert_new(session, Result.__table__, rows, ("item_id", "model_version_id"),
                          ("status",))
    new_failed = sum(1 for (status,) in inserted if status == "failed")
    new_done = len(inserted) - new_failed
    if inserted:
        session.execute(update(Job).where(Job.id == job_id).values(
            done=Job.done + new_done, failed=Job.failed + new_failed, updated_at=utcnow()))
    completed = session.execute(
        select(Job.id).where(Job.id == job_id, Job.state == "running",
                             Job.done + Job.failed >= Job.total)).first() is not None
    return BatchCommit(new_done, new_failed, completed and bool(inserted))


def finish_job(session: Session, job_id: str) -> bool:
    """The one conditional UPDATE that ends a job whose counters reached its total."""
    stmt = (update(Job)
            .where(Job.id == job_id, Job.state == "running", Job.done + Job.failed >= Job.total)
            .values(state="succeeded", finished_at=utcnow(), updated_at=utcnow(), stage=None))
    return session.execute(stmt).rowcount == 1


def enter_stage(session: Session, job_id: str, expected: str | None, stage: str) -> bool:
    """Move a running job's stage from ``expected`` to ``stage``; False if another got there."""
    current = Job.stage.is_(None) if expected is None else Job.stage == expected
    stmt = (update(Job).where(Job.id == job_id, Job.state == "running", current)
            .values(stage=stage, updated_at=utcnow()))
    return session.execute(stmt).rowcount == 1


def results_page(session: Session, job: Job, *, after: int, limit: int
                 ) -> list[tuple[Item, Result | None]]:
    """Items of a job with their result (None while pending), ordered by item id."""
    stmt = (select(Item, Result)
            .outerjoin(Result, and_(Result.item_id == Item.id, Result.job_id == job.id))
            .where(Item.job_id == job.id, Item.id > after)
            .order_by(Item.id).limit(limit))
    return [(item, result) for item, result in session.execute(stmt)]


def is_terminal(job: Job) -> bool:
    return job.state in TERMINAL_STATES


def count_items(session: Session, job_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Item)
                              .where(Item.job_id == job_id)) or 0)
