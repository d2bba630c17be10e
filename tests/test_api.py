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
from pathlib import Path

import pytest

from mmbatch.settings import Settings
from store.migrate import upgrade
from tests.conftest import make_key
from tests.util import tar_bytes
from web.app import create_app


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
    data = tar_bytes({"a/x.txt": b"hello"})
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
        data["archive"] = (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar")
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
                                         "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar")})
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
        io.BytesIO(tar_bytes({"a.txt": b"x" * 5000})), "a.tar")})
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


def _post(client, **form):  # type: ignore[no-untyped-def]
    headers = form.pop("headers", {})
    data = {"kind": "embed", "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar"), **form}
    return client.post("/api/v1/jobs", data=data, headers=headers)


def test_every_api_route_needs_a_key(settings: Settings) -> None:
    app = create_app(settings)
    anonymous = app.test_client()
    for method, url in (("get", "/api/v1/jobs"), ("get", "/api/v1/models"),
                        ("post", "/api/v1/jobs"), ("get", "/api/v1/jobs/x/results")):
        r = getattr(anonymous, method)(url)
        assert r.status_code == 401 and _error(r)["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = authed(app, "mmb_not-a-real-key")
    assert wrong.get("/api/v1/jobs").status_code == 401
    assert anonymous.get("/healthz").status_code == 200
    # a key that worked stops working the moment it is revoked
    from store import keys
    from store.db import Database

    key = make_key(settings.db_url)
    client = authed(app, key)
    assert client.get("/api/v1/jobs").status_code == 200
    db = Database(settings.db_url)
    with db.session() as s:
        assert keys.revoke(s, keys.authenticate(s, key).id)
    db.dispose()
    r = client.get("/api/v1/jobs")
    assert r.status_code == 401 and _error(r)["code"] == "unauthorized"


def test_a_tenant_sees_only_its_own_jobs(settings: Settings) -> None:
    app = create_app(settings)
    alice = authed(app, make_key(settings.db_url, "alice"))
    bob = authed(app, make_key(settings.db_url, "bob"))
    job_id = _post(alice).get_json()["id"]
    for url in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/results",
                f"/api/v1/jobs/{job_id}/errors", f"/api/v1/jobs/{job_id}/report"):
        assert bob.get(url).status_code == 404
        assert alice.get(url).status_code == 200
    assert bob.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 404
    assert [j["id"] for j in alice.get("/api/v1/jobs").get_json()["jobs"]] == [job_id]
    assert bob.get("/api/v1/jobs").get_json()["jobs"] == []
    # a second key of alice's tenant sees the same jobs
    alice2 = authed(app, make_key(settings.db_url, "alice-ci", tenant="alice"))
    assert alice2.get(f"/api/v1/jobs/{job_id}").status_code == 200


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    s = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_BROKER_URL": "memory://",
                           "MMBATCH_RATE_LIMIT_PER_MINUTE": "3"})
    client = authed(create_app(s), make_key(s.db_url))
    codes = [client.get("/api/v1/jobs").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    r = client.get("/api/v1/jobs")
    assert _error(r)["code"] == "rate_limited" and 1 <= int(r.headers["Retry-After"]) <= 61


def test_idempotency_key_returns_the_same_job(client) -> None:  # type: ignore[no-untyped-def]
    first = _post(client, headers={"Idempotency-Key": "upload-42"})
    again = _post(client, headers={"Idempotency-Key": "upload-42"})
    other = _post(client, headers={"Idempotency-Key": "upload-43"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert other.get_json()["id"] != first.get_json()["id"]
    assert len(client.get("/api/v1/jobs").get_json()["jobs"]) == 2


def test_cancel_a_queued_job_then_409(client) -> None:  # type: ignore[no-untyped-def]
    job_id = _post(client).get_json()["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.get_json()["state"] == "cancelled"
    assert r.get_json()["finished_at"] is not None
    again = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and _error(again)["code"] == "job_finished"


def test_job_list_filters_and_pages(client) -> None:  # type: ignore[no-untyped-def]
    ids = [_post(client).get_json()["id"] for _ in range(5)]
    client.post(f"/api/v1/jobs/{ids[0]}/cancel")
    seen, cursor = [], None
    while True:
        page = client.get("/api/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")).get_json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]  # newest first, each once
    cancelled = client.get("/api/v1/jobs?state=cancelled").get_json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/api/v1/jobs?kind=train").get_json()["jobs"] == []
    assert client.get("/api/v1/jobs?created_after=2999-01-01T00:00:00Z").get_json()["jobs"] == []
    assert len(client.get("/api/v1/jobs?created_before=2999-01-01").get_json()["jobs"]) == 5
    for query, code in (("state=bogus", "invalid_state"), ("created_after=yesterday",
                                                          "invalid_created_after"),
                        ("cursor=abc", "invalid_cursor")):
        r = client.get(f"/api/v1/jobs?{query}")
        assert r.status_code == 400 and _error(r)["code"] == code


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "http://127.0.0.1:9/hook",
                                 "http://10.1.2.3/hook", "http://user:pw@example.com/",
                                 "http://[::1]/hook", "http://169.254.169.254/latest"])
def test_callback_urls_to_private_networks_are_refused(client, url: str) -> None:  # type: ignore[no-untyped-def]
    r = _post(client, callback_url=url)
    assert r.status_code == 400 and _error(r)["code"] == "invalid_callback_url"


def test_reprocess_request_is_validated(client) -> None:  # type: ignore[no-untyped-def]
    assert client.post("/api/v1/reprocess", json={"model": 99}).status_code == 400
    assert client.post("/api/v1/reprocess", json={"limit": 0}).status_code == 400
    assert client.post("/api/v1/reprocess", json=[1]).status_code == 400
    nothing = client.post("/api/v1/reprocess")  # no model yet: nothing is due, and it says why
    assert nothing.status_code == 200
    assert nothing.get_json() == {"status": "nothing to reprocess", "reason": "no default model"}


def test_export_format_is_validated(client) -> None:  # type: ignore[no-untyped-def]
    job_id = _post(client).get_json()["id"]
    r = client.get(f"/api/v1/jobs/{job_id}/results?format=xml")
    assert r.status_code == 400 and _error(r)["code"] == "invalid_format"


@pytest.mark.parametrize("failures, status, state", [(2, 202, "queued"), (3, 503, "failed")])
def test_enqueue_is_tried_again_before_the_job_fails(settings: Settings, failures: int,
                                                     status: int, state: str) -> None:
    """A publish that fails (the broker briefly away; the embedded broker's queue declared by
    a starting worker at the same moment) is tried again; only when every try fails does the
    request answer 503 and the job end failed with the reason, never stay queued unsent."""
    app = create_app(settings)
    celery = app.extensions["mmbatch"].celery
    real, calls = celery.send_task, []

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) <= failures:
            raise RuntimeError("UNIQUE constraint failed: kombu_queue.name")
        return real(*args, **kwargs)

    celery.send_task = flaky
    client = authed(app, make_key(settings.db_url))
    r = client.post("/api/v1/jobs", data={"kind": "embed",
                                         "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "x.tar")})
    assert r.status_code == status and len(calls) == min(failures + 1, 3)
    [job] = client.get("/api/v1/jobs").get_json()["jobs"]
    assert job["state"] == state
    if status == 503:
        assert _error(r)["code"] == "broker_unavailable"
        assert "kombu_queue" in job["error"]
