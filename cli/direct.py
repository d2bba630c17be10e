"""The command line's side of direct uploads (``web.direct_uploads``): with blobs in S3, the
archive goes straight to object storage in the parts of an S3 multipart upload, each a plain
HTTP PUT to a presigned URL the API hands out, so the API's machines never carry the bytes.

After a broken connection, a timeout, a 5xx or a 429 the client asks the API which parts S3
has (it lists them) and goes on with the others, backing off while it makes no progress; an
expired URL (403) is asked for again. The upload's URL is kept in the same small JSON file as
tus uploads (``cli.resumable.UploadState``), so running the same ``mmbatch submit`` again after
the command itself died resumes too. Only HTTP here: S3 is reached through the URLs alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import requests

from cli.resumable import TIMEOUT, UploadFailed, UploadState, error_code, json_of, message_of

URLS_PER_REQUEST = 100


class DirectUnavailable(Exception):
    """The server keeps blobs on disk (or knows no direct uploads): upload with tus instead."""


def endpoint_of(base: str) -> str:
    return f"{base.rstrip('/')}/api/v1/direct-uploads"


def upload_direct(http: requests.Session, base: str, archive: Path, state: UploadState,
                  progress: Callable[[int, int], None] | None = None, attempts: int = 8,
                  backoff: float = 1.0) -> str:
    """Upload ``archive`` straight to S3 through the API at ``base``, resuming an earlier try of
    the same file; the upload's id once it is complete. ``progress(bytes, size)`` follows the
    bytes sent. DirectUnavailable when the server does not offer direct uploads; UploadFailed
    after ``attempts`` failures in a row with no progress between them (waiting ``backoff`` ×
    2ⁿ seconds, at most 60, in between)."""
    endpoint = endpoint_of(base)
    size = archive.stat().st_size
    key = state.key(archive, endpoint)
    url = state.get(key)
    info = _status(http, url) if url else None
    if url is None or info is None:
        url, info = _create(http, endpoint, archive.name, size)
        state.put(key, url)
    report = progress or (lambda done, total: None)
    if info["state"] != "uploading":
        report(size, size)
        return str(info["id"])
    part_size, count = int(info["part_size"]), int(info["part_count"])

    def length(n: int) -> int:
        return min(part_size, size - (n - 1) * part_size)

    etags: dict[int, str] = {}

    def learn(parts: list[dict[str, Any]]) -> None:  # what S3 has, whole
        etags.update({p["part"]: p["etag"] for p in parts if p["size"] == length(p["part"])})

    learn(info["parts"])
    urls: dict[int, str] = {}
    s3 = requests.Session()  # no API key: the presigned URL is the whole authority
    failures = 0
    with open(archive, "rb") as f:
        while todo := [n for n in range(1, count + 1) if n not in etags]:
            done = sum(length(n) for n in etags)
            report(done, size)
            n = todo[0]
            try:
                if n not in urls:
                    urls.update(_urls(http, url, todo[:URLS_PER_REQUEST]))
                body = _Part(f, (n - 1) * part_size, length(n),
                             lambda sent, done=done: report(done + sent, size))
                r = s3.put(urls[n], data=body, timeout=TIMEOUT)
                if r.status_code == 403:  # the URL expired (or was refused): ask anew
                    urls.clear()
                    raise _Transient(f"S3 refused the part's URL ({r.status_code})")
                if r.status_code == 429 or r.status_code >= 500:
                    raise _Transient(f"S3 answered {r.status_code}")
                if r.status_code != 200 or "ETag" not in r.headers:
                    raise UploadFailed(f"S3 refused part {n}: {r.status_code} {r.text[:200]}",
                                       r.status_code)
                etags[n] = r.headers["ETag"]
                failures = 0
            except (requests.ConnectionError, requests.Timeout, _Transient) as exc:
                failures += 1
                if failures >= attempts:
                    raise UploadFailed(f"the upload failed {failures} times in a row ({exc}); "
                                       "run the same command again to resume") from exc
                time.sleep(min(60.0, backoff * 2 ** (failures - 1)))
                try:
                    info = _status(http, url, quiet=True)
                except (requests.ConnectionError, requests.Timeout):
                    continue  # the API is away too: the next try asks again
                if info is None:
                    raise UploadFailed("the server no longer has this upload (it expired or "
                                       "was deleted): run the command again to start over"
                                       ) from exc
                before = len(etags)
                learn(info.get("parts", []))
                if len(etags) > before:
                    failures = 0  # S3 had it after all: the answer was what got lost
    report(size, size)
    return _complete(http, url, etags)


class _Part:
    """``length`` bytes of ``f`` from ``offset``, read as the connection sends them (never a
    whole part in memory), telling ``sent`` how far it got; ``len`` gives the request its
    Content-Length (S3 takes no chunked parts)."""

    def __init__(self, f: BinaryIO, offset: int, length: int,
                 sent: Callable[[int], None]) -> None:
        self.f, self.offset, self.length, self.sent = f, offset, length, sent
        self.pos = 0
        f.seek(offset)

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        want = self.length - self.pos if size < 0 else min(size, self.length - self.pos)
        self.f.seek(self.offset + self.pos)
        chunk = self.f.read(want) if want > 0 else b""
        self.pos += len(chunk)
        self.sent(self.pos)
        return chunk


class _Transient(Exception):
    pass


def _create(http: requests.Session, endpoint: str, name: str, size: int
            ) -> tuple[str, dict[str, Any]]:
    r = http.post(endpoint, json={"length": size, "filename": name}, timeout=TIMEOUT)
    if r.status_code in (404, 405) or error_code(r) == "direct_upload_unavailable":
        raise DirectUnavailable(message_of(r))
    if r.status_code != 201 or "Location" not in r.headers:
        raise UploadFailed(message_of(r), r.status_code, json_of(r))
    url = requests.compat.urljoin(endpoint, r.headers["Location"])
    return url, r.json()


def _status(http: requests.Session, url: str | None, quiet: bool = False
            ) -> dict[str, Any] | None:
    """The upload and the parts S3 has; None when the server has no such upload (or, unless
    ``quiet``, cannot be asked: a fresh upload then)."""
    if url is None:
        return None
    try:
        r = http.get(url, timeout=TIMEOUT)
    except (requests.ConnectionError, requests.Timeout):
        if quiet:
            raise
        return None
    if r.status_code == 200:
        return r.json()  # type: ignore[no-any-return]
    if quiet and (r.status_code == 429 or r.status_code >= 500):
        raise requests.ConnectionError(message_of(r))
    return None


def _urls(http: requests.Session, url: str, parts: list[int]) -> dict[int, str]:
    r = http.post(url + "/urls", json={"parts": parts}, timeout=TIMEOUT)
    if r.status_code == 429 or r.status_code >= 500:
        raise _Transient(message_of(r))
    if r.status_code != 200:
        raise UploadFailed(message_of(r), r.status_code, json_of(r))
    return {u["part"]: u["url"] for u in r.json()["urls"]}


def _complete(http: requests.Session, url: str, etags: dict[int, str]) -> str:
    body = {"parts": [{"part": n, "etag": etag} for n, etag in sorted(etags.items())]}
    for attempt in range(3):  # completing twice is harmless: a lost answer is asked again
        try:
            r = http.post(url + "/complete", json=body, timeout=TIMEOUT)
        except (requests.ConnectionError, requests.Timeout):
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
            continue
        if r.status_code == 200:
            return str(r.json()["id"])
        if r.status_code < 500 and r.status_code != 429:
            break
        time.sleep(1.0 + attempt)
    raise UploadFailed(message_of(r), r.status_code, json_of(r))
