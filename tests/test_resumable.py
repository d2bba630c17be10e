"""Resumable uploads (tus 1.0.0) under /api/v1/uploads, and a job made from a finished one.

The app over a real SQLite database, its queue replaced by a recorder; a connection cut in the
middle of a PATCH is made with a raw socket against a real HTTP server (werkzeug's, threaded),
a link that keeps breaking with a TCP proxy that cuts every connection after 1.5 MB; the
command line resumes an upload an earlier run left, and tuspy (tus's Python client) uploads too.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from tusclient.client import TusClient
from werkzeug.serving import make_server

from cli import client as cli_client
from cli import main as cli_main
from cli.client import Client
from cli.resumable import UploadState, upload
from mmbatch.settings import Settings
from store import uploads
from store.blobs import BlobStoreUnavailable
from tests.conftest import make_key
from tests.util import TcpProxy, tar_bytes
from web.app import create_app

TUS = {"Tus-Resumable": "1.0.0"}
ARCHIVE = tar_bytes({f"item{i}.txt": f"caption number {i} ".encode() * 200 for i in range(40)})


def _app(tmp_path: Path, **overrides: Any) -> tuple[Any, Settings, list[Any]]:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"}, **overrides)
    key = make_key(settings.db_url)
    app = create_app(settings)
    sent: list[Any] = []
    app.extensions["mmbatch"].celery.send_task = lambda *a, **kw: sent.append(a)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client, settings, sent


@pytest.fixture
def app(tmp_path: Path) -> tuple[Any, Settings, list[Any]]:
    return _app(tmp_path)


def _create(client: Any, length: int, name: str = "photos.tar") -> str:
    meta = "filename " + base64.b64encode(name.encode()).decode()
    r = client.post("/api/v1/uploads", headers={**TUS, "Upload-Length": str(length),
                                                "Upload-Metadata": meta})
    assert r.status_code == 201, r.get_json()
    assert r.headers["Tus-Resumable"] == "1.0.0" and r.headers["Upload-Expires"]
    return str(r.headers["Location"]).rsplit("/", 1)[1]


def _patch(client: Any, upload: str, offset: int, body: bytes, **headers: str) -> Any:
    return client.patch(f"/api/v1/uploads/{upload}", data=body,
                        headers={**TUS, "Upload-Offset": str(offset),
                                 "Content-Type": "application/offset+octet-stream", **headers})


def _offset(client: Any, upload: str) -> int:
    r = client.head(f"/api/v1/uploads/{upload}", headers=TUS)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    return int(r.headers["Upload-Offset"])


def test_discovery_needs_no_key_and_says_what_the_server_speaks(app: Any) -> None:
    client, settings, _ = app
    r = client.options("/api/v1/uploads", headers={"Authorization": ""})
    assert r.status_code == 204
    assert (r.headers["Tus-Version"], r.headers["Tus-Resumable"]) == ("1.0.0", "1.0.0")
    assert set(r.headers["Tus-Extension"].split(",")) == {"creation", "termination",
                                                          "expiration"}
    assert int(r.headers["Tus-Max-Size"]) == settings.max_upload_bytes


def test_an_upload_in_pieces_becomes_a_job_once_whole(app: Any) -> None:
    client, settings, sent = app
    upload = _create(client, len(ARCHIVE))
    half = len(ARCHIVE) // 2
    assert _offset(client, upload) == 0
    r = _patch(client, upload, 0, ARCHIVE[:half])
    assert r.status_code == 204 and int(r.headers["Upload-Offset"]) == half
    assert _offset(client, upload) == half
    # not whole yet: no job
    early = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload})
    assert early.status_code == 409 and early.get_json()["error"]["code"] == "upload_incomplete"
    # a client that lost track sends from the wrong place: told where to go on
    r = _patch(client, upload, 0, ARCHIVE[:10])
    assert r.status_code == 409 and r.headers["Upload-Offset"] == str(half)
    assert r.get_json()["error"]["code"] == "offset_mismatch"
    r = _patch(client, upload, half, ARCHIVE[half:])
    assert r.status_code == 204 and int(r.headers["Upload-Offset"]) == len(ARCHIVE)
    assert not sent
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload},
                    headers={"Idempotency-Key": "once"})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["archive"]["name"] == "photos.tar" and job["archive"]["bytes"] == len(ARCHIVE)
    assert len(sent) == 1  # ingest enqueued
    blobs = client.application.extensions["mmbatch"].blobs
    digest = hashlib.sha256(ARCHIVE).hexdigest()
    assert blobs.read(digest) == ARCHIVE  # the blob the job reads
    assert not uploads.part_path(blobs.spool_dir, upload).exists()
    # the same request again answers the same job; another use of the upload is refused
    again = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload},
                        headers={"Idempotency-Key": "once"})
    assert again.status_code == 200 and again.get_json()["id"] == job["id"]
    used = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload})
    assert used.status_code == 409 and used.get_json()["error"]["code"] == "upload_used"
    assert _offset(client, upload) == len(ARCHIVE)
    r = _patch(client, upload, len(ARCHIVE), b"x")
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "upload_used"


@pytest.mark.parametrize("headers, status, code", [
    ({}, 412, "unsupported_tus_version"),
    ({**TUS, "Upload-Length": "0"}, 400, "invalid_upload_length"),
    ({**TUS, "Upload-Length": "-5"}, 400, "invalid_upload_length"),
    ({**TUS, "Upload-Length": "many"}, 400, "invalid_upload_length"),
    ({**TUS, "Upload-Length": "\u00b2"}, 400, "invalid_upload_length"),  # a digit int() refuses
    ({**TUS, "Upload-Defer-Length": "1"}, 400, "invalid_upload_length"),
    ({**TUS, "Upload-Length": str(10**13)}, 413, "request_entity_too_large"),
    ({**TUS, "Upload-Length": "10", "Upload-Metadata": "filename ***"}, 400,
     "invalid_upload_metadata"),
])
def test_bad_creations_are_4xx(app: Any, headers: dict[str, str], status: int,
                               code: str) -> None:
    r = app[0].post("/api/v1/uploads", headers=headers)
    assert r.status_code == status and r.get_json()["error"]["code"] == code, r.get_json()
    if status == 412:
        assert r.headers["Tus-Version"] == "1.0.0"


def test_bad_appends_are_4xx_and_keep_nothing(app: Any) -> None:
    client = app[0]
    upload = _create(client, 100)
    r = client.patch(f"/api/v1/uploads/{upload}", data=b"abc",
                     headers={**TUS, "Upload-Offset": "0", "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert _patch(client, upload, 0, b"a" * 101).status_code == 413
    r = _patch(client, upload, 0, b"abc", **{"Upload-Offset": "x"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_upload_offset"
    assert _offset(client, upload) == 0
    assert _patch(client, "0" * 32, 0, b"abc").status_code == 404
    assert client.head("/api/v1/uploads/../../etc", headers=TUS).status_code == 404


def test_what_is_not_an_archive_makes_no_job(app: Any) -> None:
    client = app[0]
    upload = _create(client, 11)
    assert _patch(client, upload, 0, b"hello world").status_code == 204
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload})
    assert r.status_code == 415 and r.get_json()["error"]["code"] == "invalid_archive"
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": "f" * 32})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "unknown_upload"


def test_another_tenant_sees_no_upload(app: Any) -> None:
    client, settings, _ = app
    upload = _create(client, 100)
    other = client.application.test_client()
    other.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_key(settings.db_url, 'other')}"
    assert other.head(f"/api/v1/uploads/{upload}", headers=TUS).status_code == 404
    assert _patch(other, upload, 0, b"abc").status_code == 404
    assert other.delete(f"/api/v1/uploads/{upload}", headers=TUS).status_code == 404
    r = other.post("/api/v1/jobs", data={"kind": "embed", "upload": upload})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "unknown_upload"


def test_an_abandoned_upload_is_deleted_or_expires(tmp_path: Path) -> None:
    client, settings, _ = _app(tmp_path, upload_expire_hours=1 / 3600)  # a second
    spool = client.application.extensions["mmbatch"].blobs.spool_dir
    gone = _create(client, 100)
    assert client.delete(f"/api/v1/uploads/{gone}", headers=TUS).status_code == 204
    assert client.head(f"/api/v1/uploads/{gone}", headers=TUS).status_code == 404
    assert not uploads.part_path(spool, gone).exists()
    stale = _create(client, 100)
    assert _patch(client, stale, 0, b"abc").status_code == 204
    time.sleep(1.2)
    assert client.head(f"/api/v1/uploads/{stale}", headers=TUS).status_code == 404
    _create(client, 100)  # the next upload clears what expired
    assert not uploads.part_path(spool, stale).exists()


@pytest.fixture
def server(app: Any) -> Iterator[str]:
    srv = make_server("127.0.0.1", 0, app[0].application, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        thread.join(timeout=10)


def test_a_connection_cut_mid_body_keeps_what_arrived(app: Any, server: str) -> None:
    client = app[0]
    upload = _create(client, len(ARCHIVE))
    key = client.environ_base["HTTP_AUTHORIZATION"]
    host, port = server.split(":")
    sent = 4096 * 3
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"PATCH /api/v1/uploads/{upload} HTTP/1.1\r\nHost: {server}\r\n"
                      f"Authorization: {key}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
                      "Content-Type: application/offset+octet-stream\r\n"
                      f"Content-Length: {len(ARCHIVE)}\r\n\r\n").encode() + ARCHIVE[:sent])
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while _offset(client, upload) < sent and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _offset(client, upload) == sent  # resumable from there
    r = _patch(client, upload, sent, ARCHIVE[sent:])
    while r.status_code == 409 and r.get_json()["error"]["code"] == "upload_busy" \
            and time.monotonic() < deadline:  # the cut request's handler is still closing
        time.sleep(0.1)
        r = _patch(client, upload, sent, ARCHIVE[sent:])
    assert r.status_code == 204 and int(r.headers["Upload-Offset"]) == len(ARCHIVE)
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload})
    assert r.status_code == 202
    assert r.get_json()["archive"]["bytes"] == len(ARCHIVE)


BIG = tar_bytes({f"clip{i}.txt": bytes(range(256)) * 2048 for i in range(12)})  # ~6 MiB


def test_a_link_that_keeps_breaking_still_delivers_every_byte(app: Any, server: str,
                                                              tmp_path: Path) -> None:
    client = app[0]
    archive = tmp_path / "big.tar"
    archive.write_bytes(BIG)
    host, port = server.split(":")
    proxy = TcpProxy((host, int(port)), budget=1_500_000)
    proxy.restore()
    http = requests.Session()
    http.headers["Authorization"] = client.environ_base["HTTP_AUTHORIZATION"]
    state = UploadState(tmp_path / "uploads.json")
    seen: list[int] = []
    try:
        url = upload(http, f"http://127.0.0.1:{proxy.port}/api/v1/uploads", archive, state,
                     progress=lambda done, total: seen.append(done), backoff=0.01,
                     chunk=4 * 1024**2)
    finally:
        proxy.cut()
    assert proxy.cuts >= 3  # the link broke again and again
    assert seen[-1] == len(BIG) and seen == sorted(seen)
    upload_id = url.rsplit("/", 1)[1]
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload_id})
    assert r.status_code == 202, r.get_json()
    blobs = client.application.extensions["mmbatch"].blobs
    assert blobs.read(hashlib.sha256(BIG).hexdigest()) == BIG  # every byte, once, in order


def test_the_command_line_resumes_where_an_earlier_run_stopped(app: Any, server: str,
                                                               tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    client = app[0]
    archive = tmp_path / "big.tar"
    archive.write_bytes(BIG)
    key = client.environ_base["HTTP_AUTHORIZATION"].removeprefix("Bearer ")
    base = f"http://{server}"
    state = UploadState(tmp_path / "data" / "uploads.json")

    def die_after_the_first_chunk(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt  # the command was stopped

    first = Client(base, api_key=key)
    with pytest.raises(KeyboardInterrupt):
        upload(first.http, base + "/api/v1/uploads", archive, state,
               progress=die_after_the_first_chunk, chunk=1024**2)
    # the same command again, as a new process would run it: the CLI itself
    monkeypatch.setenv("MMBATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMBATCH_URL", base)
    monkeypatch.setenv("MMBATCH_API_KEY", key)
    resumed_from: list[int] = []
    real_upload = cli_client.upload

    def watch(*args: Any, **kwargs: Any) -> str:
        progress = kwargs["progress"]

        def spy(done: int, total: int) -> None:
            resumed_from.append(done)
            progress(done, total)
        return real_upload(*args, **{**kwargs, "progress": spy})

    monkeypatch.setattr(cli_client, "upload", watch)
    out = CliRunner().invoke(cli_main.main, ["submit", str(archive), "--kind", "embed"])
    assert out.exit_code == 0, out.output
    assert resumed_from[0] >= 1024**2  # not from zero
    job_id = out.output.strip().splitlines()[-1].split()[1]
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["archive"] == {"name": "big.tar", "bytes": len(BIG)}
    assert state.get(UploadState.key(archive, base + "/api/v1/uploads")) is None  # forgotten


def test_a_standard_tus_client_uploads_to_it(app: Any, server: str, tmp_path: Path) -> None:
    """tuspy, the tus protocol's own Python client, against this server."""
    client = app[0]
    archive = tmp_path / "photos.tar"
    archive.write_bytes(ARCHIVE)
    tus = TusClient(f"http://{server}/api/v1/uploads",
                    headers={"Authorization": client.environ_base["HTTP_AUTHORIZATION"]})
    uploader = tus.uploader(str(archive), chunk_size=4096, metadata={"filename": "photos.tar"})
    uploader.upload()
    r = client.post("/api/v1/jobs",
                    data={"kind": "embed", "upload": uploader.url.rsplit("/", 1)[1]})
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["archive"] == {"name": "photos.tar", "bytes": len(ARCHIVE)}


def _whole_upload(client: Any, data: bytes) -> str:
    upload = _create(client, len(data))
    assert _patch(client, upload, 0, data).status_code == 204
    return upload


def test_two_requests_naming_one_upload_make_one_job(app: Any, server: str) -> None:
    client = app[0]
    upload = _whole_upload(client, ARCHIVE)
    key = client.environ_base["HTTP_AUTHORIZATION"]
    answers: list[Any] = []
    start = threading.Barrier(2)

    def make_job() -> None:
        start.wait(timeout=30)
        answers.append(requests.post(f"http://{server}/api/v1/jobs", timeout=60,
                                     headers={"Authorization": key},
                                     data={"kind": "embed", "upload": upload}))

    threads = [threading.Thread(target=make_job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in answers) == [202, 409], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 409)
    assert refused.json()["error"]["code"] == "upload_used"


def test_a_storage_failure_keeps_the_upload_for_a_retry(app: Any, monkeypatch: Any) -> None:
    client = app[0]
    upload = _whole_upload(client, ARCHIVE)
    blobs = client.application.extensions["mmbatch"].blobs
    install = blobs._install

    def unavailable(path: Path, digest: str) -> None:
        raise BlobStoreUnavailable("the bucket did not answer")

    monkeypatch.setattr(blobs, "_install", unavailable)
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "storage_unavailable"
    assert uploads.part_path(blobs.spool_dir, upload).exists()  # nothing lost
    monkeypatch.setattr(blobs, "_install", install)
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": upload})
    assert r.status_code == 202, r.get_json()
    assert blobs.read(hashlib.sha256(ARCHIVE).hexdigest()) == ARCHIVE
