"""/metrics, scraped for real: the web app's request counters and latency by route and status
(in-process, and under gunicorn with two worker processes adding up through prometheus-client's
multiprocess mode), and the broker queue depth a worker reports, on Redis and on the SQLite
broker. The worker's own HTTP endpoint is scraped in tests/test_deploy_s3.py, end to end."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import child_env, web_command
from mmbatch.contract import INGEST_QUEUE, MODEL_QUEUE, TASK_PROCESS_BATCH
from mmbatch.settings import Settings
from store.migrate import upgrade
from tests.util import free_port
from web.app import create_app
from worker.app import create_celery
from worker.metrics import QueueDepthCollector, WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name`` in a Prometheus exposition, by its sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_requests_are_counted_and_timed_by_route_and_status(tmp_path: Path) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)})
    upgrade(settings.db_url)
    client = create_app(settings).test_client()
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    assert client.get("/api/v1/jobs/abc").status_code == 401  # no API key
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/api/v1/jobs/abc", headers={"Authorization": "Bearer nope"}
                      ).status_code == 401
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    counts = samples(text, "mmbatch_http_requests_total")
    assert counts[(("method", "GET"), ("route", "/healthz"), ("status", "200"))] == 3
    assert counts[(("method", "GET"), ("route", "/api/v1/jobs/<job_id>"), ("status", "401"))] == 2
    assert counts[(("method", "GET"), ("route", "<unmatched>"), ("status", "404"))] == 1
    latency = samples(text, "mmbatch_http_request_duration_seconds_count")
    assert latency[(("method", "GET"), ("route", "/healthz"), ("status", "200"))] == 3
    buckets = samples(text, "mmbatch_http_request_duration_seconds_bucket")
    assert buckets[(("le", "+Inf"), ("method", "GET"), ("route", "/healthz"),
                    ("status", "200"))] == 3
    # the scrape itself is counted by the next one
    again = samples(client.get("/metrics").get_data(as_text=True), "mmbatch_http_requests_total")
    assert again[(("method", "GET"), ("route", "/metrics"), ("status", "200"))] == 1


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The web server as `mmbatch web` runs it, with two worker processes."""
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)})
    upgrade(settings.db_url)
    port = free_port()
    env = child_env(settings)
    multiproc = tmp_path / "prometheus"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
    (multiproc).mkdir()
    (multiproc / "counter_999999.db").write_bytes(b"stale from an earlier run")
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen(web_command(settings, "127.0.0.1", port) + ["--workers", "2"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "web.log").read_text()
            try:
                if requests.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "web.log").read_text()
            time.sleep(0.3)
        yield url, multiproc
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_gunicorn_workers_add_up_in_one_scrape(gunicorn: tuple[str, Path]) -> None:
    url, multiproc = gunicorn
    before = samples(requests.get(url + "/metrics", timeout=10).text,
                     "mmbatch_http_requests_total")
    healthz = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    start = before.get(healthz, 0)
    for _ in range(30):  # a new connection each: either worker process may answer
        assert requests.get(url + "/healthz", timeout=10, headers={"Connection": "close"}
                            ).status_code == 200
    pids = {p.name.rsplit("_", 1)[1] for p in multiproc.glob("counter_*.db")}
    assert "999999.db" not in pids  # files of an earlier run are cleared at start
    # Every scrape sees all 30, whichever process answers it.
    for _ in range(6):
        text = requests.get(url + "/metrics", timeout=10, headers={"Connection": "close"}).text
        assert samples(text, "mmbatch_http_requests_total")[healthz] == start + 30
        assert samples(text, "mmbatch_http_request_duration_seconds_count")[healthz] == start + 30


def _depth_after_sending(settings: Settings, n: int) -> dict[str, int]:
    app = create_celery(settings)
    collector = QueueDepthCollector(app, (INGEST_QUEUE, MODEL_QUEUE))
    assert collector.depths() == {INGEST_QUEUE: 0, MODEL_QUEUE: 0}  # nothing sent yet
    for i in range(n):
        app.send_task(TASK_PROCESS_BATCH, args=["no-such-job", [i]])
    metrics = WorkerMetrics()
    metrics.registry.register(collector)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert samples(text, "mmbatch_broker_up") == {(): 1.0}
    return {dict(k)["queue"]: int(v) for k, v in samples(text, "mmbatch_queue_depth").items()}


def test_queue_depth_is_read_from_redis(redis_url: str, broker_prefix: str,
                                        tmp_path: Path) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": redis_url,
                                  "MMBATCH_BROKER_PREFIX": broker_prefix + "depth:"})
    assert _depth_after_sending(settings, 3) == {INGEST_QUEUE: 0, MODEL_QUEUE: 3}


def test_queue_depth_is_read_from_the_sqlite_broker(tmp_path: Path) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)})
    assert _depth_after_sending(settings, 2) == {INGEST_QUEUE: 0, MODEL_QUEUE: 2}


def test_an_unreachable_broker_is_reported_not_raised(tmp_path: Path) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    metrics = WorkerMetrics()
    metrics.registry.register(QueueDepthCollector(create_celery(settings), (MODEL_QUEUE,)))
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert samples(text, "mmbatch_broker_up") == {(): 0.0}
    assert samples(text, "mmbatch_queue_depth") == {}


assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None, \
    "the suite runs prometheus-client in its single-process mode"
