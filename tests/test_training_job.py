"""A train job with model options, then a classify job, as plain functions (no Celery) on a
real SQLite database: what the model version stores, and the explanation of every result."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bench.adaptation_report import run_job
from store import jobs
from store.registry import get_model
from tests.util import embedded_runtime
from worker.runtime import Runtime


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    runtime = embedded_runtime(tmp_path_factory.mktemp("training_job"), MMBATCH_BATCH_SIZE="64")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def trained(rt: Runtime, sample_dir: Any) -> dict[str, Any]:
    job_id = run_job(rt, sample_dir.train, "train",
                  options={"name": "gated", "epochs": 60, "strategy": "gated",
                           "loss": "weighted", "balanced": True})
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded", job.error
        model = get_model(s, job.model_version_id)
        return {"id": model.id, "fusion": model.fusion, "metrics": dict(model.metrics),
                "config": dict(model.config), "classes": list(model.classes)}


def test_the_model_version_stores_its_evaluation(rt: Runtime, trained: dict[str, Any]) -> None:
    metrics, config = trained["metrics"], trained["config"]
    assert trained["fusion"] == "gated" and config["fusion"]["strategy"] == "gated"
    assert (metrics["strategy"], metrics["loss"], metrics["balanced"]) == ("gated", "weighted",
                                                                           True)
    val = metrics["validation"]
    assert set(val["per_class"]) == set(trained["classes"])
    assert {"precision", "recall"} <= set(val["per_class"][trained["classes"][0]])
    assert len(val["confusion"]) == len(trained["classes"])
    cal = val["calibration"]
    assert cal["ece_after"] <= cal["ece_before"]
    assert config["temperature"] == metrics["temperature"] == cal["temperature"] > 0
    assert set(val["ablation"]["alone"]) == set(val["ablation"]["without"]) == {
        "image", "text", "audio"}
    assert metrics["seconds_per_epoch"] > 0
    png = rt.blobs.read(metrics["confusion_png"])
    assert png.startswith(b"\x89PNG")


def test_bad_options_fail_the_job_with_a_reason(rt: Runtime, sample_dir: Any) -> None:
    job_id = run_job(rt, sample_dir.train, "train", options={"strategy": "sum", "epochs": 1})
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "failed" and "strategy" in job.error


def test_every_classify_result_carries_its_explanation(rt: Runtime, sample_dir: Any,
                                                       trained: dict[str, Any]) -> None:
    job_id = run_job(rt, sample_dir.unlabelled, "classify", model=trained["id"])
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded"
        rows = jobs.results_page(s, job, after=0, limit=1000)
        results = [(item.media, r.status, r.confidence, r.explanation) for item, r in rows]
    assert results and all(status == "ok" for _, status, _, _ in results)
    for media, _, confidence, note in results:
        present = [m for m in ("image", "text", "audio") if m in media]
        assert note["strategy"] == "gated"
        assert list(note["weights"]) == present
        assert sum(note["weights"].values()) == pytest.approx(1.0, abs=1e-4)
        assert list(note["leave_one_out"]) == present
        assert all(-1.0 <= v <= confidence + 1e-6 for v in note["leave_one_out"].values())
