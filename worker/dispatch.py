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
    """Send the batches that fill the window; how many. When the broker refuses one (down for
    a moment), it and the rest go back to waiting in the database, for the next batch to finish
    or the next sweep to send; a message lost after the broker took it comes back through the
    sweeper."""
    with rt.db.session() as s:
        claimed = plans.claim(s, rt.settings.dispatch_window)
    for i, c in enumerate(claimed):
        try:
            send_task(TASK_PROCESS_BATCH, args=[c.job_id, c.item_ids, c.batch_id])
        except Exception as exc:
            with rt.db.session() as s:
                plans.unclaim(s, [b.batch_id for b in claimed[i:]])
            log.warning("dispatch_failed batches=%d error=%s", len(claimed) - i, exc)
            return i
    if claimed:
        log.debug("dispatched batches=%d", len(claimed))
    return len(claimed)
