"""Resumable uploads (``store.schema.Upload``): made, found within a tenant, marked with the job
made from them, and forgotten once expired. Their bytes live in files that ``web.resumable``
keeps, or, for a direct upload, at a staging key in S3 (``web.direct_uploads``); this module
keeps the rows.

A job made from a direct upload names it as its archive (``staged_archive``) until the ingest
worker has made the staged bytes a blob (``adopt_archive``): the API never reads them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import and_, delete, select, update
from sqlalchemy.orm import Session

from store.schema import Job, Upload, utcnow

ID_CHARS = frozenset("0123456789abcdef")
STAGED = "upload:"  # a job's archive_blob while it names a direct upload's staged object
FINISHED = ("succeeded", "failed", "cancelled")


def create_upload(session: Session, upload_id: str, tenant_id: int, api_key_id: int | None,
                  name: str, length: int, ttl: dt.timedelta, multipart_id: str | None = None,
                  part_size: int | None = None) -> Upload:
    row = Upload(id=upload_id, tenant_id=tenant_id, api_key_id=api_key_id, name=name, length=length,
                 expires_at=utcnow() + ttl, multipart_id=multipart_id, part_size=part_size)
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


def expired_uploads(session: Session, now: dt.datetime | None = None) -> list[Upload]:
    """The uploads nobody finished into a job before they expired, and those made into a job
    more than their lifetime ago (their row only says which job they made); except a direct
    upload whose unfinished job has not made its staged bytes a blob yet (a queue that waited
    longer than the expiry must not lose the job's archive)."""
    now = now or utcnow()
    waiting = and_(Upload.job_id.is_not(None), Upload.archive_blob.is_(None),
                   Upload.multipart_id.is_not(None),
                   select(Job.id).where(Job.id == Upload.job_id,
                                        Job.state.not_in(FINISHED)).exists())
    rows = list(session.scalars(select(Upload).where(Upload.expires_at <= now,
                                                     ~waiting)))
    for row in rows:
        session.expunge(row)
    return rows


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


def staged_archive(upload_id: str) -> str:
    """What a job made from a direct upload has as its archive until ingest adopts it."""
    return STAGED + upload_id


def staged_upload(archive_blob: str) -> str | None:
    """The direct upload a job's archive still is, if it is one."""
    return archive_blob[len(STAGED):] if archive_blob.startswith(STAGED) else None


def complete(session: Session, upload_id: str) -> dt.datetime:
    """The direct upload is whole (S3 joined its parts)."""
    now = utcnow()
    session.execute(update(Upload).where(Upload.id == upload_id, Upload.completed_at.is_(None))
                    .values(completed_at=now))
    return now


def adopt_archive(session: Session, job_id: str, upload_id: str, digest: str) -> bool:
    """The job's direct upload is blob ``digest`` now: the job and the upload say so (the job
    only while it still names the staged object). Whether the job's archive moved."""
    moved = session.execute(update(Job).where(Job.id == job_id,
                                              Job.archive_blob == staged_archive(upload_id))
                            .values(archive_blob=digest)).rowcount
    record_archive(session, upload_id, digest)
    return bool(moved)
