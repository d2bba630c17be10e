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
    services = config["services"]
    assert {"redis", "postgres", "migrate", "web", "worker-gpu", "worker-cpu", "beat",
            "flower"} <= set(services)
    for name in ("web", "worker-gpu", "worker-cpu", "beat", "flower", "migrate"):
        env = services[name]["environment"]
        assert env["MMBATCH_BROKER_URL"].startswith("redis://"), name
        assert env["MMBATCH_DATABASE_URL"].startswith("postgresql+psycopg://"), name
    for name in ("web", "worker-gpu", "worker-cpu", "beat"):
        assert any(str(v).startswith("blobs:/data") for v in services[name]["volumes"]), name
    for name in ("web", "worker-gpu", "worker-cpu", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully", name
    for name in ("redis", "postgres", "web", "worker-gpu", "worker-cpu", "flower"):
        assert services[name]["healthcheck"]["test"], name

    gpu = services["worker-gpu"]
    assert _option(gpu["command"], "--pool") == "solo"
    assert _option(gpu["command"], "-Q") == "model,train"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["MMBATCH_DEVICE"] == "cuda"
    cpu = services["worker-cpu"]
    assert _option(cpu["command"], "-Q") == "ingest"
    assert "deploy" not in cpu
    for worker in (gpu, cpu):
        assert "-E" in worker["command"]  # task events, for Flower
        assert worker["environment"]["MMBATCH_WORKER_METRICS_PORT"] == "9808"
        assert "9808/metrics" in " ".join(worker["healthcheck"]["test"])
    assert services["beat"]["command"][3] == "beat"
    assert services["flower"]["command"][3] == "flower"
    assert services["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "gunicorn" in dockerfile and "python:web.gunicorn_conf" in dockerfile
    assert "pip install --no-cache-dir -e ." in dockerfile  # flower comes from pyproject.toml
    assert any(dep.startswith("flower") for dep in _dependencies())


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _dependencies() -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])
