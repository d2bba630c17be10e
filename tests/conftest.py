"""Shared fixtures: real SQLite, PostgreSQL and Redis; settings built the way production builds them.

Redis and PostgreSQL are found on their usual local ports (``make test`` starts them when they are
installed). Without them the tests that need them are skipped, except under ``CI=true``, where a
missing service is a failure.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmbatch.settings import Settings  # noqa: E402
from tests.browser import browser_context  # noqa: F401,E402  # headless Chromium
from tests.s3 import s3_endpoint, s3_settings  # noqa: F401  # moto S3 server, a bucket
from tests.util import IN_CI  # noqa: E402  # (also imported from here by tests)

PG_ADMIN = os.environ.get("MMBATCH_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MMBATCH_TEST_REDIS", "redis://127.0.0.1:6379")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return PG_ADMIN


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    yield from _pg_database(pg_server)


@pytest.fixture(scope="module")
def pg_url_module(pg_server: str) -> Iterator[str]:
    yield from _pg_database(pg_server)


def _pg_database(admin: str) -> Iterator[str]:
    import psycopg

    name = f"mmbatch_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(scope="module")
def redis_url(redis_server: str) -> Iterator[str]:
    """Redis for one module; pair it with ``broker_prefix`` so that runs sharing the server
    (several suites at once on one machine) never see each other's queues."""
    yield f"{redis_server}/11"


@pytest.fixture(scope="module")
def broker_prefix(redis_url: str) -> Iterator[str]:
    import redis

    prefix = f"mmbatch-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def embedded_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings.from_env({"MMBATCH_DATA_DIR": str(data_dir)}, **overrides)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A small sample: a labelled archive and an unlabelled one, made once per session."""
    from samples.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("sample"), n_train=96, n_unlabelled=32, seed=7)


def make_key(db_url: str, name: str = "test", tenant: str | None = None) -> str:
    """A new API key in the database at ``db_url`` (migrated first)."""
    from store import keys
    from store.db import Database
    from store.migrate import upgrade

    upgrade(db_url)
    db = Database(db_url)
    try:
        with db.session() as s:
            return keys.create_key(s, name, tenant).key
    finally:
        db.dispose()
