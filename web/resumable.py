"""Resumable uploads under /api/v1/uploads: the tus protocol 1.0.0 (core, creation,
termination, expiration), so that a multi-gigabyte archive over a flaky link goes on from where
it stopped instead of from zero. Any tus client works (``mmbatch submit`` uses tuspy).

``POST /api/v1/uploads`` (``Upload-Length``, ``Upload-Metadata: filename <base64>``) makes an
upload and answers its ``Location``; ``PATCH`` appends at ``Upload-Offset``
(``application/offset+octet-stream``); ``HEAD`` says how much has arrived; ``DELETE`` abandons it.
Once whole, ``POST /api/v1/jobs`` with the form field ``upload=<id>`` (and kind, model and options
as with an archive) makes the job (``web.service.submit_job``): as before, no job exists until its
archive is whole.

The bytes so far are one file per upload on this web machine (``store.uploads.part_path``); its
size is the offset, so what a cut connection delivered is kept, and a lock on it keeps two PATCHes
of one upload apart. Several web machines need sticky routing of ``/api/v1/uploads/<id>`` (or a
shared data directory). Uploads nobody finishes are removed after MMBATCH_UPLOAD_EXPIRE_HOURS,
when the next upload is made.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fcntl
import logging
import os
import uuid
from typing import Any

from flask import Blueprint, Response, current_app, request, url_for
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import http_date

from store import uploads
from store.schema import Upload
from web import auth
from web.errors import ApiError
from web.service import Services, prune_uploads
from web.uploads import clean_name

log = logging.getLogger(__name__)

uploads_api = Blueprint("uploads_api", __name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,termination,expiration"
OFFSET_TYPE = "application/offset+octet-stream"
CHUNK = 1 << 20
READ_TIMEOUT = 60.0  # seconds of silence in a PATCH body before it counts as cut


def _services() -> Services:
    return current_app.extensions["mmbatch"]  # type: ignore[no-any-return]


@uploads_api.before_request
def _guard() -> None:
    """An API key, and the protocol version this server speaks (412 otherwise); discovery
    (OPTIONS) needs neither."""
    if request.method == "OPTIONS":
        return
    auth.authenticate()
    if request.headers.get("Tus-Resumable") != TUS_VERSION:
        raise ApiError(412, "unsupported_tus_version",
                       f"send the header Tus-Resumable: {TUS_VERSION} (the tus protocol "
                       "version this server speaks)", headers={"Tus-Version": TUS_VERSION})


@uploads_api.after_request
def _tus_headers(response: Response) -> Response:
    response.headers["Tus-Resumable"] = TUS_VERSION
    return response


@uploads_api.route("/api/v1/uploads", methods=["POST", "OPTIONS"])
def create_upload() -> Response:
    """Make an upload of ``Upload-Length`` bytes (201 and its Location); OPTIONS says what this
    server supports."""
    svc = _services()
    if request.method == "OPTIONS":
        response = Response(status=204)
        response.headers.update({"Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS,
                                 "Tus-Max-Size": str(svc.settings.max_upload_bytes)})
        return response
    if "Upload-Defer-Length" in request.headers:
        raise ApiError(400, "invalid_upload_length",
                       "send Upload-Length: this server needs the size up front")
    length = _length(request.headers.get("Upload-Length"), svc.settings.max_upload_bytes)
    name = _filename(request.headers.get("Upload-Metadata", ""))
    prune_uploads(svc)
    upload_id = uuid.uuid4().hex
    path = uploads.part_path(svc.blobs.spool_dir, upload_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=False)
    try:
        with svc.db.session() as s:
            row = uploads.create_upload(
                s, upload_id, auth.tenant_id(), auth.current().key_id, name, length,
                _ttl())
            expires = row.expires_at
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    response = Response(status=201)
    response.headers["Location"] = url_for("uploads_api.upload_offset", upload_id=upload_id,
                                           _external=True)
    response.headers["Upload-Expires"] = http_date(expires)
    return response


@uploads_api.route("/api/v1/uploads/<upload_id>", methods=["HEAD"])
def upload_offset(upload_id: str) -> Response:
    """How much of the upload has arrived (``Upload-Offset``) out of ``Upload-Length``."""
    row = _upload_or_404(upload_id)
    return _offset_response(row, 200, _arrived(row))


@uploads_api.patch("/api/v1/uploads/<upload_id>")
def append(upload_id: str) -> Response:
    """Append the body at ``Upload-Offset`` (409 when that is not how much has arrived). What
    arrives is kept even when the connection breaks mid-body: HEAD then says where to go on."""
    if request.mimetype != OFFSET_TYPE:
        raise ApiError(415, "invalid_content_type", f"send the bytes as {OFFSET_TYPE}")
    offset = _int_header("Upload-Offset", "invalid_upload_offset")
    row = _upload_or_404(upload_id)
    if row.job_id is not None or row.archive_blob is not None:
        raise ApiError(409, "upload_used", f"upload {upload_id} is whole and made job "
                                           f"{row.job_id}")
    path = uploads.part_path(_services().blobs.spool_dir, upload_id)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"no upload {upload_id} on this server") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ApiError(409, "upload_busy", "another request is appending to this upload; "
                                               "ask HEAD for the offset and go on") from None
        arrived = f.seek(0, os.SEEK_END)
        if offset != arrived:
            raise ApiError(409, "offset_mismatch", f"{arrived} bytes have arrived, not "
                                                   f"{offset}: send from there",
                           headers={"Upload-Offset": str(arrived)})
        room = row.length - arrived
        _read_timeout()
        if request.content_length is not None and request.content_length > room:
            raise ApiError(413, "upload_too_long", f"the upload takes {room} more bytes, not "
                                                   f"{request.content_length}")
        written = 0
        try:
            while written < room:
                chunk = request.stream.read(min(CHUNK, room - written))
                if not chunk:
                    break
                f.write(chunk)
                written += len(chunk)
        except (ClientDisconnected, OSError) as exc:  # gone, or silent past READ_TIMEOUT
            log.info("upload_interrupted upload=%s kept=%d why=%s", upload_id, written,
                     type(exc).__name__)
        finally:
            f.flush()
            os.fsync(f.fileno())
    if written == room and request.content_length is None and request.stream.read(1):
        raise ApiError(413, "upload_too_long", f"the upload is {row.length} bytes; the bytes "
                                               "past its end were not kept",
                       headers={"Upload-Offset": str(row.length)})
    with _services().db.session() as s:  # still arriving: not abandoned
        row.expires_at = uploads.extend(s, upload_id, _ttl())
    return _offset_response(row, 204, arrived + written)


@uploads_api.delete("/api/v1/uploads/<upload_id>")
def terminate(upload_id: str) -> Response:
    """Abandon the upload: its bytes and its record go."""
    svc = _services()
    with svc.db.session() as s:
        row = uploads.get_upload(s, upload_id, auth.tenant_id(), lock=True)
        if row is None or row.multipart_id is not None:
            raise ApiError(404, "not_found", f"no upload {upload_id}")
        uploads.delete_uploads(s, [upload_id])
    uploads.part_path(svc.blobs.spool_dir, upload_id).unlink(missing_ok=True)
    return Response(status=204)


def _ttl() -> dt.timedelta:
    return dt.timedelta(hours=_services().settings.upload_expire_hours)


def _read_timeout() -> None:
    """A PATCH whose client went silent without closing (a dropped Wi-Fi, a NAT that forgot
    it) must not hold the upload's lock and a request thread for ever: under gunicorn, reading
    its body gives up after READ_TIMEOUT seconds of silence, keeping what arrived."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(READ_TIMEOUT)


def _upload_or_404(upload_id: str) -> Upload:
    with _services().db.session() as s:
        row = uploads.get_upload(s, upload_id, auth.tenant_id())
        if row is None or row.multipart_id is not None:  # (a direct upload: not tus's)
            raise ApiError(404, "not_found", f"no upload {upload_id} (or it expired)")
        s.expunge(row)
        return row


def _arrived(row: Upload) -> int:
    """Bytes arrived so far: the file's size, or all of them once a job took the file."""
    if row.archive_blob is not None:
        return row.length
    try:
        return uploads.part_path(_services().blobs.spool_dir, row.id).stat().st_size
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"no upload {row.id} on this server") from None


def _offset_response(row: Upload, status: int, offset: int) -> Response:
    response = Response(status=status)
    response.headers.update({"Upload-Offset": str(offset), "Upload-Length": str(row.length),
                             "Upload-Expires": http_date(row.expires_at),
                             "Cache-Control": "no-store"})
    return response


def _length(raw: str | None, limit: int) -> int:
    if raw is None or not _whole(raw) or int(raw) < 1:
        raise ApiError(400, "invalid_upload_length",
                       "send Upload-Length: the archive's size in bytes (at least 1)")
    if int(raw) > limit:
        raise ApiError(413, "request_entity_too_large",
                       f"an archive is at most {limit} bytes (MMBATCH_MAX_UPLOAD_BYTES)")
    return int(raw)


def _int_header(name: str, code: str) -> int:
    raw = request.headers.get(name, "")
    if not _whole(raw):
        raise ApiError(400, code, f"send {name}: a whole number of bytes")
    return int(raw)


def _whole(raw: str) -> bool:
    """A whole number in ASCII digits (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    raw = raw.strip()
    return raw.isascii() and raw.isdecimal()


def _filename(raw: str) -> str:
    """The archive's name from ``Upload-Metadata`` (``filename`` or ``name``, base64)."""
    values: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        key, _, value = pair.partition(" ")
        try:
            values[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise ApiError(400, "invalid_upload_metadata",
                           f"Upload-Metadata's {key!r} is not base64 of UTF-8 text") from None
    return clean_name(values.get("filename") or values.get("name"))
