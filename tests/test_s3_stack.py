"""End to end on S3 blob storage: the web server (gunicorn) and a Celery worker process, with
every blob in a bucket of moto's S3 server and none on disk; the worker's /metrics scraped over
HTTP while it runs, and the job_state lines of both processes' logs."""

from __future__ import annotations

import hashlib
import io
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests
from click.testing import CliRunner

from cli import main as cli_main
from cli.client import Client
from cli.stack import Stack
from mmbatch.settings import Settings
from store.blobstore import open_blob_store
from tests.conftest import make_key
from tests.s3 import ACCESS_KEY, REGION, SECRET_KEY, make_bucket, s3_env
from tests.test_metrics import samples
from tests.util import free_port, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _png(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return buf.getvalue()


def _wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * 8000))  # half a second of silence
    return buf.getvalue()


def _archive(path: Path) -> Path:
    files = {"red.png": _png((200, 30, 30)), "red.txt": b"a red square",
             "blue.png": _png((30, 30, 200)), "blue.wav": _wav(),
             "note.txt": b"words alone"}
    return write_tar(path, files)


@pytest.fixture(scope="module")
def stack(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Settings, str]]:
    data = tmp_path_factory.mktemp("s3stack")
    bucket = make_bucket(s3_endpoint)
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data),
                                  "MMBATCH_WORKER_METRICS_PORT": str(free_port()),
                                  "MMBATCH_DECODE_ISOLATION": "off",
                                  **s3_env(s3_endpoint, bucket, "mmbatch")})
    key = make_key(settings.db_url)
    with Stack(settings, "127.0.0.1", free_port(), log_dir=data / "logs") as running:
        # Submit once the worker has declared its queues: kombu's SQLAlchemy transport lets a
        # first enqueue and a worker starting up race to create the same queue row.
        deadline = time.monotonic() + 120
        while "ready." not in (data / "logs" / "worker.log").read_text():
            assert time.monotonic() < deadline, (data / "logs" / "worker.log").read_text()
            time.sleep(0.3)
        yield running, settings, key


def _metrics(url: str) -> str:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    return response.text


def test_a_job_runs_on_s3_blobs_and_the_worker_serves_metrics(
        stack: tuple[Stack, Settings, str], tmp_path: Path) -> None:
    running, settings, key = stack
    client = Client(running.url, api_key=key)
    job = client.submit(_archive(tmp_path / "mixed.tar"), "embed")
    done = client.wait(job["id"], timeout=300)
    assert (done["state"], done["total"], done["done"], done["failed"]) == \
        ("succeeded", 3, 3, 0), done

    # Every blob is in the bucket: the archive and the five media files; nothing on disk.
    blobs = open_blob_store(settings)
    stored = set(blobs)
    assert len(stored) == 6
    assert not (settings.data_dir / "blobs").exists()
    assert list((settings.data_dir / "spool").iterdir()) == []  # no spooled leftovers
    results = list(client.results(job["id"]))
    assert {r["key"] for r in results} == {"red", "blue", "note"}

    # The dashboard streams media from the bucket.
    session = requests.Session()
    form = session.get(running.url + "/ui/login", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token, form
    page = session.post(running.url + "/ui/login",
                        data={"api_key": key, "csrf_token": token[1]},
                        timeout=10)
    assert page.status_code == 200
    item = next(r for r in results if r["key"] == "red")
    text = session.get(f"{running.url}/ui/jobs/{job['id']}/items/{item['item_id']}/text",
                       timeout=10)
    assert (text.status_code, text.content) == (200, b"a red square")

    worker = _metrics(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics")
    assert samples(worker, "mmbatch_worker_items_processed_total") == {(("kind", "embed"),): 3}
    encoder_passes = samples(worker, "mmbatch_worker_encoder_batch_seconds_count")
    assert {dict(k)["modality"] for k in encoder_passes} == {"image", "text", "audio"}
    encoded = samples(worker, "mmbatch_worker_encoded_items_total")
    assert encoded == {(("modality", "image"),): 2, (("modality", "text"),): 2,
                       (("modality", "audio"),): 1}
    loads = samples(worker, "mmbatch_worker_model_load_seconds")
    assert set(loads) == {(("modality", m),) for m in ("image", "text", "audio")}
    assert all(v > 0 for v in loads.values())
    assert samples(worker, "mmbatch_worker_batch_seconds_count")[(("kind", "embed"),)] >= 1
    assert samples(worker, "mmbatch_queue_depth") == {(("queue", "ingest"),): 0,
                                                      (("queue", "model"),): 0}
    assert samples(worker, "mmbatch_broker_up") == {(): 1}

    web = _metrics(running.url + "/metrics")
    assert samples(web, "mmbatch_http_requests_total")[
        (("method", "POST"), ("route", "/api/v1/jobs"), ("status", "202"))] == 1

    # One job_state line per state change, with the job's id, across the processes' logs
    # (ingest runs in a worker of its own, the ingester).
    logs = "".join((settings.data_dir / "logs" / f"{name}.log").read_text()
                   for name in ("web", "ingester", "worker"))
    states = re.findall(rf"job_state job={job['id']} state=(\w+)", logs)
    assert sorted(states) == sorted(["queued", "ingesting", "running", "succeeded"]), logs[-3000:]


def test_the_command_line_uploads_straight_to_the_bucket(
        stack: tuple[Stack, Settings, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mmbatch submit`` against S3 blobs: the archive goes to the bucket in presigned parts,
    never through the API; the job runs from it and has one result per item."""
    running, settings, key = stack
    monkeypatch.setenv("MMBATCH_DATA_DIR", str(tmp_path / "cli"))
    monkeypatch.setenv("MMBATCH_URL", running.url)
    monkeypatch.setenv("MMBATCH_API_KEY", key)
    archive = _archive(tmp_path / "direct.tar")
    out = CliRunner().invoke(cli_main.main, ["submit", str(archive), "--kind", "embed"])
    assert out.exit_code == 0, out.output
    job_id = out.output.strip().splitlines()[-1].split()[1]
    client = Client(running.url, api_key=key)
    done = client.wait(job_id, timeout=300)
    assert (done["state"], done["total"], done["done"], done["failed"]) == \
        ("succeeded", 3, 3, 0), done
    assert sorted(r["key"] for r in client.results(job_id)) == ["blue", "note", "red"]

    web = samples(_metrics(running.url + "/metrics"), "mmbatch_http_requests_total")
    routes = {dict(k)["route"] for k in web}
    assert "/api/v1/direct-uploads/<upload_id>/complete" in routes
    assert not [k for k in web if dict(k)["method"] in ("PUT", "PATCH")], web  # no bytes
    bucket = settings.blob_url[5:].split("/")[0]
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=REGION,
                      aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in keys if "/.uploads/" in k], keys  # the staged copy went
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in set(open_blob_store(settings))
