"""Reprocessing: give every classified item a result from the current default model.

An item is due when it has no ok result from the tenant's default model version: its result is
missing, failed (retried while the item has had fewer than ``reprocess_max_attempts`` tries), or
made by an older version. Due items become the members of one ``reprocess`` job per tenant, which
the API shows like any other job. At most one runs per tenant at a time: a lease guards the
choice (and expires if the worker holding it dies), and an active reprocess job blocks the next.
Cached encoder features are reused, so a new classifier head does not run the encoders again.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import exists, select

from store import jobs, leases
from store.registry import default_model, get_model
from store.schema import ACTIVE_STATES, Item, Job, JobMember, ModelVersion, Result
from store.upsert import insert_new
from worker.runtime import Runtime

log = logging.getLogger(__name__)

LEASE_SECONDS = 300


@dataclass(frozen=True)
class Started:
    job_id: str | None
    tenant_id: int | None
    items: int
    reason: str


def tenants_with_models(rt: Runtime) -> list[int | None]:
    with rt.db.session() as s:
        return sorted(set(s.scalars(select(ModelVersion.tenant_id)
                                    .where(ModelVersion.is_default.is_(True)))),
                      key=lambda t: -1 if t is None else t)


def start(rt: Runtime, tenant_id: int | None, model_id: int | None = None,
          limit: int | None = None) -> Started:
    """Create the tenant's reprocess job (state running) if anything is due; batches follow."""
    owner = uuid.uuid4().hex
    lease = f"reprocess:{tenant_id}"
    limit = limit or rt.settings.reprocess_limit
    with rt.db.session() as s:
        if not leases.acquire(s, lease, owner, LEASE_SECONDS):
            return Started(None, tenant_id, 0, "another reprocess is being planned")
    try:
        with rt.db.session() as s:
            active = s.scalar(select(Job.id).where(Job.kind == "reprocess",
                                                   Job.state.in_(ACTIVE_STATES),
                                                   _tenant(Job.tenant_id, tenant_id)))
            if active:
                return Started(active, tenant_id, 0, "a reprocess job is already running")
            model = (get_model(s, model_id, tenant_id) if model_id is not None
                     else default_model(s, tenant_id))
            if model is None:
                return Started(None, tenant_id, 0, "no default model")
            due = _due(s, tenant_id, model.id, rt.settings.reprocess_max_attempts, limit)
            if not due:
                return Started(None, tenant_id, 0, "nothing to reprocess")
            job = jobs.create_job(s, kind="reprocess", archive_blob="", archive_name="",
                                  archive_bytes=0, model_version_id=model.id,
                                  tenant_id=tenant_id, state="running",
                                  options={"reason": "reprocess"})
            job.total, job.started_at = len(due), jobs.utcnow()
            s.flush()
            for start_at in range(0, len(due), 500):
                insert_new(s, JobMember.__table__,
                           [{"job_id": job.id, "item_id": i} for i in due[start_at:start_at + 500]],
                           ("job_id", "item_id"))
            # a new job: earlier deliveries are not redeliveries of this one's batches
            # (``attempts``, every try, keeps counting towards reprocess_max_attempts)
            for start_at in range(0, len(due), 500):
                jobs.reset_deliveries(s, due[start_at:start_at + 500])
            log.info("reprocess_planned job=%s tenant=%s model=%s total=%d",
                     job.id, tenant_id, model.id, len(due))
            return Started(job.id, tenant_id, len(due), "started")
    finally:
        with rt.db.session() as s:
            leases.release(s, lease, owner)


def _tenant(column, tenant_id: int | None):  # type: ignore[no-untyped-def]
    return column.is_(None) if tenant_id is None else column == tenant_id


def _due(s, tenant_id: int | None, model_id: int, max_attempts: int,  # type: ignore[no-untyped-def]
         limit: int) -> list[int]:
    ok = exists().where(Result.item_id == Item.id, Result.model_version_id == model_id,
                        Result.status == "ok")
    failed_out = exists().where(Result.item_id == Item.id, Result.model_version_id == model_id,
                                Result.status == "failed", Item.attempts >= max_attempts)
    stmt = (select(Item.id).join(Job, Job.id == Item.job_id)
            .where(_tenant(Job.tenant_id, tenant_id), Job.kind == "classify",
                   Job.state.in_(("succeeded", "failed")), ~ok, ~failed_out)
            .order_by(Item.id).limit(limit))
    return list(s.scalars(stmt))
