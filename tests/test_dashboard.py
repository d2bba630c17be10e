"""The dashboard (/ui) with Flask's test client over a real SQLite database.

Sign-in, CSRF, tenant isolation, the pages' content, cached thumbnails and media. Rows are made
with the store's own functions; nothing consumes the in-memory broker (the browser test in
test_dashboard_browser.py runs the whole stack).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmbatch.settings import Settings
from samples.clips import picture_clip
from store import jobs
from store.blobs import BlobStore
from store.db import Database
from store.migrate import upgrade
from store.registry import default_model, register_model
from store.schema import Item
from tests.conftest import make_key
from web.app import create_app


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path), "MMBATCH_BROKER_URL": "memory://"})
    upgrade(s.db_url)
    return s


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    return create_app(settings)


def _tenant_of(settings: Settings, key: str) -> int:
    from store import keys

    db = Database(settings.db_url)
    try:
        with db.session() as s:
            return keys.authenticate(s, key).tenant_id  # type: ignore[union-attr]
    finally:
        db.dispose()


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', html) or \
        re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def sign_in(app, key: str):  # type: ignore[no-untyped-def]
    client = app.test_client()
    token = _csrf(client.get("/ui/login").text)
    r = client.post("/ui/login", data={"api_key": key, "csrf_token": token, "next": "/ui/"})
    assert r.status_code == 303 and r.headers["Location"] == "/ui/", r.text
    client.csrf = _csrf(client.get("/ui/").text)  # type: ignore[attr-defined]
    return client


def _error(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.get_json()
    assert body is not None and set(body) == {"error"}, response.data[:300]
    return body["error"]


def _jpeg(color: tuple[int, int, int], size: tuple[int, int] = (640, 480)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _wav() -> bytes:
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


def make_job(settings: Settings, tenant_id: int, *, items: list[dict[str, Any]],
             outcomes: list[jobs.ItemOutcome] | None = None, model_id: int | None = None,
             state: str = "running") -> tuple[str, list[int]]:
    """A job with items whose media are stored blobs; ``outcomes`` get written as results
    (their item_id is the index into ``items``)."""
    blobs = BlobStore(settings.blobs)
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            job = jobs.create_job(s, kind="classify" if model_id else "embed",
                                  archive_blob="0" * 64, archive_name="photos.tar",
                                  archive_bytes=1, model_version_id=model_id,
                                  tenant_id=tenant_id, state=state)
            rows = []
            for it in items:
                media = {m: {"blob": blobs.put_bytes(data), "name": f"{it['key']}.{ext}"}
                         for m, (ext, data) in it["media"].items()}
                rows.append({"key": it["key"], "media": media, "label": it.get("label")})
            jobs.add_items(s, job.id, rows)
            job.total = len(items)
            s.flush()
            ids = jobs.item_ids(s, job.id)
            if outcomes:
                for o in outcomes:
                    o.item_id = ids[o.item_id]
                jobs.record_outcomes(s, job.id, jobs.result_model(job), outcomes)
            return job.id, ids
    finally:
        db.dispose()


def make_model(settings: Settings, tenant_id: int, name: str = "animals") -> int:
    blobs = BlobStore(settings.blobs)
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 20, 200)).save(buf, "PNG")
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            return register_model(
                s, name=name, fusion="concat", classes=["cat", "dog"],
                encoders={"image": {"name": "efficientnet", "version": "1", "dim": 4}},
                metrics={"val_accuracy": 0.875, "val_macro_f1": 0.86,
                         "confusion_png": blobs.put_bytes(buf.getvalue()),
                         # as a trainer writes it: per-class scores nested in dicts
                         "validation": {"confusion": [[1, 0], [0, 1]], "macro_f1": 0.86,
                                        "per_class": {"cat": {"f1": 0.9}, "dog": {"f1": 0.8}}}},
                config={}, checkpoint_blob="0" * 64, job_id=None, tenant_id=tenant_id).id
    finally:
        db.dispose()


# --- sign-in ------------------------------------------------------------------------------------

def test_pages_need_sign_in(app) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    r = client.get("/ui/")
    assert r.status_code == 302 and r.headers["Location"].startswith("/ui/login")
    for url in ("/ui/models", "/ui/jobs/abc"):
        assert client.get(url).status_code == 302
    r = client.get("/ui/api/jobs")
    assert r.status_code == 401 and _error(r)["code"] == "unauthorized"
    # a Bearer key is not a dashboard session
    r = client.get("/ui/api/jobs", headers={"Authorization": "Bearer mmb_nothing"})
    assert r.status_code == 401
    assert client.get("/").headers["Location"] == "/ui/"


def test_sign_in_with_a_key_and_out_again(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    client = app.test_client()
    token = _csrf(client.get("/ui/login").text)
    r = client.post("/ui/login", data={"api_key": "mmb_wrong", "csrf_token": token})
    assert r.status_code == 401 and "unknown or revoked" in r.text
    assert client.get("/ui/").status_code == 302

    client = sign_in(app, key)
    page = client.get("/ui/")
    assert page.status_code == 200 and 'id="upload-form"' in page.text
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    # the signed cookie holds the key's id and a CSRF token, never the key
    cookie = client.get_cookie("mmbatch_session")
    assert cookie is not None and key not in cookie.value
    data = app.session_interface.get_signing_serializer(app).loads(cookie.value)
    assert set(data) >= {"key_id", "csrf"} and key not in repr(data)

    r = client.post("/ui/logout", data={"csrf_token": client.csrf})
    assert r.status_code == 303
    assert client.get("/ui/").status_code == 302


def test_a_revoked_key_ends_its_sessions(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    from store import keys

    key = make_key(settings.db_url)
    client = sign_in(app, key)
    assert client.get("/ui/api/jobs").status_code == 200
    db = Database(settings.db_url)
    with db.session() as s:
        keys.revoke(s, keys.authenticate(s, key).id)  # type: ignore[union-attr]
    db.dispose()
    assert client.get("/ui/api/jobs").status_code == 401
    assert client.get("/ui/").status_code == 302


def test_sign_in_redirects_only_within_the_dashboard(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    for target, expected in (("/ui/models", "/ui/models"), ("//evil.example/ui", "/ui/"),
                             ("https://evil.example/", "/ui/"), ("/api/v1/jobs", "/ui/")):
        client = app.test_client()
        token = _csrf(client.get("/ui/login").text)
        r = client.post("/ui/login", data={"api_key": key, "csrf_token": token, "next": target})
        assert r.headers["Location"] == expected


def test_the_secret_key_is_made_once_into_the_data_dir(settings: Settings) -> None:
    first = create_app(settings)
    path = settings.data_dir / "secret-key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert create_app(settings).secret_key == first.secret_key == path.read_text().strip()
    configured = Settings.from_env({"MMBATCH_DATA_DIR": str(settings.data_dir),
                                    "MMBATCH_BROKER_URL": "memory://",
                                    "MMBATCH_SECRET_KEY": "s" * 40})
    assert create_app(configured).secret_key == "s" * 40


# --- CSRF ---------------------------------------------------------------------------------------

def test_posts_without_the_csrf_token_are_400(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    tenant = _tenant_of(settings, key)
    job_id, _ = make_job(settings, tenant, items=[])
    model_id = make_model(settings, tenant)
    make_model(settings, tenant)  # v2 is not the default: v1 was first
    client = sign_in(app, key)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))

    def upload() -> dict[str, Any]:
        return {"kind": "embed", "archive": (io.BytesIO(archive.getvalue()), "a.tar")}

    posts = [(f"/ui/jobs/{job_id}/cancel", dict), (f"/ui/models/{model_id + 1}/promote", dict),
             ("/ui/jobs", upload), ("/ui/logout", dict)]
    for url, data in posts:
        for extra in ({}, {"csrf_token": "forged"}):
            r = client.post(url, data={**data(), **extra})
            assert r.status_code == 400 and _error(r)["code"] == "csrf_failed", url
    r = client.post("/ui/jobs", headers={"X-CSRF-Token": "forged"},
                    data={"kind": "embed", "archive": (io.BytesIO(archive.getvalue()), "a.tar")})
    assert r.status_code == 400
    # nothing happened: the job still runs, no new job, the default model is unchanged
    jobs_now = client.get("/ui/api/jobs").get_json()["jobs"]
    assert [j["id"] for j in jobs_now] == [job_id] and jobs_now[0]["state"] == "running"
    db = Database(settings.db_url)
    with db.session() as s:
        assert default_model(s, tenant).id == model_id  # type: ignore[union-attr]
    db.dispose()
    assert client.get("/ui/").status_code == 200  # still signed in
    # a login form without its token is refused too
    fresh = app.test_client()
    fresh.get("/ui/login")
    r = fresh.post("/ui/login", data={"api_key": key})
    assert r.status_code == 400 and _error(r)["code"] == "csrf_failed"

    # and with the token, each works
    r = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": client.csrf, "next": "/ui/"})
    assert r.status_code == 303
    assert client.get(f"/ui/api/jobs/{job_id}").get_json()["state"] == "cancelled"
    r = client.post(f"/ui/models/{model_id + 1}/promote", data={"csrf_token": client.csrf})
    assert r.status_code == 303
    with db.session() as s:
        assert default_model(s, tenant).id == model_id + 1  # type: ignore[union-attr]
    db.dispose()


def test_upload_through_the_page(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    client = sign_in(app, make_key(settings.db_url))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    r = client.post("/ui/jobs", headers={"X-CSRF-Token": client.csrf},
                    data={"kind": "embed", "archive": (io.BytesIO(archive.getvalue()), "a.tar")})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["state"] == "queued"
    listed = client.get("/ui/api/jobs").get_json()["jobs"]
    assert listed[0]["id"] == job["id"]
    assert listed[0]["links"]["page"] == f"/ui/jobs/{job['id']}"
    assert job["priority"] == "normal"
    # the form offers the priorities the key may ask for; a bulk upload is a bulk job
    assert 'id="priority"' in client.get("/ui/").text
    r = client.post("/ui/jobs", headers={"X-CSRF-Token": client.csrf},
                    data={"kind": "embed", "priority": "bulk",
                          "archive": (io.BytesIO(archive.getvalue()), "c.tar")})
    assert r.status_code == 202 and r.get_json()["priority"] == "bulk"
    # a plain form post (no script) lands on the job's page
    r = client.post("/ui/jobs", data={"csrf_token": client.csrf, "kind": "embed",
                                      "archive": (io.BytesIO(archive.getvalue()), "b.tar")})
    assert r.status_code == 303 and r.headers["Location"].startswith("/ui/jobs/")
    # bad input gets the API's errors, not a 500
    r = client.post("/ui/jobs", headers={"X-CSRF-Token": client.csrf},
                    data={"kind": "embed", "archive": (io.BytesIO(b"not an archive" * 40), "x")})
    assert r.status_code == 415 and _error(r)["code"] == "invalid_archive"
    r = client.post("/ui/jobs", headers={"X-CSRF-Token": client.csrf}, data={"kind": "classify",
                    "archive": (io.BytesIO(archive.getvalue()), "a.tar")})
    assert r.status_code == 409 and _error(r)["code"] == "no_model"
    # cancelling twice: the second is a 409 JSON error
    r = client.post(f"/ui/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": client.csrf})
    assert r.status_code == 200 and r.get_json()["state"] == "cancelled"
    r = client.post(f"/ui/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": client.csrf})
    assert r.status_code == 409 and _error(r)["code"] == "job_finished"


# --- tenants ------------------------------------------------------------------------------------

def test_another_tenants_ids_are_404(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    mine, theirs = make_key(settings.db_url, "a"), make_key(settings.db_url, "b")
    their_tenant = _tenant_of(settings, theirs)
    model_id = make_model(settings, their_tenant)
    job_id, ids = make_job(settings, their_tenant, items=[
        {"key": "x", "media": {"image": ("jpg", _jpeg((1, 2, 3))), "audio": ("wav", _wav()),
                               "text": ("txt", b"a secret caption")}}])
    me = sign_in(app, mine)
    urls = [f"/ui/jobs/{job_id}", f"/ui/api/jobs/{job_id}",
            f"/ui/jobs/{job_id}/items/{ids[0]}/thumb.jpg",
            f"/ui/jobs/{job_id}/items/{ids[0]}/audio", f"/ui/jobs/{job_id}/items/{ids[0]}/text",
            f"/ui/jobs/{job_id}/export.csv", f"/ui/models/{model_id}/confusion.png"]
    for url in urls:
        r = me.get(url)
        assert r.status_code == 404 and _error(r)["code"] == "not_found", url
    for url in (f"/ui/jobs/{job_id}/cancel", f"/ui/models/{model_id}/promote"):
        r = me.post(url, data={"csrf_token": me.csrf})
        assert r.status_code == 404 and _error(r)["code"] == "not_found", url
    assert me.get("/ui/api/jobs").get_json()["jobs"] == []
    assert "animals" not in me.get("/ui/models").text
    # my own job, but their item id in its URL
    my_job, _ = make_job(settings, _tenant_of(settings, mine), items=[])
    r = me.get(f"/ui/jobs/{my_job}/items/{ids[0]}/thumb.jpg")
    assert r.status_code == 404
    # the owner sees all of it
    them = sign_in(app, theirs)
    for url in urls:
        assert them.get(url).status_code == 200, url


# --- pages and media ----------------------------------------------------------------------------

def test_job_page_shows_results_media_contributions_and_failures(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    tenant = _tenant_of(settings, key)
    model_id = make_model(settings, tenant)
    explanation = {"strategy": "weighted", "weights": {"image": 0.7, "audio": 0.3},
                   "weights_kind": "learned softmax weights",
                   "leave_one_out": {"image": 0.42, "audio": -0.05}}
    job_id, ids = make_job(settings, tenant, model_id=model_id, state="succeeded", items=[
        {"key": "cat_001", "media": {"image": ("jpg", _jpeg((200, 10, 10))),
                                     "audio": ("wav", _wav()),
                                     "text": ("txt", b"a <b>cat</b> on a mat")}},
        {"key": "broken_002", "media": {"image": ("jpg", b"not a jpeg")}},
    ], outcomes=[
        jobs.ItemOutcome(0, label="cat", confidence=0.93, explanation=explanation,
                         top_k=[{"label": "cat", "probability": 0.93}]),
        jobs.ItemOutcome(1, error="image: cannot identify image file"),
    ])
    client = sign_in(app, key)
    page = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    html = page.text
    assert f'src="/ui/jobs/{job_id}/items/{ids[0]}/thumb.jpg"' in html
    assert f'<audio controls preload="none" src="/ui/jobs/{job_id}/items/{ids[0]}/audio">' in html
    assert "a &lt;b&gt;cat&lt;/b&gt; on a mat" in html  # escaped, not markup
    assert "93.0 %" in html and ">cat<" in html
    assert 'class="fill pos" style="width: 42.0%"' in html
    assert 'class="fill neg" style="width: 5.0%"' in html
    assert "+0.42" in html and "-0.05" in html and "w·image" in html
    failed = html.split('id="failed"', 1)[1]
    assert "broken_002" in failed and "cannot identify image file" in failed
    for fmt in ("jsonl", "csv", "parquet"):
        assert f'href="/ui/jobs/{job_id}/export.{fmt}"' in html
    r = client.get(f"/ui/jobs/{job_id}/export.jsonl")
    assert r.status_code == 200 and b'"label": "cat"' in r.data
    assert client.get(f"/ui/jobs/{job_id}/export.xml").status_code == 404
    assert client.get(f"/ui/jobs/{job_id}?after=x").status_code == 400

    audio = client.get(f"/ui/jobs/{job_id}/items/{ids[0]}/audio")
    assert audio.status_code == 200 and audio.mimetype in ("audio/x-wav", "audio/wav")
    assert audio.data[:4] == b"RIFF"
    ranged = client.get(f"/ui/jobs/{job_id}/items/{ids[0]}/audio", headers={"Range": "bytes=0-3"})
    assert ranged.status_code == 206 and ranged.data == b"RIFF"
    r = client.get(f"/ui/jobs/{job_id}/items/{ids[1]}/audio")
    assert r.status_code == 404
    # an image that is not one: 422 with the JSON error, never a 500
    r = client.get(f"/ui/jobs/{job_id}/items/{ids[1]}/thumb.jpg")
    assert r.status_code == 422 and _error(r)["code"] == "unreadable_image"


def test_results_pages(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    job_id, _ = make_job(settings, _tenant_of(settings, key), items=[
        {"key": f"k{i:03d}", "media": {"text": ("txt", f"caption {i}".encode())}}
        for i in range(60)])
    client = sign_in(app, key)
    first = client.get(f"/ui/jobs/{job_id}").text
    assert "k000" in first and "k049" in first and "k050" not in first
    next_url = re.search(r'href="([^"]+)" id="next-page"', first).group(1)  # type: ignore[union-attr]
    second = client.get(next_url.replace("&amp;", "&")).text
    assert "k050" in second and "k059" in second and "k049" not in second
    assert 'id="next-page"' not in second


def test_thumbnails_are_made_once_and_shared_by_content(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    photo = _jpeg((30, 160, 90), size=(1024, 768))
    job_id, ids = make_job(settings, _tenant_of(settings, key), items=[
        {"key": "a", "media": {"image": ("jpg", photo)}},
        {"key": "b", "media": {"image": ("jpg", photo)}},  # the same picture again
    ])
    client = sign_in(app, key)
    thumbs = app.extensions["mmbatch_thumbnails"]
    assert thumbs.made == 0
    first = client.get(f"/ui/jobs/{job_id}/items/{ids[0]}/thumb.jpg")
    assert first.status_code == 200 and first.mimetype == "image/jpeg"
    with Image.open(io.BytesIO(first.data)) as im:
        assert im.size == (160, 120)
    files = list((settings.data_dir / "thumbnails").rglob("*.jpg"))
    assert len(files) == 1 and thumbs.made == 1
    stamp = files[0].stat().st_mtime_ns
    again = client.get(f"/ui/jobs/{job_id}/items/{ids[0]}/thumb.jpg")
    other = client.get(f"/ui/jobs/{job_id}/items/{ids[1]}/thumb.jpg")
    assert again.data == other.data == first.data
    assert thumbs.made == 1 and files[0].stat().st_mtime_ns == stamp
    assert list((settings.data_dir / "thumbnails").rglob("*.jpg")) == files
    # a browser that has it asks with its ETag and gets 304
    etag = first.headers["ETag"]
    r = client.get(f"/ui/jobs/{job_id}/items/{ids[0]}/thumb.jpg",
                   headers={"If-None-Match": etag})
    assert r.status_code == 304
    # another web process (a new app) reads it from disk
    other_app = create_app(settings)
    r = sign_in(other_app, key).get(f"/ui/jobs/{job_id}/items/{ids[1]}/thumb.jpg")
    assert r.status_code == 200 and r.data == first.data
    assert other_app.extensions["mmbatch_thumbnails"].made == 0


def test_thumbnails_decode_like_the_worker_in_a_child_process(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """A TIFF under a .jpg name: the worker's decoder refuses formats other than its five, and
    so does the thumbnail, which decodes in a sandbox child, never in the web process."""
    key = make_key(settings.db_url)
    tiff = io.BytesIO()
    Image.new("RGB", (64, 48), (5, 6, 7)).save(tiff, "TIFF")
    job_id, ids = make_job(settings, _tenant_of(settings, key), items=[
        {"key": "t", "media": {"image": ("jpg", tiff.getvalue())}},
        {"key": "p", "media": {"image": ("jpg", _jpeg((9, 9, 9)))}}])
    client = sign_in(app, key)
    r = client.get(f"/ui/jobs/{job_id}/items/{ids[0]}/thumb.jpg")
    assert r.status_code == 422 and _error(r)["code"] == "unreadable_image"
    assert client.get(f"/ui/jobs/{job_id}/items/{ids[1]}/thumb.jpg").status_code == 200
    thumbs = app.extensions["mmbatch_thumbnails"]
    [child] = thumbs._sandbox().pids
    assert child != os.getpid()


def test_the_search_page_says_what_is_wrong_without_a_search_service(app, settings: Settings  # type: ignore[no-untyped-def]
                                                                   ) -> None:
    client = sign_in(app, make_key(settings.db_url))
    page = client.get("/ui/search")
    assert page.status_code == 200 and 'id="search-q"' in page.text and 'id="hits"' not in page.text
    for item in ("999999999", "\u00b2", "-3"):  # none of them this tenant's item
        r = client.get("/ui/search", query_string={"item": item})
        assert r.status_code == 404 and 'id="search-error"' in r.text, item
    r = client.get("/ui/search", query_string={"q": "a boat"})  # no aligner yet: said, not a 500
    assert r.status_code == 409 and "no aligner" in r.text


def test_models_page_lists_metrics_confusion_and_promotes(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    tenant = _tenant_of(settings, key)
    first = make_model(settings, tenant)
    second = make_model(settings, tenant)
    client = sign_in(app, key)
    html = client.get("/ui/models").text
    assert "animals v1" in html and "animals v2" in html
    assert "val_accuracy" in html and "0.875" in html and "confusion_png" not in html
    assert f'src="/ui/models/{first}/confusion.png"' in html
    assert html.count('class="promote"') == 1  # only the version that is not the default
    png = client.get(f"/ui/models/{first}/confusion.png")
    assert png.status_code == 200 and png.data[:8] == b"\x89PNG\r\n\x1a\n"
    r = client.post(f"/ui/models/{second}/promote", data={"csrf_token": client.csrf})
    assert r.status_code == 303 and r.headers["Location"] == "/ui/models"
    html = client.get("/ui/models").text
    v2 = html.split(f'data-model-id="{second}"', 1)[1].split("</h2>", 1)[0]
    assert "default" in v2
    r = client.post("/ui/models/999/promote", data={"csrf_token": client.csrf})
    assert r.status_code == 404 and _error(r)["code"] == "not_found"


def test_a_clip_shows_its_poster_frame_and_a_player(app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    key = make_key(settings.db_url)
    tenant = _tenant_of(settings, key)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 8, 3), np.uint8))
    clip = picture_clip(picture.resize((160, 120)), seconds=2.0, fade_in=0.75)
    job_id, ids = make_job(settings, tenant, state="succeeded", items=[
        {"key": "clip_001", "media": {"video": ("mp4", clip)}}])
    db = Database(settings.db_url)
    with db.session() as s:  # the clip's sound track as its audio, as ingest gives it
        item = s.get(Item, ids[0])
        item.media = {**item.media, "audio": {**item.media["video"], "source": "video"}}
    db.dispose()
    client = sign_in(app, key)
    html = client.get(f"/ui/jobs/{job_id}").text
    base = f"/ui/jobs/{job_id}/items/{ids[0]}"
    assert (f'<video controls preload="none" poster="{base}/poster.jpg" src="{base}/video" '
            'width="160"></video>') in html
    assert "the clip&#39;s sound" in html or "the clip's sound" in html
    poster = client.get(f"{base}/poster.jpg")
    assert poster.status_code == 200 and poster.mimetype == "image/jpeg"
    frame = np.asarray(Image.open(io.BytesIO(poster.data)))
    assert frame.mean() > 24  # not the black opening of the fade-in
    played = client.get(f"{base}/video")
    assert played.status_code == 200 and played.mimetype == "video/mp4" and played.data == clip
