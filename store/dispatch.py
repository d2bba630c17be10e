"""Every job's batches, planned in the database (the queue of record), and which ones go to the
broker next (``worker.dispatch`` sends them).

A job's items are planned as batches when it is ingested; the broker holds at most a window of
them (MMBATCH_DISPATCH_WINDOW, all jobs together), topped up as batches finish. The next batch
belongs to the job with the highest priority; among equals, to the tenant whose last batch went
out longest ago, and within that tenant to its job whose last batch went out longest ago: a
20-item job waits for at most a window of another tenant's flood, never for all of it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, exists, func, insert, select, text, update
from sqlalchemy.orm import Session

from mmbatch.contract import PRIORITIES, TERMINAL_STATES
from store.schema import Batch, Job, utcnow

LOCK_KEY = 0x6D6D6264  # the dispatcher's advisory lock on PostgreSQL ("mmbd")
NEVER = float("-inf")  # a job (or tenant) that has had no batch sent yet goes first


@dataclass(frozen=True)
class Claimed:
    batch_id: int
    job_id: str
    item_ids: list[int]


def plan(session: Session, job_id: str, item_ids: Sequence[int], size: int) -> int:
    """Plan ``item_ids`` as batches of ``size``, in order; how many."""
    rows = [{"job_id": job_id, "item_ids": list(item_ids[i:i + size]), "state": "planned"}
            for i in range(0, len(item_ids), size)]
    if rows:
        session.execute(insert(Batch), rows)
    return len(rows)


def plan_parts(session: Session, job_id: str, parts: Sequence[Sequence[int]]) -> None:
    """Plan batches as given (a batch split in halves)."""
    if parts:
        session.execute(insert(Batch), [{"job_id": job_id, "item_ids": list(p),
                                         "state": "planned"} for p in parts if p])


def replan(session: Session, job_id: str, item_ids: Sequence[int], size: int) -> int:
    """The job's unfinished batches were lost (the sweeper found it stale): forget them and plan
    ``item_ids`` afresh. A batch a slow worker still holds may run twice; a result counts once."""
    session.execute(delete(Batch).where(Batch.job_id == job_id, Batch.state != "done"))
    return plan(session, job_id, item_ids, size)


def planned(session: Session, job_id: str) -> bool:
    """Whether the job has batches not yet done."""
    return bool(session.scalar(select(exists().where(Batch.job_id == job_id,
                                                     Batch.state != "done"))))


def requeue_lost(session: Session, job_ids: Sequence[str]) -> int:
    """The sent batches of jobs that stopped moving (the sweeper's stale jobs) were lost (a
    broker flush, a worker killed with its message): planned again; how many. A job that
    moves has its batches in hand, however long they take, so none is sent twice for it."""
    if not job_ids:
        return 0
    return int(session.execute(update(Batch).where(Batch.state == "sent",
                                                   Batch.job_id.in_(list(job_ids)))
                               .values(state="planned")).rowcount or 0)


def forget_finished(session: Session) -> int:
    """Drop the batches of jobs that ended (succeeded, failed, cancelled): the queue keeps only
    what may still run. How many."""
    ended = select(Job.id).where(Job.state.in_(TERMINAL_STATES))
    return int(session.execute(delete(Batch).where(Batch.job_id.in_(ended))).rowcount or 0)


def unclaim(session: Session, batch_ids: Sequence[int]) -> None:
    """Batches claimed but never sent (the broker refused them): waiting again."""
    if batch_ids:
        session.execute(update(Batch).where(Batch.id.in_(list(batch_ids)),
                                            Batch.state == "sent").values(state="planned"))


def finish(session: Session, batch_id: int) -> None:
    session.execute(update(Batch).where(Batch.id == batch_id).values(state="done"))


def in_flight(session: Session) -> int:
    """Batches in the broker or a worker's hands, of jobs still running."""
    return int(session.scalar(select(func.count()).select_from(Batch)
                              .join(Job, Job.id == Batch.job_id)
                              .where(Batch.state == "sent", Job.state == "running")) or 0)


def claim(session: Session, window: int) -> list[Claimed]:
    """Mark as sent, and return in order, the batches that fill the window: up to ``window``
    minus those in flight, chosen by priority, then tenant, then job, in turn."""
    if session.get_bind().dialect.name == "postgresql":
        # one claimer at a time (SQLite's BEGIN IMMEDIATE does the same): the window is not
        # overshot by workers finishing at once, and no two claimers lock rows crosswise
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    free = window - in_flight(session)
    if free <= 0:
        return []
    waiting = session.execute(
        select(Job.id, Job.tenant_id, Job.priority, Job.created_at)
        .where(Job.state == "running",
               exists().where(Batch.job_id == Job.id, Batch.state == "planned"))).all()
    if not waiting:
        return []
    last_sent = dict(session.execute(
        select(Batch.job_id, func.max(Batch.sent_at))
        .where(Batch.job_id.in_([j.id for j in waiting]), Batch.sent_at.is_not(None))
        .group_by(Batch.job_id)).all())
    job_last = {j.id: _seconds(last_sent.get(j.id)) for j in waiting}
    tenant_last: dict[int | None, float] = {}
    for j in waiting:
        tenant_last[j.tenant_id] = max(tenant_last.get(j.tenant_id, NEVER), job_last[j.id])
    rank = {p: i for i, p in enumerate(PRIORITIES)}
    jobs = {j.id: j for j in waiting}
    after = {j.id: 0 for j in waiting}  # the last batch id taken of each job in this round
    now = utcnow()
    tick = _seconds(now)
    out: list[Claimed] = []
    while jobs and len(out) < free:
        j = min(jobs.values(), key=lambda j: (rank.get(j.priority, len(PRIORITIES)),
                                              tenant_last[j.tenant_id], job_last[j.id],
                                              _seconds(j.created_at), j.id))
        batch = session.execute(
            select(Batch.id, Batch.item_ids)
            .where(Batch.job_id == j.id, Batch.state == "planned", Batch.id > after[j.id])
            .order_by(Batch.id).limit(1)).first()
        if batch is None:
            del jobs[j.id]
            continue
        after[j.id] = batch.id
        taken = session.execute(update(Batch).where(Batch.id == batch.id,
                                                    Batch.state == "planned")
                                .values(state="sent", sent_at=now)).rowcount
        if taken:  # (another dispatcher may have sent it a moment ago)
            out.append(Claimed(batch.id, j.id, list(batch.item_ids)))
        tick += 1e-3
        job_last[j.id] = tenant_last[j.tenant_id] = tick
    return out


def _seconds(when: dt.datetime | None) -> float:
    """A time as seconds, comparable whether the database kept its zone (PostgreSQL) or not
    (SQLite, which stores UTC)."""
    if when is None:
        return NEVER
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()
