"""What the API and the dashboard do, written once: submit a job (upload, job, enqueue),
evaluate a model on an archive, cancel, reprocess, score a classify job, correct an item's label;
and the one lookup of a job, an item or a model version in the caller's tenant, 404 otherwise.

Views parse the request, call one of these, and serialise (``web.serializers``). Everything here
acts for the request's principal (``web.auth``): a tenant sees only its own jobs and models.
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from celery import Celery
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage, MultiDict

from media.archive import sniff_archive
from mmbatch.contract import (
    ALIGN_OPTIONS,
    DEFAULT_PRIORITY,
    JOB_KINDS,
    PRIORITIES,
    TASK_INDEX_BUILD,
    TASK_INGEST,
    TASK_REPROCESS,
    TASK_WEBHOOKS,
    OptionError,
    TrainOptions,
)
from mmbatch.netpolicy import DestinationRefused, check_url
from mmbatch.review import k_centre, margin
from mmbatch.scoring import score_labels
from mmbatch.settings import Settings
from store import jobs, labels, reprocess, uploads
from store import search as search_store
from store.blobs import BlobNotFound, Blobs, BlobStoreUnavailable, file_digest
from store.db import Database
from store.registry import ModelNotFound, default_model, get_model, promote
from store.s3blobs import S3BlobStore
from store.schema import Item, Job, LabelEvent, ModelVersion, Upload
from web import auth
from web.errors import ApiError
from web.search_client import SearchClient
from web.uploads import archive_name, writer_of

log = logging.getLogger(__name__)

ENQUEUE_TRIES = 3


@dataclass
class Services:
    """What one web process holds: settings, database, blob store, the broker it enqueues on,
    and the per-key rate limiter."""

    settings: Settings
    db: Database
    blobs: Blobs
    celery: Celery
    limiter: auth.RateLimiter
    search: SearchClient | None = None  # the search service (web.search_client)


def get_job_or_404(s: Session, job_id: str) -> Job:
    try:
        return jobs.get_job(s, job_id, auth.tenant_id())
    except jobs.JobNotFound:
        raise ApiError(404, "not_found", f"no job {job_id}") from None


def get_model_or_404(s: Session, model_id: int) -> ModelVersion:
    try:
        return get_model(s, model_id, auth.tenant_id())
    except ModelNotFound:
        raise ApiError(404, "not_found", f"no model version {model_id}") from None


def get_item_or_404(s: Session, item_id: int) -> tuple[Item, Job]:
    try:
        return labels.get_item(s, item_id, auth.tenant_id())
    except labels.ItemNotFound:
        raise ApiError(404, "not_found", f"no item {item_id}") from None


def correct_label(svc: Services, item_id: int, body: Any) -> LabelEvent:
    """Record that a person set item ``item_id``'s label (``{"label", "model"}``: the model
    version they were shown, whose classes the label must be one of; by default the model of
    the item's job, else the tenant's default; with none, any label)."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", 'send a JSON object: {"label": "…", "model": id}')
    label = body.get("label")
    if not isinstance(label, str) or not label.strip() or len(label) > 255 \
            or not label.isprintable():
        raise ApiError(400, "invalid_label", "label must be a non-empty printable string of "
                                             "at most 255 characters")
    with svc.db.session() as s:
        item, job = get_item_or_404(s, item_id)
        model = _model_shown(s, job, body.get("model"))
        if model is not None and label not in model.classes:
            raise ApiError(400, "unknown_label",
                           f"{label!r} is not a class of model {model.name} v{model.version} "
                           f"(id {model.id}); its classes: {', '.join(map(str, model.classes))}")
        event = labels.record_label(s, item, label, api_key_id=auth.current().key_id,
                                    model_version_id=model.id if model is not None else None)
        s.expunge(event)
        return event


REVIEW_STRATEGIES = ("uncertain", "diverse", "label-issues")
DIVERSE_POOL = 10  # a diverse page of k is spread over the k * DIVERSE_POOL least sure


@dataclass(frozen=True)
class ReviewPage:
    """Items for a person to look at, in order, each with why; and where the next page starts."""

    items: list[dict[str, Any]]
    next_after: tuple[float, int] | None


def review_page(svc: Services, job_id: str, strategy: str, limit: int,
                after: tuple[float, int] | None) -> ReviewPage:
    """A classify job's predictions that no person has looked at yet: the least sure first
    (``uncertain``; ``after`` is the (margin, item id) the last page ended on), or a page spread
    over the embedding space among the least sure (``diverse``: ask again once it is reviewed).
    A labelled item leaves the queue."""
    if strategy not in ("uncertain", "diverse"):
        raise ApiError(400, "invalid_strategy",
                       f"strategy must be one of {', '.join(REVIEW_STRATEGIES)}")
    with svc.db.session() as s:
        job = get_job_or_404(s, job_id)
        if job.kind not in ("classify", "reprocess") or job.model_version_id is None:
            raise ApiError(409, "not_a_classify_job",
                           "review takes a job that ran a classifier (a classify job)")
        rows = labels.unreviewed(s, job, with_embeddings=strategy == "diverse")
    ranked = sorted(((margin(r.top_k), r.item_id), r) for r in rows)
    if after is not None:
        ranked = [(order, r) for order, r in ranked if order > after]
    if strategy == "diverse":
        pool = ranked[:limit * DIVERSE_POOL]
        vectors = [np.frombuffer(r.embedding, dtype="<f4") if r.embedding else None
                   for _, r in pool]
        if pool and all(v is not None and len(v) == len(vectors[0]) for v in vectors):
            picked = k_centre(np.stack(vectors), limit)  # type: ignore[arg-type]
            pool = [pool[i] for i in picked]
        return ReviewPage([_review_item(job_id, r, m, "spread over the least sure")
                           for (m, _), r in pool[:limit]], None)
    page = ranked[:limit]
    more = len(ranked) > limit
    return ReviewPage([_review_item(job_id, r, m, "least sure") for (m, _), r in page],
                      page[-1][0] if more else None)


def _review_item(job_id: str, row: labels.Unreviewed, sureness: float, why: str
                 ) -> dict[str, Any]:
    top = [t["label"] for t in row.top_k[:2]]
    versus = f" between {top[0]} and {top[1]}" if len(top) == 2 else ""
    return {"item": row.item_id, "key": row.key, "job": job_id, "label": row.label,
            "confidence": row.confidence, "top_k": row.top_k,
            "reason": f"{why}: margin {sureness:.3f}{versus}"}


def _model_shown(s: Session, job: Job, requested: Any) -> ModelVersion | None:
    if requested is not None:
        try:
            return get_model(s, int(requested), auth.tenant_id())
        except (TypeError, ValueError, OverflowError, ModelNotFound):
            raise ApiError(400, "unknown_model", f"no model version with id {requested!r}"
                           ) from None
    if job.model_version_id is not None:
        model = get_model(s, job.model_version_id)
        if model.kind == "classifier":  # an aligner (align and embed jobs) has no classes
            return model
    return default_model(s, auth.tenant_id())


# The fields of a job request besides its archive and a train job's options.
JOB_FIELDS = ("kind", "model", "callback_url", "upload", "priority", "adapt")
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainOptions))


@dataclass(frozen=True)
class Archive:
    """The archive a job request brings: a multipart part not stored yet (``commit`` stores it)
    or a whole resumable upload (``upload``, already a blob)."""

    digest: str
    name: str
    size: int
    commit: Callable[[], str]
    upload: str | None = None


def submit_job(svc: Services, mimetype: str, form: MultiDict[str, str],
               files: MultiDict[str, FileStorage], idempotency_key: str | None
               ) -> tuple[str, bool]:
    """Create a job from a request's form and its archive (uploaded with it, or a finished
    resumable upload the form names), commit it, then enqueue its ingest; (the job's id, True),
    or (the earlier job's id, False) when the Idempotency-Key came with this same request
    before (422 when it came with another)."""
    tenant = auth.tenant_id()
    _check_key(idempotency_key)
    existing = None
    if idempotency_key is not None:
        with svc.db.session() as s:
            existing = jobs.find_by_idempotency_key(s, tenant, idempotency_key)
    try:
        kind, archive, options, model_id, callback = _job_request(svc, mimetype, form, files)
    except ApiError:
        if existing is not None:  # the key's own request was valid: this is another one
            raise _key_reused(existing) from None
        raise
    priority = _priority(form.get("priority"))
    fingerprint = _fingerprint({"kind": kind, "options": options, "model": model_id,
                                "callback_url": callback, "archive": archive.digest,
                                **({"priority": priority} if priority != DEFAULT_PRIORITY
                                   else {})})
    if existing is not None:
        return _same_request(existing, fingerprint), False
    return _create_once(svc, idempotency_key, fingerprint, dict(
        kind=kind, archive_blob=archive.commit(), archive_name=archive.name,
        archive_bytes=archive.size, model_version_id=model_id, options=options,
        callback_url=callback, priority=priority), upload=archive.upload)


def _finished_upload(svc: Services, upload_id: str) -> Archive:
    """A whole resumable upload as a job's archive: made a blob the first time (hashed once),
    its blob the next (a retry of the same request)."""
    with svc.db.session() as s:
        row = uploads.get_upload(s, upload_id.strip(), auth.tenant_id())
        if row is None:
            raise ApiError(400, "unknown_upload", f"no upload {upload_id!r} (or it expired): "
                                                  "make one with POST /api/v1/uploads")
        s.expunge(row)
    if row.multipart_id is not None:
        return _direct_upload(svc, row)
    upload_id, name, length, digest = row.id, row.name, row.length, row.archive_blob
    path = uploads.part_path(svc.blobs.spool_dir, upload_id)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if digest is None:
            raise ApiError(409, "upload_elsewhere", f"upload {upload_id}'s bytes are not on "
                                                    "this server: send this request to the one "
                                                    "that took them (docs/api.md)") from None
        return Archive(digest, name, length, lambda: digest, upload_id)  # a blob already
    with f:
        # Two requests naming one upload take turns here (a PATCH holds the same lock): the
        # second finds the first's blob recorded. The digest is recorded before the file moves,
        # so a storage failure in between leaves the file, and a retry installs it.
        fcntl.flock(f, fcntl.LOCK_EX)
        with svc.db.session() as s:
            digest = uploads.archive_of(s, upload_id)
        if digest is None:
            arrived = os.fstat(f.fileno()).st_size
            if arrived < length:
                raise ApiError(409, "upload_incomplete", f"{arrived} of the upload's {length} "
                                                         "bytes have arrived: send the rest first")
            if sniff_archive(f.read(512)) is None:
                raise ApiError(415, "invalid_archive",
                               "the upload is not a zip, tar or tar.gz archive")
            digest = file_digest(path)
            with svc.db.session() as s:
                uploads.record_archive(s, upload_id, digest)
        if path.exists():
            svc.blobs.adopt(path, digest)
    return Archive(digest, name, length, lambda: digest, upload_id)


def _direct_upload(svc: Services, row: Upload) -> Archive:
    """A completed direct upload (``web.direct_uploads``) as a job's archive: the job names the
    staged object, and its ingest worker, which reads the bytes anyway, makes them a blob. The
    API reads only the first bytes, to refuse what is no archive; the upload's id stands for
    the archive in the request's fingerprint."""
    if row.completed_at is None:
        raise ApiError(409, "upload_incomplete", f"upload {row.id} is not complete: PUT its "
                       f"parts, then POST /api/v1/direct-uploads/{row.id}/complete")
    if not isinstance(svc.blobs, S3BlobStore):
        raise ApiError(409, "direct_upload_unavailable", "this server keeps blobs on disk, not "
                                                         "in S3 where the upload is")
    if row.job_id is None and row.archive_blob is None:  # (once used, the staged object goes)
        try:
            head = svc.blobs.staged_head(row.id)
        except BlobNotFound:
            raise ApiError(404, "not_found", f"upload {row.id} is no longer in S3") from None
        if sniff_archive(head) is None:
            raise ApiError(415, "invalid_archive",
                           "the upload is not a zip, tar or tar.gz archive")
    staged = uploads.staged_archive(row.id)
    return Archive(staged, row.name, row.length, lambda: staged, row.id)


def prune_uploads(svc: Services) -> None:
    """Forget the expired uploads (tus and direct): what arrived of them, then their records.
    A direct upload's parts are aborted in S3 first; one S3 could not be asked about stays for
    the next pruning."""
    with svc.db.session() as s:
        expired = uploads.expired_uploads(s)
    gone = []
    for row in expired:
        if row.multipart_id is None:
            uploads.part_path(svc.blobs.spool_dir, row.id).unlink(missing_ok=True)
        elif isinstance(svc.blobs, S3BlobStore):
            try:
                svc.blobs.abort_staged(row.id, row.multipart_id)
            except BlobStoreUnavailable as exc:
                log.warning("upload_abort_failed upload=%s error=%s", row.id, exc)
                continue
        gone.append(row.id)
    with svc.db.session() as s:
        uploads.delete_uploads(s, gone)
    if gone:
        log.info("uploads_expired count=%d", len(gone))


def _callback(svc: Services, raw: str | None) -> str | None:
    """A job's webhook URL, checked against the network policy; None when not given."""
    callback = (raw or "").strip() or None
    if callback is not None:
        if len(callback) > 2048:
            raise ApiError(400, "invalid_callback_url", "callback_url is at most 2048 characters")
        try:
            check_url(callback, svc.settings.webhook_allow)
        except DestinationRefused as exc:
            raise ApiError(400, "invalid_callback_url", str(exc)) from None
    return callback


def _check_key(idempotency_key: str | None) -> None:
    if idempotency_key is not None and (len(idempotency_key) > 255
                                        or not idempotency_key.isprintable()):
        raise ApiError(400, "invalid_idempotency_key",
                       "Idempotency-Key is at most 255 printable characters")


def _create_once(svc: Services, idempotency_key: str | None, fingerprint: str,
                 job: dict[str, Any], upload: str | None = None) -> tuple[str, bool]:
    """Create the job (``jobs.create_job``'s fields), commit, then enqueue its ingest: (its id,
    True); or, when the Idempotency-Key already made one for this request, (that job's id,
    False), 422 for another request. A job made from a resumable ``upload`` claims it in the
    same transaction: 409 when another job already has."""
    tenant = auth.tenant_id()
    try:
        with svc.db.session() as s:
            existing = (jobs.find_by_idempotency_key(s, tenant, idempotency_key)
                        if idempotency_key is not None else None)
            if existing is not None:
                return _same_request(existing, fingerprint), False
            job_id = jobs.create_job(s, **job, tenant_id=tenant,
                                     api_key_id=auth.current().key_id,
                                     idempotency_key=idempotency_key,
                                     request_fingerprint=fingerprint).id
            if upload is not None and not uploads.claim_for_job(s, upload, job_id):
                raise ApiError(409, "upload_used", f"upload {upload} already made a job: "
                                                   "name it once (or retry with the same "
                                                   "Idempotency-Key)")
    except IntegrityError:  # the same Idempotency-Key raced us: answer with the job that won
        with svc.db.session() as s:
            existing = jobs.find_by_idempotency_key(s, tenant, idempotency_key or "")
            if existing is None:
                raise
            return _same_request(existing, fingerprint), False
    enqueue(svc, job_id, TASK_INGEST, job_id)
    return job_id, True


MAX_FROM_JOBS = 100
HOLDOUTS = ("verified",)


def submit_retrain(svc: Services, body: Any, idempotency_key: str | None) -> tuple[str, bool]:
    """A train job on earlier jobs' items instead of an archive (JSON ``{"kind": "train",
    "from_jobs": [ids], "holdout": "verified", …train options}``): their current labels,
    corrections included, and their cached features. Answers like :func:`submit_job`."""
    tenant = auth.tenant_id()
    _check_key(idempotency_key)
    if not isinstance(body, dict) or "from_jobs" not in body:  # not the JSON request it knows
        raise ApiError(400, "send_multipart",
                       "send multipart/form-data: the archive as a file field named 'archive', "
                       "the kind and options as form fields (JSON is for a train job on earlier "
                       'jobs\' items: {"kind": "train", "from_jobs": [job ids], …})')
    known = ("kind", "from_jobs", "holdout", "callback_url", "priority", *TRAIN_FIELDS)
    for name in body:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ApiError(400, "unknown_field", f"unknown field {name!r}{hint}; fields: "
                                                 f"{', '.join(known)}")
    if body.get("kind") != "train":
        raise ApiError(400, "invalid_kind", "a JSON job request makes a train job from earlier "
                                            'jobs: "kind": "train"; other kinds send an archive')
    sources = body.get("from_jobs")
    if (not isinstance(sources, list) or not sources or len(sources) > MAX_FROM_JOBS
            or not all(isinstance(j, str) for j in sources)):
        raise ApiError(400, "invalid_from_jobs", "from_jobs must be a list of 1 to "
                                                 f"{MAX_FROM_JOBS} job ids")
    holdout = body.get("holdout")
    if holdout is not None and holdout not in HOLDOUTS:
        raise ApiError(400, "invalid_holdout", f"holdout must be one of {', '.join(HOLDOUTS)}")
    callback = body.get("callback_url")
    if callback is not None and not isinstance(callback, str):
        raise ApiError(400, "invalid_callback_url", "callback_url is a URL")
    callback = _callback(svc, callback)
    form = MultiDict({k: ("true" if v is True else "false" if v is False else str(v))
                      for k, v in body.items() if k in TRAIN_FIELDS and v is not None})
    options = _options("train", form)
    with svc.db.session() as s:
        for job_id in dict.fromkeys(sources):
            try:
                job = jobs.get_job(s, job_id, tenant)
            except jobs.JobNotFound:
                raise ApiError(400, "unknown_job", f"no job {job_id} to train from") from None
            if job.state != "succeeded":
                raise ApiError(409, "job_not_finished", f"job {job_id} is {job.state}: train "
                                                        "from jobs that succeeded")
    options.update(from_jobs=list(dict.fromkeys(sources)))
    if holdout is not None:
        options["holdout"] = holdout
    priority = _priority(body.get("priority"))
    fingerprint = _fingerprint({"kind": "train", "options": options, "callback_url": callback,
                                **({"priority": priority} if priority != DEFAULT_PRIORITY
                                   else {})})
    return _create_once(svc, idempotency_key, fingerprint, dict(
        kind="train", archive_blob="",
        archive_name=f"items of {len(options['from_jobs'])} job(s)", archive_bytes=0,
        model_version_id=None, options=options, callback_url=callback, priority=priority))


def _priority(raw: Any) -> str:
    """A job's priority (default normal); 400 when it is not one, or higher than the key may
    ask for (``mmbatch keys create --max-priority``)."""
    allowed = auth.current().max_priority
    if raw is None or raw == "":  # normal, unless the key may only ask for less
        return PRIORITIES[max(PRIORITIES.index(DEFAULT_PRIORITY), PRIORITIES.index(allowed))]
    if raw not in PRIORITIES:
        raise ApiError(400, "invalid_priority",
                       f"priority must be one of {', '.join(PRIORITIES)}; got {raw!r}")
    if PRIORITIES.index(raw) < PRIORITIES.index(allowed):
        raise ApiError(400, "invalid_priority", f"this API key may ask for {allowed} priority "
                                                f"at most, not {raw}")
    return str(raw)


def _job_request(svc: Services, mimetype: str, form: MultiDict[str, str],
                 files: MultiDict[str, FileStorage]
                 ) -> tuple[str, Archive, dict[str, Any], int | None, str | None]:
    """A job request checked: (kind, its archive, options, model id, callback URL); ApiError
    for the first thing wrong."""
    _check_request(mimetype, form, files)
    kind = form.get("kind", "")
    if kind not in JOB_KINDS:
        raise ApiError(400, "invalid_kind",
                       f"kind must be one of {', '.join(JOB_KINDS)}; got {kind!r}")
    callback = _callback(svc, form.get("callback_url"))
    if form.get("upload"):
        if files.get("archive") is not None:
            raise ApiError(400, "one_archive", "send the archive as a file or name a finished "
                                               "upload, not both")
        archive = _finished_upload(svc, form["upload"])
    else:
        upload = files.get("archive")
        writer = _archive(upload, "send the archive as a multipart file field named 'archive' "
                                  "(or name a finished resumable upload in the field 'upload')")
        archive = Archive(writer.digest, archive_name(upload), writer.size, writer.commit)
    options = _options(kind, form)
    with svc.db.session() as s:
        model_id = _resolve_model(s, kind, form.get("model"))
        if options.get("adapt"):
            fusion = get_model(s, model_id).fusion if model_id is not None else None
            if fusion != "stack":
                raise ApiError(400, "invalid_adapt",
                               "adapt=true adapts a stacked model (strategy=stack, the default "
                               f"of train jobs); model {model_id} is {fusion!r}")
    return kind, archive, options, model_id, callback


def _check_request(mimetype: str, form: MultiDict[str, str],
                   files: MultiDict[str, FileStorage]) -> None:
    """400 for what a job request must not quietly lose: a body that is not a form (a raw
    archive, JSON), a field or file given twice, a field the API does not know, a train option
    on another kind of job."""
    if mimetype not in ("multipart/form-data", "application/x-www-form-urlencoded", ""):
        raise ApiError(400, "send_multipart",
                       "send multipart/form-data: the archive as a file field named 'archive', "
                       f"and kind (one of {', '.join(JOB_KINDS)}) as a form field; got "
                       f"{mimetype or 'no body'}")
    for name in set(files):
        if name != "archive":
            raise ApiError(400, "unknown_field", f"unknown file field {name!r}: send the "
                                                 "archive as a file field named 'archive'")
    if len(files.getlist("archive")) > 1:
        raise ApiError(400, "one_archive", "send one archive per job: "
                                           f"got {len(files.getlist('archive'))} files named "
                                           "'archive'")
    for name in form:
        if len(form.getlist(name)) > 1:
            raise ApiError(400, f"one_{name}" if name in JOB_FIELDS + TRAIN_FIELDS
                           else "unknown_field", f"{name} is given {len(form.getlist(name))} "
                                                 "times: send it once")
        if name not in JOB_FIELDS + TRAIN_FIELDS:
            close = difflib.get_close_matches(name, JOB_FIELDS + TRAIN_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ApiError(400, "unknown_field", f"unknown field {name!r}{hint}; fields: "
                                                 f"{', '.join(JOB_FIELDS + TRAIN_FIELDS)}")
    kind = form.get("kind")
    given = [name for name in TRAIN_FIELDS if (form.get(name) or "").strip()
             and not (kind == "align" and name in ALIGN_OPTIONS)]
    if given and kind != "train":
        also = f" (an align job takes {', '.join(ALIGN_OPTIONS)})" if kind == "align" else ""
        raise ApiError(400, "train_only_option",
                       f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to "
                       f"train jobs only{also}, not to a {kind or 'job without a kind'}")


def _fingerprint(request: dict[str, Any]) -> str:
    """SHA-256 of a job request's canonical JSON: what an Idempotency-Key stands for."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _same_request(existing: Job, fingerprint: str) -> str:
    """The job an Idempotency-Key made, if this request is the one that made it (a job from
    before fingerprints were kept counts as the same); 422 otherwise."""
    if existing.request_fingerprint not in (None, fingerprint):
        raise _key_reused(existing)
    return existing.id


def _key_reused(existing: Job) -> ApiError:
    return ApiError(422, "idempotency_key_reused",
                    f"this Idempotency-Key made job {existing.id} for another request "
                    "(another archive, kind, model or options): use a new key")


def evaluate_model(svc: Services, model_id: int, upload: FileStorage | None) -> str:
    """Classify a labelled archive with a model: a classify job marked ``evaluate``, whose
    evaluation (:func:`evaluation`) is computed from its results when asked for. An aligner
    is evaluated on a paired archive instead: an align job marked ``evaluate`` that scores
    recall per direction once the archive's features are extracted."""
    with svc.db.session() as s:
        kind = "align" if get_model_or_404(s, model_id).kind == "aligner" else "classify"
    writer = _archive(upload, "send the labelled archive as a multipart file field named "
                              "'archive'")
    digest = writer.commit()
    with svc.db.session() as s:
        job_id = jobs.create_job(s, kind=kind, archive_blob=digest,
                                 archive_name=archive_name(upload), archive_bytes=writer.size,
                                 model_version_id=model_id, options={"evaluate": True},
                                 priority=_priority(None),
                                 tenant_id=auth.tenant_id(), api_key_id=auth.current().key_id).id
    enqueue(svc, job_id, TASK_INGEST, job_id)
    return job_id


def cancel_job(svc: Services, job_id: str) -> None:
    """Stop a job: outstanding batches see the state and skip; results written stay."""
    with svc.db.session() as s:
        job = get_job_or_404(s, job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            raise ApiError(409, "job_finished", f"job {job_id} is already {job.state}")
        jobs.cancel_job(s, job_id)
    try:
        svc.celery.send_task(TASK_WEBHOOKS)
    except Exception:  # noqa: BLE001  # the scheduled delivery will pick it up
        log.warning("webhook_kick_failed job=%s", job_id)


def start_reprocess(svc: Services, model: Any, limit: Any) -> tuple[str | None, str]:
    """Start this tenant's reprocess of stale or failed items now (what the nightly schedule
    does for every tenant): the job, created here after a cheap check and run by a worker, or
    None and why nothing is due."""
    if model is not None:
        with svc.db.session() as s:
            try:
                model = get_model(s, int(model), auth.tenant_id()).id
            except (TypeError, ValueError, OverflowError, ModelNotFound):  # inf: Overflow
                raise ApiError(400, "unknown_model", f"no model version with id {model!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or not 1 <= limit <= 10_000_000):
        raise ApiError(400, "invalid_limit", "limit must be an integer between 1 and 10000000")
    settings = svc.settings
    plan = reprocess.start_reprocess(svc.db, auth.tenant_id(), model,
                                     limit=limit or settings.reprocess_limit,
                                     max_attempts=settings.reprocess_max_attempts)
    if plan.reason == "a reprocess job is already running":
        raise ApiError(409, "reprocess_running", f"reprocess job {plan.job_id} is running: "
                                                 "wait for it to end")
    if plan.reason == "another reprocess is being planned":
        raise ApiError(409, "reprocess_running", "another reprocess is being planned: try "
                                                 "again in a moment")
    if not plan.started or plan.job_id is None:
        return None, plan.reason
    svc.celery.send_task(TASK_REPROCESS, kwargs={"job_id": plan.job_id})
    return plan.job_id, plan.reason


def promote_model(svc: Services, model_id: int) -> ModelVersion:
    """Make a model version the tenant's default of its kind, for the API and the dashboard.
    One its promotion gate kept a candidate records that a person overrode the gate. An
    aligner's index answers the tenant's searches from then on if it is ready; otherwise it is
    built (beside the serving one, which answers until the switch), enqueued after the commit."""
    with svc.db.session() as s:
        model = get_model_or_404(s, model_id)
        gate = (model.metrics or {}).get("promotion")
        if isinstance(gate, dict) and gate.get("gate") != "passed" and not model.is_default:
            model.metrics = {**model.metrics, "promotion": {**gate, "promoted_by_hand": True}}
        model = promote(s, model_id, auth.tenant_id())
        build = model.kind == "aligner" and not search_store.activate_default(s, model_id)
    if build:
        svc.celery.send_task(TASK_INDEX_BUILD, args=[model_id])
    return model


def evaluation(svc: Services, job_id: str) -> dict[str, Any]:
    """Scores of a classify job against the labels its archive gave (any classify job over a
    labelled archive, not only those made by :func:`evaluate_model`); an aligner's evaluation
    job's recall per direction."""
    with svc.db.session() as s:
        job = get_job_or_404(s, job_id)
        if job.kind == "align" and (job.options or {}).get("evaluate"):
            model = get_model(s, job.model_version_id or 0)
            return {"job": job.id, "state": job.state,
                    "model": {"id": model.id, "name": model.name, "version": model.version},
                    "retrieval": (job.report or {}).get("retrieval")}
        if job.kind != "classify" or job.model_version_id is None:
            raise ApiError(409, "not_a_classify_job", "only a classify job can be evaluated")
        model = get_model(s, job.model_version_id)
        pairs: list[tuple[str, str | None, float | None]] = []
        after = 0
        while page := jobs.results_page(s, job, after=after, limit=1000):
            pairs += [(item.label, r.label if r is not None and r.status == "ok" else None,
                       r.confidence if r is not None else None)
                      for item, r in page if item.label is not None]
            after = page[-1][0].id
        return {"job": job.id, "state": job.state,
                "model": {"id": model.id, "name": model.name, "version": model.version},
                **score_labels(pairs, list(model.classes)),
                "warnings": list(job.warnings or []),
                # worker.shift: how far the job's features are from the training data
                "shift": (job.report or {}).get("shift")}


def enqueue(svc: Services, job_id: str, task: str, *args: Any) -> None:
    """Commit, then enqueue: called once the job row exists, so any worker can find it.

    Tried a few times: besides a broker that is briefly away, kombu's SQLAlchemy transport (the
    embedded broker) fails a publish with a unique-constraint error when a worker starting at
    the same moment declares the same queue.
    """
    for attempt in range(1, ENQUEUE_TRIES + 1):
        try:
            svc.celery.send_task(task, args=list(args))
            return
        except Exception as exc:
            if attempt < ENQUEUE_TRIES:
                log.warning("enqueue_retry job=%s attempt=%d error=%s", job_id, attempt, exc)
                time.sleep(0.2 * attempt)
                continue
            with svc.db.session() as s:
                jobs.fail_job(s, job_id, f"could not enqueue the job: {exc}")
            raise ApiError(503, "broker_unavailable",
                           "the job queue is unavailable; the job was not started") from exc


def _archive(upload: FileStorage | None, missing: str) -> Any:
    """The uploaded archive's blob writer (not yet committed); 400 when there is none, 415 when
    it is not a zip, tar or tar.gz."""
    writer = writer_of(upload) if upload is not None else None
    if writer is None or writer.size == 0:
        raise ApiError(400, "missing_archive", missing)
    writer.flush()
    with open(writer.path, "rb") as f:
        if sniff_archive(f.read(512)) is None:
            raise ApiError(415, "invalid_archive", "the upload is not a zip, tar or tar.gz archive")
    return writer


def _options(kind: str, form: MultiDict[str, str]) -> dict[str, Any]:
    """A train (or align) job's options, parsed and checked (400 ``invalid_<field>``); a
    classify job's ``adapt``; none for others. An align job reads only ``ALIGN_OPTIONS`` of
    them."""
    adapt = (form.get("adapt") or "").strip().lower()
    if adapt:
        if kind != "classify":
            raise ApiError(400, "invalid_adapt", "adapt applies to classify jobs only")
        if adapt not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ApiError(400, "invalid_adapt", "adapt must be true or false")
    if kind not in ("train", "align"):
        return {"adapt": True} if adapt in ("true", "1", "yes", "on") else {}
    try:
        options = TrainOptions.parse(form).to_dict()
    except OptionError as exc:
        raise ApiError(400, f"invalid_{exc.field}", str(exc)) from None
    if kind == "align":
        for name in options:
            if name not in ALIGN_OPTIONS:
                raise ApiError(400, f"invalid_{name}", f"{name} applies to train jobs only; "
                               f"an align job takes {', '.join(ALIGN_OPTIONS)}")
    return options


def _resolve_model(s: Session, kind: str, requested: str | None) -> int | None:
    if kind in ("train", "align"):
        if requested:
            raise ApiError(400, "invalid_model", f"a {kind} job makes a model; do not name one")
        return None
    if requested:
        try:
            model = get_model(s, int(requested), auth.tenant_id())
        except (ValueError, ModelNotFound):
            raise ApiError(400, "unknown_model", f"no model version with id {requested!r}")
        if kind == "classify" and model.kind != "classifier":
            raise ApiError(400, "not_a_classifier", f"model {model.id} is an {model.kind}: "
                           "embed with it (kind=embed) to index items for search")
        return model.id
    model = default_model(s, auth.tenant_id())
    if model is None and kind == "classify":
        raise ApiError(409, "no_model",
                       "no model version exists yet: train one with a kind=train job first")
    return model.id if model is not None else None
