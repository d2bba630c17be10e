"""The relational schema: jobs, items, cached features, results, model versions, and the label
events and label issues of items.

Created only by Alembic migrations (``migrations/``); tests compare the two.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Results of jobs that run no classifier (embed with no model) use this model_version_id.
NO_MODEL = 0
# The largest value of an INTEGER id column: a larger id names no row (and PostgreSQL refuses
# to compare an INTEGER column with it).
MAX_ID = 2**31 - 1
JOB_ID_LENGTH = 32


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_job_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    """Who owns jobs and models; an API key belongs to exactly one tenant."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A bearer key, stored as its SHA-256 (keys are 256 random bits, so a fast hash suffices)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    # Shared secret for signing this key's webhooks (HMAC-SHA256); shown once with the key.
    webhook_secret: Mapped[str] = mapped_column(String(64))
    # The highest priority this key's jobs may ask for (contract.PRIORITIES).
    max_priority: Mapped[str] = mapped_column(String(16), default="interactive")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(JOB_ID_LENGTH), primary_key=True, default=new_job_id)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    archive_blob: Mapped[str] = mapped_column(String(64))
    archive_name: Mapped[str] = mapped_column(String(255), default="")
    archive_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # up to 4 GiB and more
    priority: Mapped[str] = mapped_column(String(16), default="normal")  # contract.PRIORITIES
    total: Mapped[int] = mapped_column(Integer, default=0)
    # Running while its archive is still being walked (ingest streams): it cannot finish yet.
    walking: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What the user should know of a job that did not fail (classes the model lacks, shift).
    warnings: Mapped[list[Any] | None] = mapped_column()
    # SHA-256 of the request that made the job (kind, options, model, callback, archive hash):
    # an Idempotency-Key reused for another request is refused.
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    onupdate=utcnow)


class Item(Base):
    """One key of an archive: its media files (by content hash), and its label if given."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("job_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(1024))
    # Every delivery of this item to a worker, across jobs: the reprocessing policy's count of tries.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Deliveries within the current job (or since its batch was last split): the poison guard's
    # count. A reprocess job starts it afresh, so earlier jobs never look like redeliveries.
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # {"image": {"blob": sha256, "name": "animals/cat_001.jpg"}, ...}
    media: Mapped[dict[str, Any]] = mapped_column(default=dict)
    label: Mapped[str | None] = mapped_column(String(255))
    split: Mapped[str | None] = mapped_column(String(16))
    # labels.csv's optional group (speaker, source, language...): splits keep groups apart.
    group: Mapped[str | None] = mapped_column(String(255))


class Feature(Base):
    """Encoder output for one media file, keyed by its content and the encoder's version."""

    __tablename__ = "features"
    __table_args__ = (UniqueConstraint("blob", "encoder"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    blob: Mapped[str] = mapped_column(String(64))
    encoder: Mapped[str] = mapped_column(String(128))
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little endian
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Result(Base):
    """The outcome for one item under one model version (NO_MODEL when none ran)."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("item_id", "model_version_id"),
        Index("ix_results_job_id_item_id", "job_id", "item_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(Integer, default=NO_MODEL)
    status: Mapped[str] = mapped_column(String(16))  # "ok" | "failed"
    error: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(255))
    confidence: Mapped[float | None] = mapped_column(Float)
    top_k: Mapped[list[Any] | None] = mapped_column()
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32, little endian
    # How much each present modality drove the decision: {"weights": {m: w}, "drop": {m: Δp}, …}
    explanation: Mapped[dict[str, Any] | None] = mapped_column()
    # How the item's media were read: {"text_encoding": "utf-16", "text_truncated": false}.
    info: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelVersion(Base):
    """A trained fusion classifier: its config, classes, metrics and safetensors checkpoint."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    fusion: Mapped[str] = mapped_column(String(32))
    classes: Mapped[list[Any]] = mapped_column()
    encoders: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_blob: Mapped[str] = mapped_column(String(64))
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # mmbatch.contract.MODEL_KINDS: a fusion classifier or an aligner; defaults are per kind.
    kind: Mapped[str] = mapped_column(String(16), default="classifier",
                                      server_default="classifier")

    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)


class JobMember(Base):
    """Items a job processes that another job ingested (a reprocess job's items)."""

    __tablename__ = "job_members"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"),
                                         primary_key=True)


class Lease(Base):
    """A named lock with an expiry: a holder that crashes loses it when the lease runs out."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One job's callback: attempts, the last answer, and when it was delivered."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("job_id", "event"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class LabelEvent(Base):
    """One change of an item's label, appended and never overwritten: who (the API key), when,
    from what to what, and which model version the person was shown. An item's current label is
    its latest event's, else the label its archive gave."""

    __tablename__ = "label_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    old_label: Mapped[str | None] = mapped_column(String(255))
    new_label: Mapped[str] = mapped_column(String(255))
    model_version_id: Mapped[int | None] = mapped_column(Integer)
    verified: Mapped[bool] = mapped_column(Boolean, default=True)  # a person looked
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LabelIssue(Base):
    """An item of a train job whose given label looked wrong to the model version trained on it
    (confident learning on out-of-fold predictions): ``rank`` 0 is the worst."""

    __tablename__ = "label_issues"

    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    given_label: Mapped[str] = mapped_column(String(255))
    suggested_label: Mapped[str] = mapped_column(String(255))
    quality: Mapped[float] = mapped_column(Float)


class SearchIndex(Base):
    """The vector index of one (tenant, aligner version) (docs/search.md): a base in blob
    storage plus the segments finished batches appended since. ``active``: the index that
    answers the tenant's searches without a model (one per tenant, switched atomically once a
    new default aligner's index is ready)."""

    __tablename__ = "search_indexes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id",
                                                             ondelete="CASCADE"), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="building")  # building|ready|failed
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    base_blob: Mapped[str | None] = mapped_column(String(64))
    base_rows: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ready_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    onupdate=utcnow)


class IndexSegment(Base):
    """Aligned vectors a finished batch appended to an index (a blob), until a merge folds
    them into the base."""

    __tablename__ = "index_segments"
    __table_args__ = (UniqueConstraint("index_id", "blob"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    index_id: Mapped[int] = mapped_column(ForeignKey("search_indexes.id", ondelete="CASCADE"))
    blob: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    merged: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


Index("ix_items_job_id_id", Item.job_id, Item.id)
Index("ix_index_segments_index_id_merged", IndexSegment.index_id, IndexSegment.merged)
Index("ix_jobs_tenant_id_created_at", Job.tenant_id, Job.created_at)


class Upload(Base):
    """A resumable upload (the tus protocol, ``web.resumable``): an archive arriving in pieces.
    Its bytes so far are a file in the web machine's upload directory, whose size is the
    offset; a job is made from it once it is whole (``job_id``, ``archive_blob``), and one that
    nobody finishes is removed after MMBATCH_UPLOAD_EXPIRE_HOURS.

    A direct upload (``web.direct_uploads``) goes to S3 instead, in presigned parts of an S3
    multipart upload (``multipart_id``, ``part_size``) at a staging key of its own; it is whole
    once completed (``completed_at``), and the ingest worker makes its bytes a blob."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True,
                                    default=lambda: uuid.uuid4().hex)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           index=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(255))
    length: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    archive_blob: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32))
    multipart_id: Mapped[str | None] = mapped_column(String(1024))  # S3's UploadId
    part_size: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    """A batch of a job's items, planned in the database (the queue of record): ``planned``
    until the dispatcher (``worker.dispatch``) sends it to the broker, ``sent`` while a worker
    has it, ``done`` once processed. The broker only ever holds a window of sent batches."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    item_ids: Mapped[list[int]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(8), default="planned", index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
