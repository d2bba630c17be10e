"""Direct uploads under /api/v1/direct-uploads: with blobs in S3, the client sends an archive
straight to object storage in the parts of an S3 multipart upload, each a plain HTTP PUT to a
presigned URL this API hands out, so API machines never carry the bytes.

``POST /api/v1/direct-uploads`` (``{"length", "filename"}``) starts the multipart upload at a
staging key of its own (``store.s3blobs``) and answers the part size and count;
``POST …/urls`` (``{"parts": [numbers]}``) presigns ``upload_part`` for those parts (ask again
when resuming, or once they expire); ``GET …/<id>`` lists the parts S3 has (``list_parts``), so a
client that lost track resumes; ``POST …/complete`` (``{"parts": [{"part", "etag"}]}``) joins
them; ``DELETE`` aborts. Once complete, ``POST /api/v1/jobs`` with ``upload=<id>`` makes the job
(``web.service.submit_job``), and its ingest worker makes the staged bytes a blob. Direct uploads
nobody finishes are aborted after MMBATCH_UPLOAD_EXPIRE_HOURS, in the same pruning as tus ones.

These are JSON routes apart from the tus ones (``web.resumable``): a tus client must only ever
meet tus there, and a direct upload's bytes never reach these routes at all. With blobs on disk
every route answers ``409 direct_upload_unavailable``, naming tus.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for

from store import uploads
from store.blobs import BlobNotFound
from store.s3blobs import PartsRefused, S3BlobStore, StagedPart
from store.schema import Upload
from web import auth
from web.errors import ApiError
from web.serializers import iso
from web.service import Services, prune_uploads
from web.uploads import clean_name

direct_api = Blueprint("direct_api", __name__)
direct_api.before_request(auth.authenticate)

MAX_PARTS = 10_000  # S3's most parts in one multipart upload
URLS_PER_REQUEST = 100
PRESIGN_SECONDS = 3600  # a presigned part URL works this long; ask for new ones after


def _services() -> Services:
    return current_app.extensions["mmbatch"]  # type: ignore[no-any-return]


def staging(svc: Services) -> S3BlobStore:
    """The S3 blob store direct uploads stage in; 409 when blobs are on disk."""
    if not isinstance(svc.blobs, S3BlobStore):
        raise ApiError(409, "direct_upload_unavailable",
                       "blobs are kept on this server's disk, not in S3: upload resumably "
                       "with tus at /api/v1/uploads instead (docs/api.md)")
    return svc.blobs


@direct_api.post("/api/v1/direct-uploads")
def create_direct_upload() -> Response:
    """Start a multipart upload in S3 for an archive of ``length`` bytes (201)."""
    svc = _services()
    store = staging(svc)
    body = _body()
    length = body.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ApiError(400, "invalid_length", "length must be the archive's size in bytes (at "
                                              "least 1)")
    if length > svc.settings.max_upload_bytes:
        raise ApiError(413, "request_entity_too_large",
                       f"an archive is at most {svc.settings.max_upload_bytes} bytes "
                       "(MMBATCH_MAX_UPLOAD_BYTES)")
    name = body.get("filename")
    if name is not None and not isinstance(name, str):
        raise ApiError(400, "invalid_filename", "filename must be a string")
    prune_uploads(svc)
    upload_id = uuid.uuid4().hex
    # At least the configured size, and large enough for S3's 10,000 parts.
    part_size = max(svc.settings.direct_part_bytes, math.ceil(length / MAX_PARTS))
    multipart_id = store.start_staged(upload_id)
    try:
        with svc.db.session() as s:
            uploads.create_upload(s, upload_id, auth.tenant_id(), auth.current().key_id,
                                  clean_name(name), length, _ttl(), multipart_id, part_size)
    except BaseException:
        store.abort_staged(upload_id, multipart_id)
        raise
    response = jsonify(_payload(_row_or_404(upload_id), []))
    response.status_code = 201
    response.headers["Location"] = url_for("direct_api.get_direct_upload",
                                           upload_id=upload_id, _external=True)
    return response


@direct_api.get("/api/v1/direct-uploads/<upload_id>")
def get_direct_upload(upload_id: str) -> Response:
    """The upload and the parts S3 has of it: what a resuming client still has to send."""
    store = staging(_services())
    row = _row_or_404(upload_id)
    response = jsonify(_payload(row, _parts(store, row)))
    response.headers["Cache-Control"] = "no-store"
    return response


@direct_api.post("/api/v1/direct-uploads/<upload_id>/urls")
def part_urls(upload_id: str) -> Response:
    """Presigned URLs that take the given parts by HTTP PUT (at most 100 a request)."""
    store = staging(_services())
    row = _uploading(_row_or_404(upload_id))
    numbers = _body().get("parts")
    count = _part_count(row)
    if (not isinstance(numbers, list) or not 1 <= len(numbers) <= URLS_PER_REQUEST
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= count
                       for n in numbers)):
        raise ApiError(400, "invalid_parts", f"parts must be a list of 1 to {URLS_PER_REQUEST} "
                                             f"part numbers between 1 and {count}")
    assert row.multipart_id is not None
    with _services().db.session() as s:  # still arriving: not abandoned
        uploads.extend(s, row.id, _ttl())
    urls = [{"part": n, "url": store.part_url(row.id, row.multipart_id, n, PRESIGN_SECONDS)}
            for n in dict.fromkeys(numbers)]
    return jsonify({"urls": urls, "expires_in": PRESIGN_SECONDS})


@direct_api.post("/api/v1/direct-uploads/<upload_id>/complete")
def complete_direct_upload(upload_id: str) -> Response:
    """Join the parts (the client's numbers and ETags) into the archive; then it can make a
    job. 409 ``upload_incomplete`` while S3 lacks bytes of it, naming the parts missing."""
    svc = _services()
    store = staging(svc)
    row = _row_or_404(upload_id)
    if row.completed_at is not None:  # a retry whose answer was lost
        return jsonify(_payload(row, []))
    given = _body().get("parts")
    if (not isinstance(given, list) or not given
            or not all(isinstance(p, dict) and isinstance(p.get("part"), int)
                       and not isinstance(p.get("part"), bool)
                       and isinstance(p.get("etag"), str) for p in given)):
        raise ApiError(400, "invalid_parts", 'parts must be a list of {"part": number, '
                                             '"etag": "…"}, as S3 answered each PUT')
    count = _part_count(row)
    numbers = sorted(p["part"] for p in given)
    if numbers != list(range(1, count + 1)):
        raise ApiError(400, "invalid_parts", f"name each of the upload's {count} parts once "
                                             f"(1 to {count})")
    have = {p.number: p for p in _parts(store, row)}
    missing = [n for n in numbers if n not in have or have[n].size != _part_bytes(row, n)]
    if missing:
        raise ApiError(409, "upload_incomplete", f"S3 lacks {len(missing)} of the upload's "
                       f"{count} parts (or has them short): {_ranges(missing)}; PUT them, then "
                       "complete")
    assert row.multipart_id is not None
    try:
        store.complete_staged(row.id, row.multipart_id,
                              sorted((p["part"], p["etag"]) for p in given))
    except PartsRefused as exc:
        raise ApiError(400, "invalid_parts", f"S3 refused the parts: {exc}") from None
    except BlobNotFound:  # completed by a request that raced this one, or aborted
        if _row_or_404(upload_id).completed_at is None:
            raise ApiError(404, "not_found", f"no upload {upload_id} in S3 (it expired or "
                                             "was deleted)") from None
    with svc.db.session() as s:
        uploads.complete(s, row.id)
        uploads.extend(s, row.id, _ttl())  # whole now: a job may be made from it for as long
    return jsonify(_payload(_row_or_404(upload_id), []))


@direct_api.delete("/api/v1/direct-uploads/<upload_id>")
def delete_direct_upload(upload_id: str) -> Response:
    """Abandon the upload: its parts in S3 and its record go (409 once it made a job)."""
    svc = _services()
    store = staging(svc)
    row = _row_or_404(upload_id)
    if row.job_id is not None:
        raise ApiError(409, "upload_used", f"upload {upload_id} made job {row.job_id}")
    store.abort_staged(row.id, row.multipart_id)
    with svc.db.session() as s:
        uploads.delete_uploads(s, [row.id])
    return Response(status=204)


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "send a JSON object")
    return body


def _ttl() -> dt.timedelta:
    return dt.timedelta(hours=_services().settings.upload_expire_hours)


def _row_or_404(upload_id: str) -> Upload:
    """The tenant's direct upload (a tus upload is none: it has its own routes)."""
    with _services().db.session() as s:
        row = uploads.get_upload(s, upload_id, auth.tenant_id())
        if row is None or row.multipart_id is None:
            raise ApiError(404, "not_found", f"no direct upload {upload_id} (or it expired)")
        s.expunge(row)
        return row


def _uploading(row: Upload) -> Upload:
    if row.completed_at is not None:
        raise ApiError(409, "upload_complete", f"upload {row.id} is complete: make a job from "
                                               "it with POST /api/v1/jobs upload=<id>")
    return row


def _part_count(row: Upload) -> int:
    return math.ceil(row.length / (row.part_size or 1))


def _part_bytes(row: Upload, number: int) -> int:
    """How long part ``number`` must be: the part size, the last part what is left."""
    size = row.part_size or 1
    return min(size, row.length - (number - 1) * size)


def _parts(store: S3BlobStore, row: Upload) -> list[StagedPart]:
    """The parts S3 has; none once the upload is complete (they are one object then)."""
    if row.completed_at is not None or row.multipart_id is None:
        return []
    try:
        return store.staged_parts(row.id, row.multipart_id)
    except BlobNotFound:
        raise ApiError(404, "not_found", f"no upload {row.id} in S3 (it expired or was "
                                         "deleted)") from None


def _payload(row: Upload, parts: list[StagedPart]) -> dict[str, Any]:
    state = ("used" if row.job_id is not None
             else "complete" if row.completed_at is not None else "uploading")
    return {"id": row.id, "name": row.name, "length": row.length, "part_size": row.part_size,
            "part_count": _part_count(row), "state": state, "expires_at": iso(row.expires_at),
            "job": row.job_id,
            "parts": [{"part": p.number, "etag": p.etag, "size": p.size} for p in parts]}


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (a message stays short for a thousand parts)."""
    out: list[str] = []
    for n in numbers:
        if out and n == int(out[-1].rsplit("-", 1)[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)
