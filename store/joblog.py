"""One ``key=value`` log line per job state change, with the job's id, once the change commits.

The functions of :mod:`store.jobs` that move a job's state note the change on the session;
``Database`` installs the listeners that write the notes after the transaction commits and drop
them if it rolls back, so a line is written exactly when a state change happened: never for a
conditional UPDATE that matched nothing, never for a transaction that failed.

    job_state job=0f3c… state=running kind=classify total=500
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_NOTES = "mmbatch.job_states"
# Column values worth a place on the line; others (timestamps, reports) stay in the database.
FIELDS = ("kind", "total", "error")


def note(session: Session, job_id: str, state: str, **values: Any) -> None:
    """Record that ``job_id`` entered ``state`` in this session's transaction."""
    fields = {k: values[k] for k in FIELDS if values.get(k) is not None}
    session.info.setdefault(_NOTES, []).append({"job": job_id, "state": state, **fields})


def format_fields(fields: dict[str, Any]) -> str:
    """``k=v`` pairs; values with spaces, quotes or ``=`` are JSON-quoted (logfmt style)."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\n\t\\'):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _committed(session: Session) -> None:
    for fields in session.info.pop(_NOTES, []):
        log.info("job_state %s", format_fields(fields))


def _rolled_back(session: Session) -> None:
    session.info.pop(_NOTES, None)


def install(sessions: sessionmaker[Session]) -> None:
    """Write the notes of every session ``sessions`` makes after each commit."""
    event.listen(sessions, "after_commit", _committed)
    event.listen(sessions, "after_rollback", _rolled_back)
