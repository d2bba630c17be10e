"""What people and models say an item's label is: the append-only label events (a correction, or
an accepted prediction), the label issues a training found in its own archive, and the
predictions of a job still waiting for a person to look at them.

An item's current label is its latest event's new label, else the label its archive gave
(labels.csv). Events are never updated or deleted: two reviewers correcting one item both leave
an event, and the later one is the label.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.jobs import ANY_TENANT, result_model
from store.schema import MAX_ID, Item, Job, LabelEvent, LabelIssue, Result


class ItemNotFound(LookupError):
    """No such item, or another tenant's (the same answer for both)."""


@dataclass(frozen=True)
class IssueRow:
    """One label issue with its item's key and job."""

    rank: int
    item_id: int
    key: str
    job_id: str
    given_label: str
    suggested_label: str
    quality: float


@dataclass(frozen=True)
class Unreviewed:
    """A job's prediction for an item that no person has labelled yet."""

    item_id: int
    key: str
    label: str | None
    confidence: float | None
    top_k: list[dict[str, object]]
    embedding: bytes | None


def unreviewed(session: Session, job: Job, with_embeddings: bool = False) -> list[Unreviewed]:
    """The job's ok predictions for items without a label event, in item order."""
    columns = [Item.id, Item.key, Result.label, Result.confidence, Result.top_k]
    if with_embeddings:
        columns.append(Result.embedding)
    rows = session.execute(
        select(*columns).join(Result, Result.item_id == Item.id)
        .where(Result.job_id == job.id, Result.model_version_id == result_model(job),
               Result.status == "ok",
               ~Item.id.in_(select(LabelEvent.item_id).distinct()))
        .order_by(Item.id))
    return [Unreviewed(r[0], r[1], r[2], r[3], list(r[4] or []),
                       r[5] if with_embeddings else None) for r in rows]


def get_item(session: Session, item_id: int, tenant_id: int | None = ANY_TENANT
             ) -> tuple[Item, Job]:
    """The item and the job that ingested it, in ``tenant_id``'s jobs."""
    row = (session.execute(select(Item, Job).join(Job, Job.id == Item.job_id)
                           .where(Item.id == item_id)).first()
           if 0 < item_id <= MAX_ID else None)
    if row is None or (tenant_id != ANY_TENANT and row[1].tenant_id != tenant_id):
        raise ItemNotFound(item_id)
    return row[0], row[1]


def current_labels(session: Session, item_ids: list[int]) -> dict[int, str | None]:
    """Each item's current label: its latest event's, else its given one."""
    if not item_ids:
        return {}
    labels: dict[int, str | None] = {
        item_id: label for item_id, label
        in session.execute(select(Item.id, Item.label).where(Item.id.in_(item_ids)))}
    latest = (select(LabelEvent.item_id, func.max(LabelEvent.id).label("last"))
              .where(LabelEvent.item_id.in_(item_ids)).group_by(LabelEvent.item_id).subquery())
    labels.update((item_id, label) for item_id, label in session.execute(
        select(LabelEvent.item_id, LabelEvent.new_label)
        .join(latest, LabelEvent.id == latest.c.last)))
    return labels


def record_label(session: Session, item: Item, label: str, *, api_key_id: int | None,
                 model_version_id: int | None, verified: bool = True) -> LabelEvent:
    """Append an event that sets ``item``'s label to ``label``. The item's row is locked first,
    so that two people correcting one item at once are recorded one after the other, each
    event's old label the one before it (PostgreSQL; SQLite's transactions already take the
    writer lock when they begin)."""
    session.execute(select(Item.id).where(Item.id == item.id).with_for_update())
    event = LabelEvent(item_id=item.id, api_key_id=api_key_id,
                       old_label=current_labels(session, [item.id])[item.id],
                       new_label=label, model_version_id=model_version_id, verified=verified)
    session.add(event)
    session.flush()
    return event


def labelled_copies(session: Session, job_ids: list[str], holdout: str | None = None
                    ) -> tuple[list[dict[str, object]], int]:
    """Items of ``job_ids`` that have a label now (given, or set by an event), as new items of a
    train job: the same media, the current label, the group; keyed ``<job id>/<key>`` so that
    two jobs' keys never collide. With ``holdout="verified"`` the items a person labelled are
    the validation split and the others the training split; otherwise each keeps its split.
    Returns the rows and how many of them were verified."""
    rows = list(session.execute(select(Item).where(Item.job_id.in_(job_ids))
                                .order_by(Item.job_id, Item.id)).scalars())
    current = {}
    for start in range(0, len(rows), 1000):
        current.update(current_labels(session, [i.id for i in rows[start:start + 1000]]))
    verified = set(session.scalars(
        select(LabelEvent.item_id).distinct().join(Item, Item.id == LabelEvent.item_id)
        .where(LabelEvent.verified.is_(True), Item.job_id.in_(job_ids))))
    copies: list[dict[str, object]] = []
    for item in rows:
        label = current.get(item.id)
        if label is None:
            continue
        split = (("val" if item.id in verified else "train") if holdout == "verified"
                 else item.split)
        copies.append({"key": f"{item.job_id}/{item.key}", "media": item.media, "label": label,
                       "split": split, "group": item.group})
    return copies, sum(1 for item in rows if item.id in verified and current.get(item.id))


def label_history(session: Session, item_id: int) -> list[LabelEvent]:
    """An item's label events, oldest first."""
    return list(session.scalars(select(LabelEvent).where(LabelEvent.item_id == item_id)
                                .order_by(LabelEvent.id)))


def store_label_issues(session: Session, model_version_id: int,
                       issues: list[tuple[int, str, str, float]]) -> None:
    """Keep a model version's label issues, worst first: (item id, given, suggested, quality)."""
    session.add_all(LabelIssue(model_version_id=model_version_id, rank=rank, item_id=item_id,
                               given_label=given, suggested_label=suggested, quality=quality)
                    for rank, (item_id, given, suggested, quality) in enumerate(issues))


def label_issue_page(session: Session, model_version_id: int, after_rank: int, limit: int
                     ) -> list[IssueRow]:
    """Up to ``limit`` label issues ranked after ``after_rank`` (-1: from the worst)."""
    rows = session.execute(
        select(LabelIssue, Item.key, Item.job_id).join(Item, Item.id == LabelIssue.item_id)
        .where(LabelIssue.model_version_id == model_version_id, LabelIssue.rank > after_rank)
        .order_by(LabelIssue.rank).limit(limit))
    return [IssueRow(i.rank, i.item_id, key, job_id, i.given_label, i.suggested_label,
                     i.quality) for i, key, job_id in rows]
