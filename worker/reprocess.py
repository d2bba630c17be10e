"""Reprocessing in the worker: plan a reprocess job's members (``store.reprocess``) and send its
batches; the nightly run (and ``mmbatch reprocess --now``) first starts a job for every tenant
with a default model. ``POST /api/v1/reprocess`` starts its job in the request and sends the job's
id here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mmbatch.contract import MODEL_KINDS
from store import dispatch as plans
from store import jobs
from store.registry import get_model
from store.reprocess import Plan, plan_members, start_reprocess, tenants_with_models
from worker.dispatch import dispatch
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def reprocess_tenants(rt: Runtime, send_task: Callable[..., Any],
                      tenants: list[int | None] | None, model_id: int | None = None,
                      limit: int | None = None) -> list[Plan]:
    """Start a reprocess job for each of ``tenants`` (None: every tenant with a default model)
    and each kind of default model (a classifier, an aligner; only ``model_id``'s when it is
    given), and run those that started; what starting did, per tenant and kind."""
    settings = rt.settings
    work: list[tuple[int | None, str]] = []
    with rt.db.session() as s:
        kinds = [get_model(s, model_id).kind] if model_id is not None else list(MODEL_KINDS)
        for kind in kinds:
            for tenant in (tenants if tenants is not None else tenants_with_models(s, kind)):
                work.append((tenant, kind))
    plans = []
    for tenant, kind in work:
        plan = start_reprocess(rt.db, tenant, model_id, limit=limit or settings.reprocess_limit,
                               max_attempts=settings.reprocess_max_attempts, kind=kind)
        log.info("reprocess tenant=%s job=%s reason=%s", tenant, plan.job_id, plan.reason)
        if plan.started and plan.job_id:
            plan = replace(plan, items=run_reprocess(rt, send_task, plan.job_id))
        plans.append(plan)
    return plans


def run_reprocess(rt: Runtime, send_task: Callable[..., Any], job_id: str) -> int:
    """Plan a reprocess job's members and its batches, and dispatch; how many items it has."""
    total = plan_members(rt.db, job_id, rt.settings.reprocess_max_attempts)
    with rt.db.session() as s:
        if not plans.planned(s, job_id):  # (a retried or redelivered message plans once)
            plans.plan(s, job_id, jobs.item_ids(s, job_id, pending_only=True),
                       rt.settings.batch_size)
    dispatch(rt, send_task)
    return total
