"""Named leases: a lock that a crashed holder loses when its time runs out."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from store.schema import Lease, utcnow
from store.upsert import insert_new


def acquire(session: Session, name: str, owner: str, seconds: float) -> bool:
    """Take ``name`` for ``seconds`` unless someone else holds an unexpired lease on it."""
    now = utcnow()
    expires = now + dt.timedelta(seconds=seconds)
    if insert_new(session, Lease.__table__, [{"name": name, "owner": owner,
                                                "expires_at": expires}], ("name",), ("name",)):
        return True
    taken = session.execute(update(Lease).where(
        Lease.name == name, (Lease.expires_at < now) | (Lease.owner == owner))
        .values(owner=owner, expires_at=expires)).rowcount
    return taken == 1


def release(session: Session, name: str, owner: str) -> None:
    session.execute(delete(Lease).where(Lease.name == name, Lease.owner == owner))
