"""Which failures a task retries, and how: a transient fault (database, broker or storage
briefly unreachable) is retried with exponential backoff up to a ceiling; anything else is the
task's to record where the client sees it, and then to re-raise."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, DBAPIError, ConnectionError, TimeoutError, OSError)
MAX_RETRIES = 10


def retry(task: Any, exc: BaseException) -> NoReturn:
    """Send ``task`` again after 1, 2, 4 … seconds (at most 300)."""
    log.warning("transient_error task=%s retry=%d error=%s", task.name, task.request.retries, exc)
    raise task.retry(exc=exc, countdown=float(min(300, 2 ** task.request.retries)))
