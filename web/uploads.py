"""Multipart uploads streamed straight into blob storage, never held whole in memory."""

from __future__ import annotations

from typing import IO

from flask import Request, current_app, g

from store.blobs import BlobWriter


class StreamingRequest(Request):
    """Each uploaded file part is written into a hashing blob writer as it arrives."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None,
                         content_length: int | None = None) -> IO[bytes]:
        writer = current_app.extensions["mmbatch"].blobs.writer()
        g.setdefault("upload_writers", []).append(writer)
        return writer  # type: ignore[return-value]


def discard_uploads(_exc: BaseException | None = None) -> None:
    """Remove what an upload left behind unless it was committed to a job."""
    for writer in g.pop("upload_writers", []):
        writer.discard()


def writer_of(storage: object) -> BlobWriter | None:
    stream = getattr(storage, "stream", None)
    return stream if isinstance(stream, BlobWriter) else None


def read_upload(storage: object, limit: int) -> bytes | None:
    """The bytes of a small uploaded file (a search's example), or None when it holds more
    than ``limit`` bytes. The part was streamed into a spooled blob writer, not memory."""
    writer = writer_of(storage)
    if writer is None:
        data = storage.read(limit + 1)  # type: ignore[attr-defined]
        return None if len(data) > limit else bytes(data)
    writer.flush()
    if writer.size > limit:
        return None
    return writer.path.read_bytes()


def archive_name(storage: object) -> str:
    """The uploaded file's name as a job records it (``clean_name``)."""
    return clean_name(getattr(storage, "filename", None))


def clean_name(raw: str | None) -> str:
    """An archive's name as a job records it: control characters (NUL among them, which
    PostgreSQL refuses in text) dropped, at most 255 characters, ``archive`` when none is left."""
    name = "".join(c for c in raw or "" if c.isprintable())
    return (name or "archive")[:255]
