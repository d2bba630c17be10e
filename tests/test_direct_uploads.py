"""Direct uploads to S3 in presigned parts (/api/v1/direct-uploads), and jobs made from them.

The app over a real SQLite database (its queue replaced by a recorder) with blobs in a bucket of
moto's S3 server, which runs as a real HTTP server, so the parts go up by plain HTTP PUTs to the
presigned URLs from this test, never through the app: every request the app receives is
recorded with its size. A connection cut mid-part is a raw socket to the S3 server; the ingest
worker's code adopts the staged archive in-process; the command line resumes a run it stopped.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import requests
from click.testing import CliRunner
from werkzeug.serving import make_server

from cli import direct as cli_direct
from cli import main as cli_main
from cli.client import Client
from cli.direct import upload_direct
from cli.resumable import UploadState
from mmbatch.settings import Settings
from store import jobs
from store.schema import Upload
from tests.conftest import make_key
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY, make_bucket, s3_env
from tests.util import tar_bytes
from web.app import create_app
from worker.ingest import ingest_job
from worker.runtime import Runtime

MiB = 1024**2
# Two parts at the 5 MiB least part size S3 takes (the last may be shorter): 5 MiB + 1 MiB.
BIG = tar_bytes({f"clip{i}.txt": bytes(range(256)) * 2048 for i in range(12)})


class Recorder:
    """WSGI middleware: every request the app receives, with its body's declared size."""

    def __init__(self, app: Any) -> None:
        self.app, self.seen = app, []

    def __call__(self, environ: dict[str, Any], start: Any) -> Any:
        self.seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"],
                          int(environ.get("CONTENT_LENGTH") or 0)))
        return self.app(environ, start)


def _app(tmp_path: Path, endpoint: str | None, **overrides: Any
         ) -> tuple[Any, Settings, list[Any], Recorder]:
    env = {"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_BROKER_URL": "memory://",
           "MMBATCH_DIRECT_PART_BYTES": str(5 * MiB)}
    if endpoint is not None:
        env.update(s3_env(endpoint, make_bucket(endpoint)))
    settings = Settings.from_env(env, **overrides)
    key = make_key(settings.db_url)
    app = create_app(settings)
    sent: list[Any] = []
    app.extensions["mmbatch"].celery.send_task = lambda *a, **kw: sent.append(a)
    recorder = Recorder(app.wsgi_app)
    app.wsgi_app = recorder  # type: ignore[method-assign]
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client, settings, sent, recorder


@pytest.fixture
def app(s3_endpoint: str, tmp_path: Path) -> tuple[Any, Settings, list[Any], Recorder]:
    return _app(tmp_path, s3_endpoint)


def _s3(settings: Settings) -> Any:
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=REGION,
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def _start(client: Any, data: bytes, name: str = "clips.tar") -> dict[str, Any]:
    r = client.post("/api/v1/direct-uploads", json={"length": len(data), "filename": name})
    assert r.status_code == 201, r.get_json()
    assert r.headers["Location"].endswith(f"/api/v1/direct-uploads/{r.get_json()['id']}")
    return r.get_json()  # type: ignore[no-any-return]


def _urls(client: Any, upload: str, parts: list[int]) -> dict[int, str]:
    r = client.post(f"/api/v1/direct-uploads/{upload}/urls", json={"parts": parts})
    assert r.status_code == 200, r.get_json()
    return {u["part"]: u["url"] for u in r.get_json()["urls"]}


def _put(url: str, body: bytes) -> str:
    r = requests.put(url, data=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["ETag"]


def _cut_mid_part(url: str, body: bytes) -> None:
    """A PUT whose connection breaks after half the part's bytes."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall((f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:len(body) // 2])
        time.sleep(0.3)


def test_parts_go_to_s3_and_the_job_reads_them_there(app: Any) -> None:
    client, settings, sent, recorder = app
    up = _start(client, BIG)
    assert (up["state"], up["part_size"], up["part_count"], up["parts"]) == \
        ("uploading", 5 * MiB, 2, [])
    urls = _urls(client, up["id"], [1, 2])
    first = _put(urls[1], BIG[:5 * MiB])
    _cut_mid_part(urls[2], BIG[5 * MiB:])
    # too early: no job, and completing tells what S3 lacks
    early = client.post("/api/v1/jobs", data={"kind": "embed", "upload": up["id"]})
    assert early.status_code == 409 and early.get_json()["error"]["code"] == "upload_incomplete"
    r = client.post(f"/api/v1/direct-uploads/{up['id']}/complete",
                    json={"parts": [{"part": 1, "etag": first}, {"part": 2, "etag": '"x"'}]})
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "upload_incomplete"
    # resume: what does S3 have?
    status = client.get(f"/api/v1/direct-uploads/{up['id']}").get_json()
    assert [(p["part"], p["size"]) for p in status["parts"]] == [(1, 5 * MiB)]
    second = _put(_urls(client, up["id"], [2])[2], BIG[5 * MiB:])
    r = client.post(f"/api/v1/direct-uploads/{up['id']}/complete",
                    json={"parts": [{"part": 1, "etag": first}, {"part": 2, "etag": second}]})
    assert r.status_code == 200 and r.get_json()["state"] == "complete", r.get_json()
    assert not sent
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": up["id"]},
                    headers={"Idempotency-Key": "once"})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["archive"] == {"name": "clips.tar", "bytes": len(BIG)} and len(sent) == 1
    again = client.post("/api/v1/jobs", data={"kind": "embed", "upload": up["id"]},
                        headers={"Idempotency-Key": "once"})
    assert again.status_code == 200 and again.get_json()["id"] == job["id"]
    used = client.post("/api/v1/jobs", data={"kind": "embed", "upload": up["id"]})
    assert used.status_code == 409 and used.get_json()["error"]["code"] == "upload_used"
    # the app never carried the archive: small JSON bodies only, and no PATCH or PUT at all
    assert all(method in ("GET", "POST") for method, _, _ in recorder.seen), recorder.seen
    assert sum(size for _, _, size in recorder.seen) < 16 * 1024

    # The ingest worker reads the staged object, makes it a blob, and the staged copy goes.
    rt = Runtime(settings)
    try:
        batches = ingest_job(rt, job["id"])
        digest = hashlib.sha256(BIG).hexdigest()
        with rt.db.session() as s:
            row = jobs.get_job(s, job["id"])
            assert (row.archive_blob, row.total) == (digest, 12)
        assert sum(len(b) for b in batches) == 12
        assert rt.blobs.read(digest) == BIG
        keys = [o["Key"] for o in _s3(settings).list_objects_v2(
            Bucket=settings.blob_url[5:].split("/")[0]).get("Contents", [])]
        assert not [k for k in keys if "/.uploads/" in k], keys
        assert ingest_job(rt, job["id"]) == batches  # redelivered: the same work
    finally:
        rt.close()


def test_bad_parts_and_what_is_no_archive_are_4xx(app: Any) -> None:
    client = app[0]
    text = b"hello, this is not an archive"
    up = _start(client, text, "notes.txt")
    assert up["part_count"] == 1
    etag = _put(_urls(client, up["id"], [1])[1], text)
    for body, code in [({"parts": [{"part": 1, "etag": '"0"'}]}, "invalid_parts"),
                       ({"parts": [{"part": 2, "etag": etag}]}, "invalid_parts"),
                       ({"parts": "all"}, "invalid_parts"), ([1], "invalid_body")]:
        r = client.post(f"/api/v1/direct-uploads/{up['id']}/complete", json=body)
        assert r.status_code == 400 and r.get_json()["error"]["code"] == code, r.get_json()
    r = client.post(f"/api/v1/direct-uploads/{up['id']}/urls", json={"parts": [2]})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_parts"
    r = client.post(f"/api/v1/direct-uploads/{up['id']}/complete",
                    json={"parts": [{"part": 1, "etag": etag}]})
    assert r.status_code == 200
    r = client.post(f"/api/v1/direct-uploads/{up['id']}/urls", json={"parts": [1]})
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "upload_complete"
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": up["id"]})
    assert r.status_code == 415 and r.get_json()["error"]["code"] == "invalid_archive"
    for body, status, code in [({"length": 0}, 400, "invalid_length"),
                               ({"length": "5"}, 400, "invalid_length"),
                               ({"length": 10**13}, 413, "request_entity_too_large")]:
        r = client.post("/api/v1/direct-uploads", json=body)
        assert r.status_code == status and r.get_json()["error"]["code"] == code
    # tus does not serve a direct upload, nor the other way round
    assert client.head(f"/api/v1/uploads/{up['id']}",
                       headers={"Tus-Resumable": "1.0.0"}).status_code == 404


def test_an_abandoned_direct_upload_is_aborted_in_s3(s3_endpoint: str, tmp_path: Path) -> None:
    client, settings, _, _ = _app(tmp_path, s3_endpoint, upload_expire_hours=1 / 3600)
    bucket = settings.blob_url[5:].split("/")[0]
    s3 = _s3(settings)

    def unfinished() -> set[str]:
        return {u["Key"].rsplit("/", 1)[1]
                for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}

    deleted = _start(client, BIG)
    assert client.delete(f"/api/v1/direct-uploads/{deleted['id']}").status_code == 204
    assert client.get(f"/api/v1/direct-uploads/{deleted['id']}").status_code == 404
    stale = _start(client, BIG)
    _put(_urls(client, stale["id"], [1])[1], BIG[:5 * MiB])
    assert unfinished() == {stale["id"]}
    time.sleep(1.2)
    assert client.get(f"/api/v1/direct-uploads/{stale['id']}").status_code == 404
    fresh = _start(client, BIG)  # the next upload (of either kind) prunes what expired
    assert unfinished() == {fresh["id"]}
    with client.application.extensions["mmbatch"].db.session() as s:
        assert s.get(Upload, stale["id"]) is None  # its record went with it


def test_with_blobs_on_disk_direct_uploads_name_tus(tmp_path: Path) -> None:
    client = _app(tmp_path, None)[0]
    for method, path in [("post", "/api/v1/direct-uploads"),
                         ("get", f"/api/v1/direct-uploads/{'0' * 32}"),
                         ("post", f"/api/v1/direct-uploads/{'0' * 32}/complete")]:
        r = getattr(client, method)(path, json={"length": 10})
        body = r.get_json()["error"]
        assert (r.status_code, body["code"]) == (409, "direct_upload_unavailable")
        assert "/api/v1/uploads" in body["message"]


@pytest.fixture
def server(app: Any) -> Iterator[str]:
    srv = make_server("127.0.0.1", 0, app[0].application, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        thread.join(timeout=10)


def test_the_command_line_uploads_direct_and_resumes_a_stopped_run(
        app: Any, server: str, tmp_path: Path, monkeypatch: Any) -> None:
    client, _, sent, recorder = app
    archive = tmp_path / "clips.tar"
    archive.write_bytes(BIG)
    key = client.environ_base["HTTP_AUTHORIZATION"].removeprefix("Bearer ")
    state = UploadState(tmp_path / "data" / "uploads.json")

    def stop_after_the_first_part(done: int, total: int) -> None:
        if done > 5 * MiB:
            raise KeyboardInterrupt  # the command was stopped, mid-part 2

    with pytest.raises(KeyboardInterrupt):
        upload_direct(Client(server, api_key=key).http, server, archive, state,
                      progress=stop_after_the_first_part)
    monkeypatch.setenv("MMBATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMBATCH_URL", server)
    monkeypatch.setenv("MMBATCH_API_KEY", key)
    seen: list[int] = []
    real = cli_direct._Part

    def spy(f: Any, offset: int, length: int, sent_: Any) -> Any:
        seen.append(offset)
        return real(f, offset, length, sent_)

    monkeypatch.setattr(cli_direct, "_Part", spy)
    out = CliRunner().invoke(cli_main.main, ["submit", str(archive), "--kind", "embed"])
    assert out.exit_code == 0, out.output
    assert seen == [5 * MiB]  # only the part S3 lacked went up again
    job_id = out.output.strip().splitlines()[-1].split()[1]
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["archive"] == {"name": "clips.tar", "bytes": len(BIG)} and len(sent) == 1
    assert not [m for m, _, _ in recorder.seen if m in ("PUT", "PATCH")]
    assert sum(size for _, _, size in recorder.seen) < 16 * 1024
    assert state.get(UploadState.key(archive, server + "/api/v1/direct-uploads")) is None


def test_a_job_keeps_its_staged_archive_past_the_expiry_until_ingest_took_it(
        s3_endpoint: str, tmp_path: Path) -> None:
    client, settings, _, _ = _app(tmp_path, s3_endpoint, upload_expire_hours=1 / 3600)
    small = tar_bytes({"a.txt": b"one caption", "b.txt": b"another"})
    up = _start(client, small, "small.tar")
    etag = _put(_urls(client, up["id"], [1])[1], small)
    assert client.post(f"/api/v1/direct-uploads/{up['id']}/complete",
                       json={"parts": [{"part": 1, "etag": etag}]}).status_code == 200
    r = client.post("/api/v1/jobs", data={"kind": "embed", "upload": up["id"]})
    assert r.status_code == 202, r.get_json()
    time.sleep(1.2)
    _start(client, BIG)  # prunes what expired: not the queued job's archive
    rt = Runtime(settings)
    try:
        assert sum(len(b) for b in ingest_job(rt, r.get_json()["id"])) == 2
        assert rt.blobs.read(hashlib.sha256(small).hexdigest()) == small
    finally:
        rt.close()
    time.sleep(1.2)
    _start(client, BIG)  # now the record goes
    with client.application.extensions["mmbatch"].db.session() as s:
        assert s.get(Upload, up["id"]) is None
