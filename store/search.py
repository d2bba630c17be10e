"""Search's queries: the (tenant, aligner) vector indexes and their segments, which index
answers a tenant's searches, the items an index build reads, the item ids a search's filters
keep, and the rows a page of hits shows.

Vectors themselves live in blob storage (``worker.vector_index``); these rows say which blobs
make an index now. An index row's ``base_blob`` and its segments' ``merged`` flags change in one
transaction, so a reader that lists the unmerged segments first and reads the base second never
misses a vector (it may see one twice, and de-duplicates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from store.schema import (
    IndexSegment,
    Item,
    Job,
    LabelEvent,
    ModelVersion,
    Result,
    SearchIndex,
    utcnow,
)
from store.upsert import insert_new

CHUNK = 1000
# Job kinds whose items a tenant searches: everything it uploaded (reprocess jobs own no items).
SEARCHED_KINDS = ("embed", "classify", "train", "align")


@dataclass(frozen=True)
class IndexState:
    """What a reader needs to load an index: its base and the segments not yet merged in."""

    id: int
    model_version_id: int
    tenant_id: int | None
    state: str
    active: bool
    base_blob: str | None
    segments: tuple[tuple[int, str], ...]  # (segment id, blob), oldest first


def _tenant(column: Any, tenant_id: int | None) -> Any:
    return column.is_(None) if tenant_id is None else column == tenant_id


def index_of(s: Session, model_id: int) -> SearchIndex | None:
    return s.scalar(select(SearchIndex).where(SearchIndex.model_version_id == model_id))


def ensure_index(s: Session, model_id: int, tenant_id: int | None) -> int:
    """The id of the aligner's index, created (building, empty) if it has none."""
    insert_new(s, SearchIndex.__table__,
               [{"tenant_id": tenant_id, "model_version_id": model_id, "state": "building",
                 "active": False, "base_rows": 0, "created_at": utcnow(),
                 "updated_at": utcnow()}], ("model_version_id",))
    found = index_of(s, model_id)
    assert found is not None
    return found.id


def add_segment(s: Session, index_id: int, blob: str, rows: int) -> bool:
    """Append a segment (a blob of aligned vectors); False when it was there already (a batch
    delivered twice writes the same bytes, hence the same blob)."""
    return bool(insert_new(s, IndexSegment.__table__,
                           [{"index_id": index_id, "blob": blob, "rows": rows, "merged": False,
                             "created_at": utcnow()}], ("index_id", "blob"), ("id",)))


def unmerged(s: Session, index_id: int) -> list[tuple[int, str]]:
    return [(i, b) for i, b in s.execute(
        select(IndexSegment.id, IndexSegment.blob)
        .where(IndexSegment.index_id == index_id, IndexSegment.merged.is_(False))
        .order_by(IndexSegment.id))]


def index_state(s: Session, index_id: int) -> IndexState | None:
    """The index as a reader loads it: segments listed first, then the base (see above)."""
    segments = unmerged(s, index_id)
    row = s.get(SearchIndex, index_id)
    if row is None:
        return None
    s.refresh(row)
    return IndexState(row.id, row.model_version_id, row.tenant_id, row.state, row.active,
                      row.base_blob, tuple(segments))


def index_width(s: Session, index_id: int) -> int:
    """The width of the index's vectors: its aligner's output size."""
    config = s.scalar(select(ModelVersion.config).join(
        SearchIndex, SearchIndex.model_version_id == ModelVersion.id)
        .where(SearchIndex.id == index_id)) or {}
    return int(config.get("dim") or 0)


def indexes_with_segments(s: Session) -> list[int]:
    return sorted(set(s.scalars(select(IndexSegment.index_id)
                                .where(IndexSegment.merged.is_(False)))))


def record_base(s: Session, index_id: int, base_blob: str, rows: int,
                merged_segments: Sequence[int], ready: bool = False) -> None:
    """Install a new base and mark the segments it took in as merged, in one transaction."""
    values: dict[str, Any] = {"base_blob": base_blob, "base_rows": rows, "updated_at": utcnow()}
    if ready:
        values.update(state="ready", ready_at=utcnow(), error=None)
    s.execute(update(SearchIndex).where(SearchIndex.id == index_id).values(**values))
    for start in range(0, len(merged_segments), CHUNK):
        s.execute(update(IndexSegment)
                  .where(IndexSegment.id.in_(list(merged_segments[start:start + CHUNK])))
                  .values(merged=True))


def fail_index(s: Session, index_id: int, error: str) -> None:
    s.execute(update(SearchIndex).where(SearchIndex.id == index_id, SearchIndex.state != "ready")
              .values(state="failed", error=error[:2000], updated_at=utcnow()))


def activate(s: Session, index_id: int) -> bool:
    """Make a ready index the one that answers its tenant's searches (the switch: one
    transaction, so a search sees the old index or the new one, never none or both)."""
    row = s.get(SearchIndex, index_id)
    if row is None or row.state != "ready":
        return False
    s.execute(update(SearchIndex).where(_tenant(SearchIndex.tenant_id, row.tenant_id),
                                        SearchIndex.id != index_id)
              .values(active=False))
    row.active = True
    return True


def activate_default(s: Session, model_id: int) -> bool:
    """Switch to the aligner's index if it is ready and the aligner is its tenant's default."""
    model = s.get(ModelVersion, model_id)
    index = index_of(s, model_id)
    if model is None or index is None or not model.is_default or model.kind != "aligner":
        return False
    return activate(s, index.id)


def serving_index(s: Session, tenant_id: int | None) -> SearchIndex | None:
    """The index that answers the tenant's searches that name no model."""
    return s.scalar(select(SearchIndex).where(_tenant(SearchIndex.tenant_id, tenant_id),
                                              SearchIndex.active.is_(True)))


def active_indexes(s: Session) -> list[int]:
    return list(s.scalars(select(SearchIndex.id).where(SearchIndex.active.is_(True))))


# --- what an index holds --------------------------------------------------------------------

@dataclass(frozen=True)
class MediaRow:
    item_id: int
    job_id: str
    media: dict[str, Any]


def tenant_items(s: Session, tenant_id: int | None, after: int, limit: int) -> list[MediaRow]:
    """A page of the tenant's searchable items (id order, after ``after``)."""
    rows = s.execute(select(Item.id, Item.job_id, Item.media).join(Job, Job.id == Item.job_id)
                     .where(_tenant(Job.tenant_id, tenant_id), Job.kind.in_(SEARCHED_KINDS),
                            Item.id > after)
                     .order_by(Item.id).limit(limit))
    return [MediaRow(i, j, dict(m or {})) for i, j, m in rows]


def write_results(s: Session, model_id: int, rows: Sequence[tuple[int, str, bytes]]) -> int:
    """Ok results of an aligner for items an index build embedded (item, job, embedding); the
    jobs' counters do not move (the items were theirs already). Returns how many were new."""
    payload = [{"item_id": item, "job_id": job, "model_version_id": model_id, "status": "ok",
                "embedding": vector, "created_at": utcnow()} for item, job, vector in rows]
    written = 0
    for start in range(0, len(payload), CHUNK):
        written += len(insert_new(s, Result.__table__, payload[start:start + CHUNK],
                                  ("item_id", "model_version_id"), ("id",)))
    return written


def embedding_of(s: Session, item_id: int, model_id: int) -> bytes | None:
    return s.scalar(select(Result.embedding).where(Result.item_id == item_id,
                                                   Result.model_version_id == model_id,
                                                   Result.status == "ok"))


# --- filters and pages of hits --------------------------------------------------------------

def _corrected_label() -> Any:
    """The item's latest label event's label (a person's correction), as a scalar subquery."""
    return (select(LabelEvent.new_label).where(LabelEvent.item_id == Item.id)
            .order_by(LabelEvent.id.desc()).limit(1).correlate(Item).scalar_subquery())


def _current_label() -> Any:
    """The item's current label: corrected, else given, else predicted (store.labels says the
    same of the first two)."""
    return func.coalesce(_corrected_label(), Item.label, _predicted_label())


def _predicted_label() -> Any:
    """The item's newest predicted label (a classifier's ok result), as a scalar subquery."""
    return (select(Result.label).where(Result.item_id == Item.id, Result.status == "ok",
                                       Result.label.is_not(None))
            .order_by(Result.id.desc()).limit(1).correlate(Item).scalar_subquery())


def filtered_item_ids(s: Session, tenant_id: int | None, job_ids: Sequence[str] | None,
                      labels: Sequence[str] | None) -> np.ndarray:
    """The tenant's item ids that the filters keep (sorted int64): items of ``job_ids``, and
    whose current label (given, else predicted) is one of ``labels``."""
    stmt = (select(Item.id).join(Job, Job.id == Item.job_id)
            .where(_tenant(Job.tenant_id, tenant_id), Job.kind.in_(SEARCHED_KINDS)))
    if job_ids is not None:
        stmt = stmt.where(Item.job_id.in_(list(job_ids)))
    if labels is not None:
        wanted = list(labels)
        stmt = stmt.where(_current_label().in_(wanted))
    return np.fromiter(s.scalars(stmt.order_by(Item.id)), dtype=np.int64)


def owned_jobs(s: Session, tenant_id: int | None, job_ids: Sequence[str]) -> set[str]:
    return set(s.scalars(select(Job.id).where(Job.id.in_(list(job_ids)),
                                              _tenant(Job.tenant_id, tenant_id))))


def hit_rows(s: Session, tenant_id: int | None, item_ids: Sequence[int]
             ) -> dict[int, tuple[Item, str | None]]:
    """The tenant's items among ``item_ids`` with their current label."""
    rows = s.execute(select(Item, _current_label())
                     .join(Job, Job.id == Item.job_id)
                     .where(Item.id.in_(list(item_ids)), _tenant(Job.tenant_id, tenant_id)))
    return {item.id: (item, label) for item, label in rows}


def item_of(s: Session, tenant_id: int | None, item_id: int) -> tuple[Item, str | None] | None:
    return hit_rows(s, tenant_id, [item_id]).get(item_id)


def has_aligner(s: Session, tenant_id: int | None) -> bool:
    return bool(s.scalar(select(exists().where(ModelVersion.kind == "aligner",
                                               _tenant(ModelVersion.tenant_id, tenant_id)))))
