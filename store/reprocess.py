"""Planning a reprocess: which items are due, and the reprocess job that gives them a result from
the current default model.

An item is due when it has no ok result from the tenant's default model version: its result is
missing, failed (retried while the item has had fewer than ``max_attempts`` tries), or made by an
older version. Due items become the members of one ``reprocess`` job per tenant, which the API
shows like any other job. At most one runs per tenant at a time: a lease guards the choice (and
expires if the process holding it dies), and an active reprocess job blocks the next. Database
work only, in two steps: :func:`start_reprocess` creates the job (a request can, and answer with
it), :func:`plan_members` fills it (the reprocess task, which then sends its batches).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from mmbatch.contract import ACTIVE_STATES
from store import jobs, leases
from store.db import Database
from store.registry import default_model, get_model
from store.schema import Item, Job, JobMember, ModelVersion, Result
from store.search import SEARCHED_KINDS
from store.upsert import insert_new

log = logging.getLogger(__name__)

LEASE_SECONDS = 300
CHUNK = 500


@dataclass(frozen=True)
class Plan:
    """What planning did for one tenant: the job it started (or the active one), and why."""

    job_id: str | None
    tenant_id: int | None
    items: int
    reason: str

    @property
    def started(self) -> bool:
        return self.reason == "started"


def tenants_with_models(session: Session, kind: str = "classifier") -> list[int | None]:
    """Every tenant that has a default model of ``kind`` (the nightly run reprocesses each)."""
    return sorted(set(session.scalars(select(ModelVersion.tenant_id)
                                      .where(ModelVersion.is_default.is_(True),
                                             ModelVersion.kind == kind))),
                  key=lambda t: -1 if t is None else t)


def start_reprocess(db: Database, tenant_id: int | None, model_id: int | None = None, *,
                    limit: int, max_attempts: int, kind: str = "classifier") -> Plan:
    """Create the tenant's reprocess job (queued; its members are planned next, by
    :func:`plan_members`) when anything is due: a cheap check, fit for a request. ``kind``:
    which of the tenant's default models (when ``model_id`` names none); a classifier's due
    items are those of classify jobs, an aligner's every searchable item not yet embedded
    with it. One reprocess job per tenant and model kind runs at a time."""
    owner = uuid.uuid4().hex
    lease = f"reprocess:{tenant_id}" + ("" if kind == "classifier" else f":{kind}")
    with db.session() as s:
        if not leases.acquire(s, lease, owner, LEASE_SECONDS):
            return Plan(None, tenant_id, 0, "another reprocess is being planned")
    try:
        with db.session() as s:
            model = (get_model(s, model_id, tenant_id) if model_id is not None
                     else default_model(s, tenant_id, kind))
            if model is None:
                return Plan(None, tenant_id, 0, "no default model")
            active = s.scalar(select(Job.id).join(ModelVersion,
                                                  ModelVersion.id == Job.model_version_id)
                              .where(Job.kind == "reprocess", Job.state.in_(ACTIVE_STATES),
                                     _tenant(Job.tenant_id, tenant_id),
                                     ModelVersion.kind == model.kind))
            if active:
                return Plan(active, tenant_id, 0, "a reprocess job is already running")
            if not _due(s, tenant_id, model.id, max_attempts, 1, _kinds(model.kind)):
                return Plan(None, tenant_id, 0, "nothing to reprocess")
            job = jobs.create_job(s, kind="reprocess", archive_blob="", archive_name="",
                                  archive_bytes=0, model_version_id=model.id, priority="bulk",
                                  tenant_id=tenant_id, options={"reason": "reprocess",
                                                                "limit": limit})
            return Plan(job.id, tenant_id, 0, "started")
    finally:
        with db.session() as s:
            leases.release(s, lease, owner)


def plan_members(db: Database, job_id: str, max_attempts: int) -> int:
    """Make a queued reprocess job's due items its members and start it (state running);
    how many. A job with nothing due any more (another job got there first) succeeds empty."""
    with db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "queued":
            return job.total  # planned already: a redelivered message
        assert job.model_version_id is not None
        model = s.get(ModelVersion, job.model_version_id)
        due = _due(s, job.tenant_id, job.model_version_id, max_attempts,
                   int((job.options or {}).get("limit") or 1),
                   _kinds(model.kind if model is not None else "classifier"))
        for start in range(0, len(due), CHUNK):
            chunk = due[start:start + CHUNK]
            insert_new(s, JobMember.__table__, [{"job_id": job.id, "item_id": i} for i in chunk],
                       ("job_id", "item_id"))
            # a new job: earlier deliveries are not redeliveries of this one's batches
            # (``attempts``, every try, keeps counting towards max_attempts)
            jobs.reset_deliveries(s, chunk)
        jobs.transition(s, job_id, ("queued",), "running", total=len(due),
                        started_at=jobs.utcnow())
        if not due:
            jobs.finish_job(s, job_id)
        log.info("reprocess_planned job=%s tenant=%s model=%s total=%d", job.id, job.tenant_id,
                 job.model_version_id, len(due))
        return len(due)


def _tenant(column, tenant_id: int | None):  # type: ignore[no-untyped-def]
    return column.is_(None) if tenant_id is None else column == tenant_id


def _kinds(model_kind: str) -> tuple[str, ...]:
    """The job kinds whose items a model of ``model_kind`` reprocesses."""
    return SEARCHED_KINDS if model_kind == "aligner" else ("classify",)


def _due(s: Session, tenant_id: int | None, model_id: int, max_attempts: int,
         limit: int, kinds: tuple[str, ...]) -> list[int]:
    ok = exists().where(Result.item_id == Item.id, Result.model_version_id == model_id,
                        Result.status == "ok")
    failed_out = exists().where(Result.item_id == Item.id, Result.model_version_id == model_id,
                                Result.status == "failed", Item.attempts >= max_attempts)
    stmt = (select(Item.id).join(Job, Job.id == Item.job_id)
            .where(_tenant(Job.tenant_id, tenant_id), Job.kind.in_(kinds),
                   Job.state.in_(("succeeded", "failed")), ~ok, ~failed_out)
            .order_by(Item.id).limit(limit))
    return list(s.scalars(stmt))
