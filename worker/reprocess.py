"""Start reprocessing: plan each tenant's reprocess job (``store.reprocess``) and send its
batches. The nightly task, ``POST /api/v1/reprocess`` (through the task) and
``mmbatch reprocess --now`` all come here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mmbatch.contract import TASK_PROCESS_BATCH
from store import jobs
from store.reprocess import Plan, plan_reprocess, tenants_with_models
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def start_reprocess(rt: Runtime, send_task: Callable[..., Any], tenants: list[int | None] | None,
                    model_id: int | None = None, limit: int | None = None) -> list[Plan]:
    """Plan a reprocess job for each of ``tenants`` (None: every tenant with a default model)
    and send the batches of those that started; what planning did, per tenant."""
    settings = rt.settings
    if tenants is None:
        with rt.db.session() as s:
            tenants = tenants_with_models(s)
    plans = []
    for tenant in tenants:
        plan = plan_reprocess(rt.db, tenant, model_id, limit=limit or settings.reprocess_limit,
                              max_attempts=settings.reprocess_max_attempts)
        log.info("reprocess tenant=%s job=%s items=%d reason=%s", tenant, plan.job_id,
                 plan.items, plan.reason)
        if plan.started and plan.job_id:
            with rt.db.session() as s:
                ids = jobs.item_ids(s, plan.job_id)
            for i in range(0, len(ids), settings.batch_size):
                send_task(TASK_PROCESS_BATCH, args=[plan.job_id, ids[i:i + settings.batch_size]])
        plans.append(plan)
    return plans
