"""End to end with real processes: the API server, a Celery worker, a real broker and database.

Once on the embedded default (``mmbatch up``: SQLite and kombu's SQLAlchemy transport) and once on
Redis + PostgreSQL. Upload the sample, poll to succeeded, check that every item has exactly one
result and that the counters add up; train, then classify with accuracy clearly above chance.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from sqlalchemy import func, select

from cli.client import Client
from cli.stack import Stack
from mmbatch.settings import Settings
from store.db import Database
from store.keys import hash_key
from store.schema import ApiKey, Result, Tenant
from tests.conftest import make_key
from tests.util import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, wait: float = 180) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mmbatch up exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mmbatch up did not answer within {wait}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Settings]]:
    """``mmbatch up`` as a user runs it, with nothing configured but the data directory."""
    data_dir = tmp_path_factory.mktemp("embedded")
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir)})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMBATCH_")}
    env["MMBATCH_DATA_DIR"] = str(data_dir)
    log = data_dir / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        assert settings.embedded
        key = (data_dir / "api-key").read_text().strip()  # made by `mmbatch up` on first start
        assert key in log.read_text()
        yield Client(url, api_key=key), settings
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory, pg_url_module: str,
                redis_url: str, broker_prefix: str) -> Iterator[tuple[Client, Settings]]:
    """Redis as the broker, PostgreSQL as the database, blobs on local disk."""
    data_dir = tmp_path_factory.mktemp("distributed")
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir),
                                  "MMBATCH_DATABASE_URL": pg_url_module,
                                  "MMBATCH_BROKER_URL": redis_url,
                                  "MMBATCH_BROKER_PREFIX": broker_prefix})
    assert not settings.embedded
    key = make_key(settings.db_url)
    stack = Stack(settings, "127.0.0.1", free_port(), log_dir=data_dir / "logs")
    stack.start(wait=180)
    try:
        yield Client(stack.url, api_key=key), settings
    finally:
        stack.stop()


@pytest.fixture(params=["embedded", "distributed"])
def deployment(request: pytest.FixtureRequest) -> tuple[Client, Settings]:
    return request.getfixturevalue(request.param)


def _results_per_item(settings: Settings, job_id: str) -> list[int]:
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            rows = s.execute(select(func.count()).select_from(Result)
                             .where(Result.job_id == job_id).group_by(Result.item_id)).all()
            return [n for (n,) in rows]
    finally:
        db.dispose()


def _check_complete(client: Client, settings: Settings, job: dict[str, Any]) -> list[dict]:
    assert job["state"] == "succeeded", job
    assert job["total"] > 0 and job["done"] + job["failed"] == job["total"]
    assert job["progress"] == 1.0
    rows = list(client.results(job["id"], page_size=7))  # several pages
    assert len(rows) == job["total"]
    assert len({r["item_id"] for r in rows}) == job["total"]
    assert sum(r["status"] == "ok" for r in rows) == job["done"]
    assert sum(r["status"] == "failed" for r in rows) == job["failed"]
    per_item = _results_per_item(settings, job["id"])
    assert len(per_item) == job["total"] and set(per_item) == {1}
    return rows


def test_train_then_classify(deployment: tuple[Client, Settings], sample_dir: Any) -> None:
    client, settings = deployment
    train = client.submit(sample_dir.train, "train", name="sample")
    train = client.wait(train["id"], timeout=600)
    rows = _check_complete(client, settings, train)
    assert train["failed"] == 0
    assert {r["split"] for r in rows} == {"train", "val"}
    model = client.model(train["model"]["id"])
    assert model["fusion"] == "stack" and len(model["classes"]) == 4  # the default
    encoders = {c: e for c, e in model["encoders"].items() if ":" not in c}
    assert set(encoders) == {"image", "text", "audio"}
    assert {c for c in model["encoders"] if ":" in c} <= {  # the feature families it kept
        "image:pixels", "image:hog", "text:chars", "audio:mfcc"}
    assert model["metrics"]["val_accuracy"] >= 0.6, model["metrics"]
    assert "validation" in model["metrics"] and "macro_f1" in model["metrics"]["validation"]

    job = client.submit(sample_dir.unlabelled, "classify", model=model["id"])
    job = client.wait(job["id"], timeout=600)
    rows = _check_complete(client, settings, job)
    assert job["model"]["id"] == model["id"]
    truth = {k: v for k, v in csv.reader(open(sample_dir.truth)) if k != "key"}
    assert {r["key"] for r in rows} == set(truth)
    correct = sum(r["label"] == truth[r["key"]] for r in rows)
    assert correct / len(rows) >= 0.6, f"{correct}/{len(rows)} correct; chance is 0.25"
    for r in rows:
        assert r["top_k"][0]["label"] == r["label"]
        assert abs(r["top_k"][0]["probability"] - r["confidence"]) < 1e-5
        assert 0 < len(r["top_k"]) <= 4 and r["modalities"]
    with_emb = next(client.results(job["id"], embeddings=True))
    assert len(with_emb["embedding"]) > 0
    _two_reviewers_correct_one_item(client, settings, rows[0]["item_id"], model["classes"])


def _two_reviewers_correct_one_item(client: Client, settings: Settings, item: int,
                                    classes: list[str], rounds: int = 6) -> None:
    """Two people of one tenant (two keys) correct one item at the same moment, again and
    again: every event is kept, each event's old label is the one before it (no lost update),
    and the item's label is the latest event's."""
    mine = client.http.headers["Authorization"].removeprefix("Bearer ")
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            tenant = s.scalar(select(Tenant.name).join(ApiKey, ApiKey.tenant_id == Tenant.id)
                              .where(ApiKey.key_hash == hash_key(mine)))
    finally:
        db.dispose()
    other = Client(client.base, api_key=make_key(settings.db_url, "second reviewer", tenant))
    start = threading.Barrier(2)
    answers: list[dict[str, Any]] = []

    def review(who: Client, label: str) -> None:
        for _ in range(rounds):
            start.wait(timeout=60)
            r = who.http.post(f"{who.base}/api/v1/items/{item}/label", json={"label": label},
                              timeout=60)
            answers.append({"status": r.status_code, **r.json()})

    threads = [threading.Thread(target=review, args=(who, label))
               for who, label in ((client, classes[0]), (other, classes[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [a["status"] for a in answers] == [201] * 2 * rounds, answers
    history = client.http.get(f"{client.base}/api/v1/items/{item}/labels", timeout=30).json()
    events = history["events"]
    assert len(events) == 2 * rounds and {e["new_label"] for e in events} == set(classes[:2])
    assert len({e["key_id"] for e in events}) == 2  # both reviewers' events
    for before, after in zip(events, events[1:]):
        assert after["old_label"] == before["new_label"], events
    assert history["label"] == events[-1]["new_label"]


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return buf.getvalue()


def test_a_corrupt_image_fails_its_item_and_the_job_goes_on(
        embedded: tuple[Client, Settings], tmp_path: Path) -> None:
    client, settings = embedded
    good = _png((200, 30, 30))
    files = {"x/good_1.png": good, "x/good_1.txt": b"a red square",
             "x/good_2.png": _png((30, 200, 30)), "x/broken.jpg": good[:40] + b"\x00" * 100,
             "x/text_only.txt": "caf\u00e9 menu".encode(), "x/notes.md": b"ignored"}
    archive = tmp_path / "mixed.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    job = client.wait(client.submit(archive, "embed")["id"], timeout=300)
    rows = _check_complete(client, settings, job)
    assert (job["total"], job["done"], job["failed"]) == (4, 3, 1)
    assert job["skipped_files"] == 1
    broken = next(r for r in rows if r["key"] == "x/broken")
    assert broken["status"] == "failed" and "x/broken.jpg" in broken["error"]
    ok = {r["key"]: r for r in client.results(job["id"], embeddings=True) if r["status"] == "ok"}
    assert set(ok["x/good_1"]["modalities"]) == {"image", "text"}
    assert len(ok["x/good_1"]["embedding"]) == len(ok["x/text_only"]["embedding"])
