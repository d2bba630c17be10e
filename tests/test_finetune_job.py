"""A train job in ``finetune`` mode for every modality, then classify jobs with its model, as
plain functions (no Celery) on SQLite: the tops' weights ship with the model under versions that
name them, the worker serves them, and what it serves agrees with what training measured."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from bench.adaptation_report import run_job
from models.registry import SPECS
from store import features as feature_cache
from store import jobs
from store.registry import ModelRow, get_model
from tests.util import embedded_runtime
from worker.model_cache import models_of
from worker.runtime import Runtime


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    runtime = embedded_runtime(tmp_path_factory.mktemp("finetune_job"), MMBATCH_BATCH_SIZE="64",
                               MMBATCH_PRECISION="fp32")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def trained(rt: Runtime, sample_dir: Any) -> dict[str, Any]:
    job_id = run_job(rt, sample_dir.train, "train",
                     options={"name": "tuned", "epochs": 6, "seed": 1, "patience": 10,
                              "mode": "finetune", "budget": 120, "strategy": "concat"})
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded", job.error
        model = get_model(s, job.model_version_id)
        return {"id": model.id, "metrics": dict(model.metrics), "config": dict(model.config),
                "encoders": dict(model.encoders), "classes": list(model.classes),
                "checkpoint_blob": model.checkpoint_blob, "row": ModelRow.of(model)}


def test_the_tops_ship_with_the_model(rt: Runtime, trained: dict[str, Any]) -> None:
    metrics, encoders = trained["metrics"], trained["encoders"]
    assert metrics["encoder_modes"] == {"image": "finetune", "text": "finetune",
                                        "audio": "finetune"}
    for m in ("image", "text", "audio"):
        section = trained["config"]["finetune"][m]
        assert section["base_version"] == SPECS[m].version == encoders[m]["base_version"]
        assert encoders[m]["mode"] == "finetune" and encoders[m]["dim"] == SPECS[m].dim
        assert encoders[m]["version"] == f"{SPECS[m].version}-ft-{section['weights_blob'][:16]}"
        assert rt.blobs.read(section["weights_blob"])[:8]  # stored
        assert metrics["adaptation"]["modalities"][m] == {"mode": "finetune",
                                                          "requested": "finetune"}
    assert "scratch" not in trained["config"]
    assert metrics["seconds_per_epoch"] > 0 and metrics["epochs"] >= 1
    model: ModelRow = trained["row"]
    assert models_of(rt).mismatch(model) is None
    moved = {**encoders, "image": {**encoders["image"], "base_version": "another-v0"}}
    assert "retrain" in (models_of(rt).mismatch(replace(model, encoders=moved)) or "")


def test_classify_serves_the_finetuned_encoders(rt: Runtime, sample_dir: Any,
                                               trained: dict[str, Any]) -> None:
    """Classifying the training archive again: the features come from the finetuned encoders
    (cached under their own versions, unlike the frozen ones), and the predictions agree with
    the accuracies training measured on the same items."""
    job_id = run_job(rt, sample_dir.train, "classify", model=trained["id"])
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded", job.error
        rows = jobs.results_page(s, job, after=0, limit=1000)
        blobs = {m: {item.media[m]["blob"] for item, _ in rows if m in item.media}
                 for m in ("image", "text", "audio")}
        for m, wanted in blobs.items():
            tuned = feature_cache.get_features(s, trained["encoders"][m]["version"], wanted)
            frozen = feature_cache.get_features(s, SPECS[m].version, wanted)
            assert set(tuned) == wanted == set(frozen)
            blob = sorted(wanted)[0]
            assert not np.allclose(tuned[blob], frozen[blob], atol=1e-4), m
        outcomes = [(item.label, r.label) for item, r in rows if r is not None]
    assert len(outcomes) == len(rows) and all(truth for truth, _ in outcomes)
    correct = sum(truth == predicted for truth, predicted in outcomes)
    metrics = trained["metrics"]
    expected = (metrics["train_accuracy"] * metrics["train_size"]
                + metrics["val_accuracy"] * metrics["val_size"])
    # Training saw the same bottoms and tops (fp32): only near-ties may flip.
    assert abs(correct - expected) <= 1, (correct, expected)
