"""The dispatcher: keeps a window of planned batches (``store.dispatch``) in the broker.

Called wherever the window may have room: after an ingest plans a job's batches, after every
batch, after a sweep re-plans what was lost, after a reprocess plans its members. The database is
the queue of record; the broker holds at most MMBATCH_DISPATCH_WINDOW batches, so a cancel has
nothing to chase and a new job is next in line after a window, not after a flood.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mmbatch.contract import TASK_PROCESS_BATCH
from store import dispatch as plans
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def dispatch(rt: Runtime, send_task: Callable[..., Any]) -> int:
    """Send the batches that fill the window; how many. A batch marked sent whose message is
    lost (the broker down at that moment) comes back through the sweeper."""
    with rt.db.session() as s:
        claimed = plans.claim(s, rt.settings.dispatch_window)
    for c in claimed:
        send_task(TASK_PROCESS_BATCH, args=[c.job_id, c.item_ids, c.batch_id])
    if claimed:
        log.debug("dispatched batches=%d", len(claimed))
    return len(claimed)
