"""Jobs, their items and results: state transitions, bulk inserts, counters and pages.

State moves only through conditional UPDATEs (``… WHERE state = :expected``) so that a task
delivered twice cannot move a job twice; results are inserted keyed by (item, model version) and
the job's counters move only for rows that were new.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from sqlalchemy import and_, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from mmbatch.contract import ACTIVE_STATES, TERMINAL_STATES, TRAINING_KINDS, training_step
from store import joblog
from store.schema import (
    JOB_ID_LENGTH,
    Batch,
    NO_MODEL,
    Item,
    Job,
    JobMember,
    Result,
    WebhookDelivery,
    utcnow,
)
from store.upsert import insert_new

INSERT_CHUNK = 500


class JobNotFound(LookupError):
    pass


ANY_TENANT = -1  # worker code acts on the ids it was given


@dataclasses.dataclass(frozen=True)
class MediaFile:
    """One media file of an item: its content hash (the blob) and its name in the archive;
    ``source`` says where an item's audio comes from when a clip's sound track gives it
    (``"video"``: the blob and name are the clip's)."""

    blob: str
    name: str
    source: str = "file"


@dataclasses.dataclass(frozen=True)
class ItemRow:
    """An item as the worker reads it: its media files by modality and its label."""

    id: int
    key: str
    media: dict[str, MediaFile]
    label: str | None = None
    split: str | None = None
    group: str | None = None

    @classmethod
    def of(cls, item: Item) -> ItemRow:
        return cls(item.id, item.key, media_files(item.media), item.label, item.split,
                   item.group)


def media_files(media: dict[str, dict[str, str]] | None) -> dict[str, MediaFile]:
    """An item's stored media (JSON) as files by modality."""
    return {m: MediaFile(ref["blob"], ref["name"], ref.get("source", "file"))
            for m, ref in (media or {}).items()}


def get_job(session: Session, job_id: str, tenant_id: int | None = ANY_TENANT) -> Job:
    # No job has an id longer than the column or with a NUL in it (PostgreSQL refuses to
    # compare with one): such an id is not found, like any other id that names no job.
    if len(job_id) > JOB_ID_LENGTH or "\x00" in job_id:
        raise JobNotFound(job_id)
    job = session.get(Job, job_id)
    if job is None or (tenant_id != ANY_TENANT and job.tenant_id != tenant_id):
        raise JobNotFound(job_id)
    return job


def result_model(job: Job) -> int:
    """The model version a job's results are keyed by (a train job's are its features')."""
    if job.kind in TRAINING_KINDS or job.model_version_id is None:
        return NO_MODEL
    if training_step(job.kind, job.options) and job.stage is not None:
        return NO_MODEL  # adapting its model: features first, then the adapted model's results
    return job.model_version_id


def create_job(session: Session, *, kind: str, archive_blob: str, archive_name: str,
               archive_bytes: int, model_version_id: int | None,
               options: dict[str, Any] | None = None, tenant_id: int | None = None,
               api_key_id: int | None = None, idempotency_key: str | None = None,
               callback_url: str | None = None, state: str = "queued",
               request_fingerprint: str | None = None, priority: str = "normal") -> Job:
    job = Job(kind=kind, state=state, priority=priority, archive_blob=archive_blob,
              archive_name=archive_name,
              archive_bytes=archive_bytes, model_version_id=model_version_id,
              options=options or {}, report={}, tenant_id=tenant_id, api_key_id=api_key_id,
              idempotency_key=idempotency_key, callback_url=callback_url,
              request_fingerprint=request_fingerprint)
    session.add(job)
    session.flush()
    joblog.note(session, job.id, state, kind=kind)
    return job


def find_by_idempotency_key(session: Session, tenant_id: int | None, key: str) -> Job | None:
    return session.scalar(select(Job).where(
        Job.tenant_id.is_(None) if tenant_id is None else Job.tenant_id == tenant_id,
        Job.idempotency_key == key))


def transition(session: Session, job_id: str, expected: Sequence[str], new: str,
               **values: Any) -> bool:
    """Move a job from one of ``expected`` to ``new``; False if it was not in those states.

    Entering a terminal state also queues the job's webhook, in the same transaction (an outbox:
    the callback is sent if and only if the state change committed).
    """
    stmt = (update(Job).where(Job.id == job_id, Job.state.in_(list(expected)))
            .values(state=new, updated_at=utcnow(), **values))
    moved = session.execute(stmt).rowcount == 1
    if moved:
        joblog.note(session, job_id, new, **values)
    if moved and new in TERMINAL_STATES:
        _queue_webhook(session, job_id, f"job.{new}")
    return moved


def _queue_webhook(session: Session, job_id: str, event: str) -> None:
    url = session.scalar(select(Job.callback_url).where(Job.id == job_id))
    if url:
        insert_new(session, WebhookDelivery.__table__,
                   [{"job_id": job_id, "event": event, "url": url, "state": "pending",
                     "attempts": 0, "next_attempt_at": utcnow(), "created_at": utcnow()}],
                   ("job_id", "event"))


def fail_job(session: Session, job_id: str, error: str) -> bool:
    return transition(session, job_id, ACTIVE_STATES, "failed", error=error,
                      finished_at=utcnow(), stage=None)


def cancel_job(session: Session, job_id: str) -> bool:
    """Stop a job: outstanding batches see the state and skip; results written stay."""
    return transition(session, job_id, ACTIVE_STATES, "cancelled", finished_at=utcnow(),
                      stage=None)


def add_items(session: Session, job_id: str, items: Iterable[dict[str, Any]]) -> int:
    """Bulk-insert items (dicts with key, media, label, split); returns how many were new."""
    return len(insert_new_items(session, job_id, items))


def insert_new_items(session: Session, job_id: str, items: Iterable[dict[str, Any]]
                     ) -> dict[str, int]:
    """Bulk-insert items; the key and id of each that was new: a key left out was the job's
    already (a streamed walk learns so that an item came back, without keeping every key)."""
    new: dict[str, int] = {}
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append({"job_id": job_id, **item})
        if len(chunk) >= INSERT_CHUNK:
            new.update(insert_new(session, Item.__table__, chunk, ("job_id", "key"),
                                  ("key", "id")))
            chunk = []
    new.update(insert_new(session, Item.__table__, chunk, ("job_id", "key"), ("key", "id")))
    return new


def drop_items(session: Session, job_id: str) -> None:
    """A job whose archive failed part way through its walk keeps nothing of it: the items it
    streamed, their results and planned batches go, and its counters return to zero."""
    items = select(Item.id).where(Item.job_id == job_id)
    session.execute(delete(Result).where(Result.item_id.in_(items)))
    session.execute(delete(Batch).where(Batch.job_id == job_id))
    session.execute(delete(Item).where(Item.job_id == job_id))
    session.execute(update(Job).where(Job.id == job_id).values(total=0, done=0, failed=0,
                                                               walking=False))


def set_total(session: Session, job_id: str, total: int) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(total=total, walking=False))


def grow(session: Session, job_id: str, count: int) -> bool:
    """A job whose archive is being walked has ``count`` more items: the first ones make it
    ``running`` (and ``walking`` until ``walked``); False when it was stopped (cancelled)."""
    job = get_job(session, job_id)
    if job.state == "ingesting":  # (the job log says "running" when the walk is over: walked)
        values: dict[str, Any] = {"state": "running", "started_at": utcnow(), "walking": True}
    elif job.state == "running" and job.walking:
        values = {}
    else:
        return False
    session.execute(update(Job).where(Job.id == job_id).values(
        total=Job.total + count, updated_at=utcnow(), **values))
    return True


def walked(session: Session, job_id: str, **values: Any) -> bool:
    """The walk of a running job's archive is over: it may finish now."""
    moved = session.execute(update(Job).where(Job.id == job_id, Job.state == "running",
                                              Job.walking.is_(True))
                            .values(walking=False, updated_at=utcnow(), **values)).rowcount == 1
    if moved:
        joblog.note(session, job_id, "running", total=get_job(session, job_id).total)
    return moved


def relabel(session: Session, job_id: str, rows: Mapping[str, Any]) -> None:
    """Set the label, split and group of the job's items by key from ``rows`` (labels.csv's:
    key → an object with ``label``, ``split``, ``group``), read after the items were inserted:
    one UPDATE per row on the (job, key) index, for however many items the job has. Items with
    no row keep theirs."""
    item = Item.__table__
    stmt = (update(item).where(item.c.job_id == job_id, item.c.key == bindparam("item_key"))
            .values(label=bindparam("label"), split=bindparam("split"), group=bindparam("grp")))
    values: list[dict[str, Any]] = []
    for key, row in rows.items():
        values.append({"item_key": key, "label": row.label, "split": row.split,
                       "grp": row.group})
        if len(values) >= INSERT_CHUNK * 10:
            session.execute(stmt, values)
            values = []
    if values:
        session.execute(stmt, values)


def held(session: Session, job_id: str, label_keys: Iterable[str], limit: int
         ) -> dict[str, Any]:
    """What a streamed walk's report says of the job's items, counted here: how many, how
    many labelled, and the first ``limit`` keys of labels.csv (in order) that name no item."""
    items, labelled = session.execute(
        select(func.count(), func.count(Item.label)).where(Item.job_id == job_id)).one()
    keys = sorted(label_keys)
    missing: list[str] = []
    for i in range(0, len(keys), INSERT_CHUNK):
        if len(missing) >= limit:
            break
        part = keys[i:i + INSERT_CHUNK]
        found = set(session.scalars(select(Item.key).where(Item.job_id == job_id,
                                                           Item.key.in_(part))))
        missing += [k for k in part if k not in found]
    return {"items": int(items), "labelled": int(labelled),
            "labels_without_item": missing[:limit]}


def classes(session: Session, job_id: str) -> set[str]:
    """The labels the job's items have."""
    return set(session.scalars(select(Item.label).where(Item.job_id == job_id,
                                                         Item.label.is_not(None)).distinct()))


def _by_key(session: Session, job_id: str, keys: Sequence[str], column: Any) -> dict[str, Any]:
    """``column`` of the job's items by key, for those of ``keys`` it has."""
    found: dict[str, Any] = {}
    for i in range(0, len(keys), INSERT_CHUNK):
        found.update(session.execute(select(Item.key, column).where(
            Item.job_id == job_id, Item.key.in_(list(keys[i:i + INSERT_CHUNK])))).all())
    return found


def unlabel_all(session: Session, job_id: str) -> None:
    session.execute(update(Item).where(Item.job_id == job_id)
                    .values(label=None, split=None, group=None))


def media_by_key(session: Session, job_id: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The media of the job's items by key, for those of ``keys`` it has."""
    return _by_key(session, job_id, keys, Item.media)


def rejoin(session: Session, job_id: str, media: dict[str, dict[str, Any]]) -> list[int]:
    """Items that gained files after they were handed to the workers: their media now, their
    results forgotten (the counters with them) so that they are processed again; their ids."""
    model = result_model(get_job(session, job_id))
    ids = _by_key(session, job_id, list(media), Item.id)
    if not ids:
        return []
    session.execute(update(Item.__table__).where(Item.__table__.c.id == bindparam("item_id"))
                    .values(media=bindparam("media"), deliveries=0),  # new work, not a retry
                    [{"item_id": i, "media": media[k]} for k, i in ids.items()])
    done = failed = 0
    every = sorted(ids.values())
    for i in range(0, len(every), INSERT_CHUNK):
        gone = session.execute(delete(Result).where(
            Result.item_id.in_(every[i:i + INSERT_CHUNK]),
            Result.model_version_id == model).returning(Result.status)).all()
        failed += sum(1 for (status,) in gone if status == "failed")
        done += sum(1 for (status,) in gone if status != "failed")
    if done or failed:
        session.execute(update(Job).where(Job.id == job_id).values(
            done=Job.done - done, failed=Job.failed - failed))
    return every


def current_media(session: Session, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The items' media now, their rows locked until the transaction ends (PostgreSQL): a
    batch read while its job was still being walked writes results only for the files it read."""
    stmt = select(Item.id, Item.media).where(Item.id.in_(list(ids)))
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return dict(session.execute(stmt).all())


def _members(job: Job) -> Any:
    """The select of a job's item ids: its own, or a reprocess job's members."""
    if job.kind == "reprocess":
        return select(JobMember.item_id).where(JobMember.job_id == job.id)
    return select(Item.id).where(Item.job_id == job.id)


def item_ids(session: Session, job_id: str, *, pending_only: bool = False) -> list[int]:
    """A job's item ids in order; ``pending_only``: those it has not written a result for."""
    job = get_job(session, job_id)
    ids = sorted(session.scalars(_members(job)))
    if pending_only:
        done = _written(session, job, _members(job))
        ids = [i for i in ids if i not in done]
    return ids


def pending_among(session: Session, job: Job, ids: Sequence[int]) -> list[int]:
    """Of ``ids``, in their order, the job's items it has not written a result for.

    Costs what the batch costs, not what the job costs: a batch task calls it on every delivery.
    """
    mine = set(belongs(session, job, ids))
    done = _written(session, job, list(mine))
    return [i for i in ids if i in mine and i not in done]


def _written(session: Session, job: Job, among: Any) -> set[int]:
    """Of the item ids ``among`` (a list or a select), those the job has written a result for."""
    written = select(Result.item_id).where(Result.model_version_id == result_model(job),
                                           Result.item_id.in_(among))
    if job.kind == "reprocess":  # an older failed result for the same model is not ours
        written = written.where(Result.job_id == job.id)
    return set(session.scalars(written))


def belongs(session: Session, job: Job, ids: Sequence[int]) -> list[int]:
    """Of ``ids``, those that are the job's items."""
    return list(session.scalars(_members(job).where(
        (JobMember.item_id if job.kind == "reprocess" else Item.id).in_(list(ids)))))


def reset_deliveries(session: Session, ids: Sequence[int]) -> None:
    """Start the poison guard's count afresh (a split batch, a new reprocess job)."""
    session.execute(update(Item).where(Item.id.in_(list(ids))).values(deliveries=0))


def add_delivery(session: Session, ids: Sequence[int]) -> int:
    """Count one more delivery of these items to a worker; returns the highest count this job."""
    session.execute(update(Item).where(Item.id.in_(list(ids)))
                    .values(deliveries=Item.deliveries + 1, attempts=Item.attempts + 1))
    return int(session.scalar(select(func.max(Item.deliveries))
                              .where(Item.id.in_(list(ids)))) or 0)


def batch_items(session: Session, job: Job, ids: Sequence[int]) -> list[ItemRow]:
    """Of ``ids``, the job's items, in id order."""
    rows = session.scalars(select(Item).where(Item.id.in_(belongs(session, job, ids)))
                           .order_by(Item.id))
    return [ItemRow.of(item) for item in rows]


def labelled_items(session: Session, job_id: str) -> list[ItemRow]:
    """A train job's labelled items whose features were extracted (an ok result), in order."""
    rows = session.scalars(
        select(Item)
        .join(Result, (Result.item_id == Item.id) & (Result.model_version_id == NO_MODEL))
        .where(Item.job_id == job_id, Result.status == "ok", Item.label.is_not(None))
        .order_by(Item.id))
    return [ItemRow.of(item) for item in rows]


def extracted_items(session: Session, job_id: str) -> list[ItemRow]:
    """An align job's items whose features were extracted (an ok result), in order."""
    rows = session.scalars(
        select(Item)
        .join(Result, (Result.item_id == Item.id) & (Result.model_version_id == NO_MODEL))
        .where(Item.job_id == job_id, Result.status == "ok")
        .order_by(Item.id))
    return [ItemRow.of(item) for item in rows]


def sample_items(session: Session, job_id: str, limit: int) -> list[ItemRow]:
    """At most ``limit`` of a job's items, evenly spread over it."""
    ids = sorted(session.scalars(_members(get_job(session, job_id))))
    if len(ids) > limit:
        ids = [ids[i] for i in np.linspace(0, len(ids) - 1, limit).astype(int)]
    out: list[ItemRow] = []
    for start in range(0, len(ids), INSERT_CHUNK):
        out += [ItemRow.of(item) for item in session.scalars(
            select(Item).where(Item.id.in_(ids[start:start + INSERT_CHUNK])).order_by(Item.id))]
    return out


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
    info: dict[str, Any] | None = None  # how its media were read (a caption's encoding)


@dataclasses.dataclass(frozen=True)
class BatchCommit:
    new_done: int
    new_failed: int
    completed: bool  # this batch brought done + failed to total


def record_outcomes(session: Session, job_id: str, model_version_id: int,
                    outcomes: Sequence[ItemOutcome], *, replace_failed: bool = False,
                    count: bool = True) -> BatchCommit:
    """Insert results and move the job's counters, in the caller's transaction.

    Only rows that were new count, so a batch delivered twice changes nothing the second time.
    ``replace_failed`` (reprocessing) overwrites an earlier failed result for the same model.
    ``count=False``: results of items already counted (an adapted model's, after extraction
    counted them), the counters stay.
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
        "info": o.info,
        "created_at": utcnow(),
    } for o in outcomes]
    inserted = insert_new(session, Result.__table__, rows, ("item_id", "model_version_id"),
                          ("status",),
                          replace_where=(Result.__table__.c.status == "failed") if replace_failed
                          else None)
    new_failed = sum(1 for (status,) in inserted if status == "failed")
    new_done = len(inserted) - new_failed
    if not count:
        return BatchCommit(0, 0, False)
    if inserted:
        session.execute(update(Job).where(Job.id == job_id).values(
            done=Job.done + new_done, failed=Job.failed + new_failed, updated_at=utcnow()))
    completed = session.execute(
        select(Job.id).where(Job.id == job_id, Job.state == "running", Job.walking.is_(False),
                             Job.done + Job.failed >= Job.total)).first() is not None
    return BatchCommit(new_done, new_failed, completed and bool(inserted))


def finish_job(session: Session, job_id: str) -> bool:
    """The one conditional UPDATE that ends a job whose counters reached its total."""
    stmt = (update(Job)
            .where(Job.id == job_id, Job.state == "running", Job.walking.is_(False),
                   Job.done + Job.failed >= Job.total)
            .values(state="succeeded", finished_at=utcnow(), updated_at=utcnow(), stage=None))
    finished = session.execute(stmt).rowcount == 1
    if finished:
        joblog.note(session, job_id, "succeeded")
        _queue_webhook(session, job_id, "job.succeeded")
    return finished


def move_on(session: Session, job_id: str, then: str | None) -> str | None:
    """A job whose counters reached its total goes on: into its step ``then`` (a train job's
    training, an adapting classify job's), or it finishes. ``then``, ``"finished"``, or None
    when another got there first."""
    if then:
        return then if enter_stage(session, job_id, "extracting", "training") else None
    return "finished" if finish_job(session, job_id) else None


def enter_stage(session: Session, job_id: str, expected: str | None, stage: str) -> bool:
    """Move a running job's stage from ``expected`` to ``stage``; False if another got there."""
    current = Job.stage.is_(None) if expected is None else Job.stage == expected
    stmt = (update(Job).where(Job.id == job_id, Job.state == "running", current)
            .values(stage=stage, updated_at=utcnow()))
    return session.execute(stmt).rowcount == 1


def results_page(session: Session, job: Job, *, after: int, limit: int,
                 failed_only: bool = False) -> list[tuple[Item, Result | None]]:
    """Items of a job with their result (None while pending), ordered by item id."""
    stmt = (select(Item, Result)
            .outerjoin(Result, and_(Result.item_id == Item.id,
                                    Result.model_version_id == result_model(job)))
            .where(Item.id > after).order_by(Item.id).limit(limit))
    if job.kind == "reprocess":
        stmt = stmt.join(JobMember, and_(JobMember.item_id == Item.id, JobMember.job_id == job.id))
    else:
        stmt = stmt.where(Item.job_id == job.id)
    if failed_only:
        stmt = stmt.where(Result.status == "failed")
    return [(item, result) for item, result in session.execute(stmt)]


def results_page_of(session: Session, job: Job, item_ids: Sequence[int]
                    ) -> list[tuple[Item, Result | None]]:
    """The job's items ``item_ids`` with their result (None while pending)."""
    if not item_ids:
        return []
    stmt = (select(Item, Result)
            .outerjoin(Result, and_(Result.item_id == Item.id,
                                    Result.model_version_id == result_model(job)))
            .where(Item.id.in_(list(item_ids)), Item.id.in_(_members(job))))
    return [(item, result) for item, result in session.execute(stmt)]


def list_jobs(session: Session, tenant_id: int | None, *, before: tuple[Any, str] | None,
              limit: int, state: str | None = None, kind: str | None = None,
              created_after: Any = None, created_before: Any = None) -> list[Job]:
    """Newest first; ``before`` is the (created_at, id) of the last job of the previous page."""
    stmt = select(Job).where(Job.tenant_id.is_(None) if tenant_id is None
                             else Job.tenant_id == tenant_id)
    if state:
        stmt = stmt.where(Job.state == state)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if created_after is not None:
        stmt = stmt.where(Job.created_at >= created_after)
    if created_before is not None:
        stmt = stmt.where(Job.created_at < created_before)
    if before is not None:
        at, job_id = before
        stmt = stmt.where((Job.created_at < at) | and_(Job.created_at == at, Job.id < job_id))
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def stale_jobs(session: Session, older_than: Any) -> list[Job]:
    """Active jobs that have not moved since ``older_than``: their messages may be lost."""
    return list(session.scalars(select(Job).where(Job.state.in_(ACTIVE_STATES),
                                                  Job.updated_at < older_than)))


def lock_job(session: Session, job_id: str) -> Job:
    """The job, locked for the rest of the transaction (PostgreSQL: FOR UPDATE; SQLite's
    writer lock is already held: BEGIN IMMEDIATE)."""
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
    if job is None:
        raise JobNotFound(job_id)
    return job


def note_training(session: Session, job_id: str, progress: dict[str, Any]) -> bool:
    """Write a training's progress on its job (``report["training"]``; it also moves
    ``updated_at``, so the sweeper sees it alive); False when the job has left its training
    stage (cancelled, failed)."""
    job = lock_job(session, job_id)
    if job.state != "running" or job.stage != "training":
        return False
    job.report = {**(job.report or {}), "training": progress}
    job.updated_at = utcnow()
    return True


def touch(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
