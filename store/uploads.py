"""Resumable uploads (``store.schema.Upload``): made, found within a tenant, marked with the job
made from them, and forgotten once expired. Their bytes live in files that ``web.resumable``
keeps; this module keeps the rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from store.schema import Upload, utcnow

ID_CHARS = frozenset("0123456789abcdef")


def create_upload(session: Session, upload_id: str, tenant_id: int, api_key_id: int | None,
                  name: str, length: int, ttl: dt.timedelta) -> Upload:
    row = Upload(id=upload_id, tenant_id=tenant_id, api_key_id=api_key_id, name=name, length=length,
                 expires_at=utcnow() + ttl)
    session.add(row)
    session.flush()
    return row


def get_upload(session: Session, upload_id: str, tenant_id: int, lock: bool = False
               ) -> Upload | None:
    """The tenant's upload, unless it has expired (None for another tenant's, as for none)."""
    if len(upload_id) != 32 or not ID_CHARS.issuperset(upload_id):
        return None
    query = select(Upload).where(Upload.id == upload_id, Upload.tenant_id == tenant_id)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None or (row.job_id is None and _aware(row.expires_at) <= utcnow()):
        return None
    return row


def expired_uploads(session: Session, now: dt.datetime | None = None) -> list[str]:
    """Ids of the uploads nobody finished into a job before they expired, and of those made
    into a job more than their lifetime ago (their row only says which job they made)."""
    now = now or utcnow()
    return list(session.scalars(select(Upload.id).where(Upload.expires_at <= now)))


def delete_uploads(session: Session, upload_ids: list[str]) -> None:
    if upload_ids:
        session.execute(delete(Upload).where(Upload.id.in_(upload_ids)))


def record_archive(session: Session, upload_id: str, digest: str) -> None:
    """The finished upload's bytes are blob ``digest`` now."""
    row = session.get(Upload, upload_id)
    if row is not None:
        row.archive_blob = digest


def archive_of(session: Session, upload_id: str) -> str | None:
    """The blob a whole upload became, once recorded."""
    return session.scalar(select(Upload.archive_blob).where(Upload.id == upload_id))


def claim_for_job(session: Session, upload_id: str, job_id: str) -> bool:
    """Record that ``job_id`` is made from the upload, unless another job already is (in the
    job's own transaction: two requests naming one upload make one job)."""
    return bool(session.execute(update(Upload).where(Upload.id == upload_id,
                                                     Upload.job_id.is_(None))
                                .values(job_id=job_id)).rowcount)


def extend(session: Session, upload_id: str, ttl: dt.timedelta) -> dt.datetime:
    """An upload that is still arriving lives ``ttl`` from now (a slow link is not abandoned);
    its new expiry."""
    expires = utcnow() + ttl
    session.execute(update(Upload).where(Upload.id == upload_id).values(expires_at=expires))
    return expires


def _aware(when: dt.datetime) -> dt.datetime:
    """SQLite gives back naive datetimes: they were written in UTC."""
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.timezone.utc)


def part_path(spool_dir: Path, upload_id: str) -> Path:
    """Where an upload's bytes so far are kept: beside the blob store's own temporary files
    (on its file system, so that a finished upload becomes a blob by a rename)."""
    return spool_dir / ".uploads" / upload_id
