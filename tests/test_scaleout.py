"""Scale-out, shown: two model worker processes (one torch thread each) and the API on Redis and
PostgreSQL with every blob in S3 (moto's server); a 600-item job is processed once per item and
both workers took part (each worker's own /metrics counts what it did)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from cli.client import Client
from cli.stack import Stack
from mmbatch.settings import Settings
from store.db import Database
from store.schema import Result
from tests.conftest import make_key
from tests.s3 import make_bucket, s3_env
from tests.test_metrics import samples
from tests.util import free_port, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ITEMS = 600


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_url_module: str, redis_url: str,
          broker_prefix: str, s3_endpoint: str) -> Iterator[tuple[Stack, Settings, str]]:
    data = tmp_path_factory.mktemp("scaleout")
    settings = Settings.from_env({
        "MMBATCH_DATA_DIR": str(data), "MMBATCH_DATABASE_URL": pg_url_module,
        "MMBATCH_BROKER_URL": redis_url, "MMBATCH_BROKER_PREFIX": broker_prefix,
        "MMBATCH_WORKER_METRICS_PORT": str(free_port()), "MMBATCH_TORCH_THREADS": "1",
        "MMBATCH_DISPATCH_WINDOW": "4", "MMBATCH_BATCH_SIZE": "16",
        **s3_env(s3_endpoint, make_bucket(s3_endpoint), "scaleout")})
    key = make_key(settings.db_url)
    with Stack(settings, "127.0.0.1", free_port(), log_dir=data / "logs",
               model_workers=2) as running:
        yield running, settings, key


def _processed(port: int) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(samples(text, "mmbatch_worker_items_processed_total").values())


def test_two_workers_share_a_job_and_each_item_is_processed_once(
        stack: tuple[Stack, Settings, str], tmp_path: Path) -> None:
    running, settings, key = stack
    archive = write_tar(tmp_path / "many.tar", {f"t{i:04d}.txt": f"caption {i}: a few words "
                                                                  f"about item {i}".encode()
                                                for i in range(ITEMS)})
    client = Client(running.url, api_key=key)
    job = client.wait(client.submit(archive, "embed")["id"], timeout=500)
    assert (job["state"], job["done"], job["failed"]) == ("succeeded", ITEMS, 0), job
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            per_item = s.execute(select(func.count()).select_from(Result)
                                 .where(Result.job_id == job["id"])
                                 .group_by(Result.item_id)).scalars().all()
    finally:
        db.dispose()
    assert len(per_item) == ITEMS and set(per_item) == {1}
    base = settings.worker_metrics_port
    deadline = time.monotonic() + 30
    counts: list[Any] = []
    while time.monotonic() < deadline:
        counts = [_processed(base), _processed(base + 2)]  # worker 1, worker 2 (+1: trainer)
        if sum(counts) >= ITEMS:
            break
        time.sleep(0.5)
    assert sum(counts) == ITEMS, counts
    assert min(counts) >= ITEMS // 10, counts  # both took part
