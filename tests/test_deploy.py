"""The deployment files: docker-compose.yml validates, and names the services it must run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_validates() -> None:
    compose = _compose()
    if compose is None:
        if IN_CI:
            pytest.fail("no Compose implementation (make test installs docker-compose)")
        pytest.skip("no Compose implementation installed")
    out = subprocess.run([*compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert {"redis", "postgres", "migrate", "web", "worker"} <= set(config["services"])
    worker_env = config["services"]["worker"]["environment"]
    assert worker_env["MMBATCH_BROKER_URL"].startswith("redis://")
    assert worker_env["MMBATCH_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "gunicorn" in (ROOT / "Dockerfile").read_text()
