"""A worker app for tests that injects a fault: ``celery -A tests.faults worker`` runs the
service's own app (``worker.celery_app``), except that a batch holding an item whose key contains
``$MMBATCH_TEST_CRASH_KEY`` kills its worker process, as a C library fault would: after the
poison guard has counted the delivery, before anything is written."""

from __future__ import annotations

import logging
import os

from worker.batch import Batch, BatchProcessor
from worker.celery_app import app

__all__ = ["app"]
CRASH_KEY = "MMBATCH_TEST_CRASH_KEY"
log = logging.getLogger(__name__)
_read = BatchProcessor.read


def _read_or_crash(self: BatchProcessor, ids: list[int]) -> Batch | None:
    batch = _read(self, ids)
    crash = os.environ.get(CRASH_KEY)
    if crash and batch is not None and any(crash in it.key for it in batch.items):
        log.error("fault_injection crash_key=%r job=%s", crash, self.job_id)
        os._exit(70)
    return batch


BatchProcessor.read = _read_or_crash  # type: ignore[method-assign]
