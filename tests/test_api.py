"""The HTTP API on its own: the app from its factory over a real SQLite database.

The broker here is kombu's in-memory transport and nothing consumes it: these tests cover what the
web process does by itself (validation, errors, the upload path). The end-to-end path with a real
worker is in test_integration.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mmbatch.settings import Settings
from store.migrate import upgrade
from tests.conftest import make_key
from web.app import create_app


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_BROKER_URL": "memory://"})
    upgrade(s.db_url)
    return s


def authed(app, key: str):  # type: ignore[no-untyped-def]
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


@pytest.fixture
def client(settings: Settings):  # type: ignore[no-untyped-def]
    return authed(create_app(settings), make_key(settings.db_url))


def _error(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    return body["error"]


def test_healthz(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_json()["status"] == "ok"


def test_embed_job_is_accepted_with_location(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    data = _tar({"a/x.txt": b"hello"})
    r = client.post("/api/v1/jobs", data={"kind": "embed",
                                         "archive": (io.BytesIO(data), "x.tar")})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["state"] == "queued" and job["kind"] == "embed"
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    polled = client.get(r.headers["Location"]).get_json()
    assert polled["id"] == job["id"] and polled["total"] == 0
    # the archive went to content-addressed storage whole, and nothing else was left behind
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    stored = settings.blobs / digest[:2] / digest[2:4] / digest
    assert stored.read_bytes() == data
    assert not list(settings.blobs.glob(".incoming-*"))


def test_not_an_archive_is_415_and_leaves_no_blob(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/api/v1/jobs", data={"kind": "embed",
                                         "archive": (io.BytesIO(b"plain text" * 100), "a.zip")})
    assert r.status_code == 415
    assert _error(r)["code"] == "invalid_archive"
    assert not [p for p in settings.blobs.rglob("*") if p.is_file()]


@pytest.mark.parametrize("form,status,code", [
    ({"kind": "bogus"}, 400, "invalid_kind"),
    ({}, 400, "invalid_kind"),
    ({"kind": "embed", "archive": None}, 400, "missing_archive"),
    ({"kind": "classify"}, 409, "no_model"),
    ({"kind": "embed", "model": "999"}, 400, "unknown_model"),
    ({"kind": "embed", "model": "abc"}, 400, "unknown_model"),
    ({"kind": "train", "epochs": "lots"}, 400, "invalid_epochs"),
    ({"kind": "train", "model": "1"}, 400, "invalid_model"),
])
def test_bad_job_requests(client, form: dict, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    data = dict(form)
    if data.pop("archive", "yes") is not None:
        data["archive"] = (io.BytesIO(_tar({"a.txt": b"x"})), "a.tar")
    r = client.post("/api/v1/jobs", data=data)
    assert r.status_code == status
    assert _error(r)["code"] == code


def test_unknown_job_and_model_are_404(client) -> None:  # type: ignore[no-untyped-def]
    for url in ("/api/v1/jobs/nope", "/api/v1/jobs/nope/results", "/api/v1/models/42"):
        r = client.get(url)
        assert r.status_code == 404 and _error(r)["code"] == "not_found"
    assert _error(client.get("/api/v1/nothing-here"))["code"] == "not_found"


def test_bad_query_arguments_are_400(client) -> None:  # type: ignore[no-untyped-def]
    r = client.post("/api/v1/jobs", data={"kind": "embed",
                                         "archive": (io.BytesIO(_tar({"a.txt": b"x"})), "a.tar")})
    job_id = r.get_json()["id"]
    for query, code in (("limit=0", "invalid_limit"), ("limit=x", "invalid_limit"),
                        ("cursor=%%%", "invalid_cursor"), ("cursor=Zm9vOjE", "invalid_cursor")):
        r = client.get(f"/api/v1/jobs/{job_id}/results?{query}")
        assert r.status_code == 400 and _error(r)["code"] == code


def test_upload_over_the_limit_is_413(tmp_path: Path) -> None:
    s = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_BROKER_URL": "memory://",
                           "MMBATCH_MAX_UPLOAD_BYTES": "1000"})
    client = authed(create_app(s), make_key(s.db_url))
    r = client.post("/api/v1/jobs", data={"kind": "embed", "archive": (
        io.BytesIO(_tar({"a.txt": b"x" * 5000})), "a.tar")})
    assert r.status_code == 413 and _error(r)["code"] == "request_entity_too_large"


def test_the_web_process_never_imports_torch(tmp_path: Path) -> None:
    code = f"""
import io, json, sys, tarfile
from mmbatch.settings import Settings
from store.migrate import upgrade
from tests.conftest import make_key
from web.app import create_app
s = Settings.from_env({{"MMBATCH_DATA_DIR": {str(tmp_path)!r}, "MMBATCH_BROKER_URL": "memory://"}})
upgrade(s.db_url)
from store import keys
from store.db import Database
with Database(s.db_url).session() as session:
    key = keys.create_key(session, "t").key
c = create_app(s).test_client()
c.environ_base["HTTP_AUTHORIZATION"] = "Bearer " + key
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w") as tf:
    info = tarfile.TarInfo("a.txt"); info.size = 1; tf.addfile(info, io.BytesIO(b"x"))
r = c.post("/api/v1/jobs", data={{"kind": "embed", "archive": (io.BytesIO(buf.getvalue()), "a.tar")}})
assert r.status_code == 202, r.get_json()
c.get(r.headers["Location"]); c.get("/api/v1/models")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchaudio", "transformers", "timm", "models"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
