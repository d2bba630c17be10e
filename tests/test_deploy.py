"""The deployment files: docker-compose.yml and its overrides validate and name the services
they must run, the images split as the compose file uses them, the ingest side is torch-free.
scripts/compose-check.sh (``make compose-check``) builds and runs all of it for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from mmbatch.contract import INGEST_QUEUE, TASK_QUEUES
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


MODEL_STACK = {"torch", "torchaudio", "torchvision", "timm", "transformers"}
# What the model worker serves: every queue but ingest's (batches, training).
MODEL_QUEUES = set(TASK_QUEUES.values()) - {INGEST_QUEUE}
TORCH_FREE = ("web", "migrate", "worker-cpu", "beat", "flower")


def _config(*overrides: str) -> dict:
    compose = _compose()
    if compose is None:
        if IN_CI:
            pytest.fail("no Compose implementation (make test installs docker-compose)")
        pytest.skip("no Compose implementation installed")
    files = [arg for name in ("docker-compose.yml", *overrides) for arg in ("-f", str(ROOT / name))]
    out = subprocess.run([*compose, *files, "config"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_file_validates() -> None:
    services = _config()["services"]
    assert {"redis", "postgres", "migrate", "web", "worker-gpu", "worker-cpu", "beat",
            "flower", "search"} <= set(services)
    # the API finds the search service by its service name
    assert services["web"]["environment"]["MMBATCH_SEARCH_URL"] == "http://search:8001"
    assert _option(services["search"]["command"], "--port") == "8001"
    for name in ("web", "worker-gpu", "worker-cpu", "beat", "flower", "migrate"):
        env = services[name]["environment"]
        assert env["MMBATCH_BROKER_URL"].startswith("redis://"), name
        assert env["MMBATCH_DATABASE_URL"].startswith("postgresql+psycopg://"), name
    for name in ("web", "worker-gpu", "worker-cpu", "beat", "search"):
        assert any(str(v).startswith("blobs:/data") for v in services[name]["volumes"]), name
    for name in ("web", "worker-gpu", "worker-cpu", "beat", "search"):
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully", name
    for name in ("redis", "postgres", "web", "worker-gpu", "worker-cpu", "flower", "search"):
        assert services[name]["healthcheck"]["test"], name

    gpu = services["worker-gpu"]
    assert _option(gpu["command"], "--pool") == "solo"
    assert set(_option(gpu["command"], "-Q").split(",")) == MODEL_QUEUES
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
    assert "FROM base-deps AS web" in dockerfile and "FROM base-deps AS worker" in dockerfile
    # torch-free processes run from the web image, model work from the worker image
    for name in TORCH_FREE:
        assert services[name]["image"].startswith("mmbatch-web:"), name
        assert services[name]["build"]["target"] == "web", name
    assert gpu["image"].startswith("mmbatch-worker:") and gpu["build"]["target"] == "worker"
    for name in ("worker-cpu", "beat", "flower"):
        assert _option(services[name]["command"], "-A") == "worker.ingest_app", name
    assert _option(gpu["command"], "-A") == "worker.celery_app"


def test_flower_is_published_on_the_loopback_only() -> None:
    """Flower has no login by default and can shut workers down: by default it answers on the
    host's loopback only, while the API listens on every address."""
    services = _config()["services"]
    assert [_host_ip(port) for port in services["flower"]["ports"]] == ["127.0.0.1"]
    assert [_host_ip(port) for port in services["web"]["ports"]] == [""]


def test_the_cpu_override_swaps_the_gpu_worker_for_a_cpu_one() -> None:
    services = _config("docker/compose.cpu.yml")["services"]
    assert services["worker-gpu"]["scale"] == 0
    model = services["worker-model"]
    assert "deploy" not in model
    assert set(_option(model["command"], "-Q").split(",")) == MODEL_QUEUES
    assert _option(model["command"], "-A") == "worker.celery_app"
    assert model["image"] == services["worker-gpu"]["image"]
    assert model["volumes"] == services["worker-gpu"]["volumes"]
    # the same environment as the other workers, on the CPU (this file cannot share the anchor)
    assert model["environment"] == services["worker-cpu"]["environment"]
    assert model["environment"]["MMBATCH_DEVICE"] == "cpu"
    assert model["healthcheck"] == services["worker-cpu"]["healthcheck"]
    assert model["depends_on"] == services["worker-cpu"]["depends_on"]


def test_the_local_services_override_builds_redis_and_postgres() -> None:
    services = _config("docker/compose.local-services.yml")["services"]
    for name in ("redis", "postgres"):
        assert services[name]["build"]["context"].endswith(f"docker/{name}"), name
        assert not services[name]["image"].startswith(f"{name}:"), name  # not the official name
    user_facing = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert user_facing["redis"]["image"] == "redis:7"
    assert user_facing["postgres"]["image"] == "postgres:15"


def test_the_check_sweep_override_only_quickens_the_sweeper() -> None:
    """scripts/compose-check.sh recreates beat and worker-cpu with it before killing the model
    worker: their environment gains the sweeper's two settings and keeps everything else."""
    base = _config("docker/compose.cpu.yml")["services"]
    swept = _config("docker/compose.cpu.yml", "docker/compose.check-sweep.yml")["services"]
    assert swept["beat"]["environment"] == {**base["beat"]["environment"],
                                            "MMBATCH_SWEEP_INTERVAL_SECONDS": "5"}
    assert swept["worker-cpu"]["environment"] == {**base["worker-cpu"]["environment"],
                                                  "MMBATCH_STALE_AFTER_SECONDS": "20"}
    for name in set(base) - {"beat", "worker-cpu"}:
        assert swept[name] == base[name], name


def test_the_base_dependencies_have_no_model_stack() -> None:
    """The web image installs `dependencies` only; the model stack is the `models` extra, which
    `pip install -e '.[test]'` (the Makefile) pulls in through `test`."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    base = {_name(dep) for dep in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not base & MODEL_STACK, base & MODEL_STACK
    assert not base & {"scikit-learn", "cleanlab"}  # models.label_issues: training only
    assert MODEL_STACK <= {_name(dep) for dep in extras["models"]}
    assert "mmbatch[models]" in extras["test"]
    assert "flower" in base  # Flower runs from the web image


def test_the_ingest_app_loads_no_torch(tmp_path: Path) -> None:
    """worker.ingest_app's processes (ingest worker, beat, Flower) import every task module they
    run and still no torch: they run from the web image."""
    code = """
import json, sys
from worker.ingest_app import app
app.loader.import_default_modules()
tasks = sorted(name for name in app.tasks if name.startswith("mmbatch."))
print(json.dumps({"tasks": tasks, "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (sorted(MODEL_STACK | {"models"}),)
    env = {**os.environ, "MMBATCH_BROKER_URL": "memory://", "MMBATCH_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["tasks"] == sorted(t for t, q in TASK_QUEUES.items() if q == INGEST_QUEUE)


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _name(requirement: str) -> str:
    for stop in "[<>=!~; ":
        requirement = requirement.split(stop)[0]
    return requirement.lower()


def _host_ip(port: str | dict) -> str:
    """The host address of a published port as `config` prints it: docker-compose 1.29 writes
    "ADDRESS:PUBLISHED:TARGET/PROTO" (or a mapping without host_ip), Compose v2 a mapping."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    parts = str(port).split(":")
    return parts[0] if len(parts) == 3 else ""
