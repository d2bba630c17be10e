"""A real S3 protocol server for tests: moto's server mode, started as a subprocess on a free port.

Import the fixtures into a test module (``from tests.s3 import s3_endpoint, s3_settings``).
Each ``s3_settings`` gets its own bucket, so tests never see each other's blobs.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mmbatch.settings import Settings
from tests.util import free_port

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server running for the whole session."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto's server exited with {proc.returncode} (log: {log.name})")
            try:
                requests.get(url + "/moto-api/", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto's server did not answer on {url} (log: {log.name})")
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def s3_env(endpoint: str, bucket: str, prefix: str = "blobs") -> dict[str, str]:
    """The environment that points mmbatch's blob store at ``bucket`` on ``endpoint``."""
    return {"MMBATCH_BLOB_URL": f"s3://{bucket}/{prefix}", "MMBATCH_S3_ENDPOINT_URL": endpoint,
            "MMBATCH_S3_REGION": REGION, "MMBATCH_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "MMBATCH_S3_SECRET_ACCESS_KEY": SECRET_KEY}


def make_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"mmbatch-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_settings(s3_endpoint: str, tmp_path: Path) -> Settings:
    """Embedded settings (SQLite under tmp_path) with blobs in a fresh bucket."""
    env = {"MMBATCH_DATA_DIR": str(tmp_path), **s3_env(s3_endpoint, make_bucket(s3_endpoint))}
    return Settings.from_env(env)
