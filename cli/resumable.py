"""The command line's side of resumable uploads (the tus 1.0.0 protocol, ``web.resumable``).

An archive goes up in chunks; after a broken connection, a timeout, a 5xx or a 429 the client
asks the server how much arrived (HEAD) and goes on from there, backing off while it makes no
progress. The upload's URL is kept in a small JSON file (``$MMBATCH_DATA_DIR/uploads.json``,
keyed by the file's path, size and modification time and by the server), so that running the
same ``mmbatch submit`` again after the command itself died resumes too.

The server speaks standard tus, so any tus client works against it (tus-js-client and Uppy in
a browser; ``tests/test_resumable.py`` uploads with the Python one, tuspy). The command line uses
this small client of its own because tuspy 1.1 sets no timeout on its requests (a stalled link
would hang the command forever), retries only some failures, and brings aiohttp and tinydb.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

TUS = {"Tus-Resumable": "1.0.0"}
CHUNK = 16 * 1024**2
TIMEOUT = (10.0, 300.0)  # connect, read (a chunk on a slow link, then the server's answer)


class UploadFailed(Exception):
    """The server refused the upload (a 4xx that retrying will not change), or the link kept
    failing; ``status`` and ``body`` are the server's answer where there was one."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


class UploadState:
    """Upload URLs by (file, server), in a JSON file written whole each time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def key(archive: Path, endpoint: str) -> str:
        st = archive.stat()
        what = f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}|{endpoint}"
        return hashlib.sha256(what.encode()).hexdigest()

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def put(self, key: str, url: str | None) -> None:
        data = self._read()
        if url is None:
            data.pop(key, None)
        else:
            data[key] = url
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)


def upload(http: requests.Session, endpoint: str, archive: Path, state: UploadState,
           progress: Callable[[int, int], None] | None = None, attempts: int = 8,
           backoff: float = 1.0, chunk: int = CHUNK) -> str:
    """Upload ``archive`` to the tus ``endpoint`` (…/api/v1/uploads), resuming an earlier try
    of the same file; the upload's URL once every byte has arrived. ``progress(offset, size)``
    is called as bytes are confirmed. Gives up after ``attempts`` failures in a row with no
    progress between them (waiting ``backoff`` × 2ⁿ seconds, at most 60, in between)."""
    size = archive.stat().st_size
    key = state.key(archive, endpoint)
    url = state.get(key)
    offset = _offset(http, url) if url else None
    if url is None or offset is None:
        url, offset = _create(http, endpoint, archive.name, size), 0
        state.put(key, url)
    if progress:
        progress(offset, size)
    failures = 0
    with open(archive, "rb") as f:
        while offset < size:
            f.seek(offset)
            body = f.read(chunk)
            try:
                r = http.patch(url, data=body, timeout=TIMEOUT,
                               headers={**TUS, "Upload-Offset": str(offset),
                                        "Content-Type": "application/offset+octet-stream"})
                if r.status_code == 409 and "Upload-Offset" in r.headers:
                    offset = int(r.headers["Upload-Offset"])  # the server knows better
                    continue
                if r.status_code == 429 or r.status_code >= 500 or error_code(r) == "upload_busy":
                    # (busy: a request of ours the link dropped still holds the upload, until
                    # the server gives up on its silence)
                    raise _Transient(float(r.headers.get("Retry-After") or 0))
                if r.status_code != 204:
                    raise UploadFailed(message_of(r), r.status_code, json_of(r))
                offset = int(r.headers["Upload-Offset"])
                failures = 0
            except (requests.ConnectionError, requests.Timeout, _Transient) as exc:
                failures += 1
                if failures >= attempts:
                    raise UploadFailed(f"the upload failed {failures} times in a row "
                                       f"({exc}); run the same command again to resume "
                                       f"from byte {offset}") from exc
                wait = exc.retry_after if isinstance(exc, _Transient) else 0.0
                time.sleep(max(wait, min(60.0, backoff * 2 ** (failures - 1))))
                arrived = _offset(http, url, quiet=True)
                if arrived is None:
                    raise UploadFailed("the server no longer has this upload (it expired or "
                                       "was deleted): run the command again to start over"
                                       ) from exc
                if arrived >= 0:  # (-1: the server could not be asked; the next PATCH will)
                    if arrived > offset:
                        failures = 0  # a cut connection still delivered part of the chunk
                    offset = arrived
            if progress:
                progress(offset, size)
    return url


def forget(state: UploadState, archive: Path, endpoint: str) -> None:
    """The upload made its job: a later submit of the same file is a new upload."""
    state.put(state.key(archive, endpoint), None)


class _Transient(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the server asked to retry after {retry_after:.0f}s")
        self.retry_after = retry_after


def _create(http: requests.Session, endpoint: str, name: str, size: int) -> str:
    meta = "filename " + base64.b64encode(name.encode()).decode()
    r = http.post(endpoint, timeout=TIMEOUT,  # a ConnectionError: the caller says what to do
                  headers={**TUS, "Upload-Length": str(size), "Upload-Metadata": meta})
    if r.status_code != 201 or "Location" not in r.headers:
        raise UploadFailed(message_of(r), r.status_code, json_of(r))
    return requests.compat.urljoin(endpoint, r.headers["Location"])  # type: ignore[no-any-return]


def _offset(http: requests.Session, url: str | None, quiet: bool = False) -> int | None:
    """How much of the upload at ``url`` the server has: None when it has no such upload
    (-1 when it could not be asked, with ``quiet``: the caller retries)."""
    if url is None:
        return None
    try:
        r = http.head(url, headers=TUS, timeout=TIMEOUT)
    except requests.RequestException:
        if quiet:
            return -1
        return None
    if r.status_code == 200 and "Upload-Offset" in r.headers:
        return int(r.headers["Upload-Offset"])
    if r.status_code == 429 or r.status_code >= 500:
        return -1 if quiet else None
    return None


def json_of(r: requests.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def error_code(r: requests.Response) -> str | None:
    body = json_of(r)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")  # type: ignore[no-any-return]
    return None


def message_of(r: requests.Response) -> str:
    body = json_of(r)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{r.status_code} {body['error'].get('code')}: {body['error'].get('message')}"
    return f"{r.status_code}: {r.text[:200]}"
