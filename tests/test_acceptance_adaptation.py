"""Acceptance of encoder adaptation (bench.adaptation_report on a smaller budget): on a sample
far from the encoders' pretraining (16 x 16 glyphs, words in eight scripts, eight sources),
``auto`` beats ``frozen`` by a clear margin on a group-disjoint split, says what it picked and
why (frozen, scratch or finetune, per modality), serves its own encoders in classify jobs, and
warns when the data to classify moved."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench.adaptation_report import measure, run_job
from mmbatch.settings import Settings
from store import jobs
from store.registry import get_model
from worker.runtime import Runtime

MARGIN = 0.15  # auto's validation macro F1 over frozen's, at least


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = tmp_path_factory.mktemp("adaptation")
    out = measure(data, per_group=40, seed=0, budget=60.0, epochs=100, modes=("frozen", "auto"))
    out["data_dir"] = data
    return out


def test_auto_beats_frozen_on_a_group_disjoint_split(result: dict[str, Any]) -> None:
    frozen, auto = result["frozen"]["metrics"], result["auto"]["metrics"]
    for m in (frozen, auto):
        assert m["split"].startswith("group-disjoint")
        assert m["groups"]["shared"] == 0 and m["groups"]["val"] >= 1
    assert auto["val_macro_f1"] >= frozen["val_macro_f1"] + MARGIN, (frozen, auto)
    assert frozen["encoder_modes"] == {"image": "frozen", "text": "frozen"}


def test_auto_reports_what_it_picked_and_why(result: dict[str, Any]) -> None:
    auto = result["auto"]
    report = auto["metrics"]["adaptation"]["modalities"]
    # The words are mostly unknown to the English text encoder: scratch must win there.
    assert report["text"]["mode"] == "scratch" == auto["metrics"]["encoder_modes"]["text"]
    for modality, r in report.items():
        assert r["requested"] == "auto" and r["why"]
        assert r["mode"] in ("frozen", "scratch", "finetune")
        candidates = {c: r[c]["val_macro_f1"] for c in ("scratch", "finetune")}
        assert all(r[c]["seconds_per_epoch"] > 0 for c in ("frozen", *candidates))
        best = max(candidates, key=candidates.__getitem__)
        expected = best if candidates[best] > r["frozen"]["val_macro_f1"] + 0.01 else "frozen"
        assert r["mode"] == expected, (modality, r)
        assert r["mode"] in r["why"]
    assert auto["metrics"]["seconds_per_epoch"] > 0


def test_scratch_encoders_ship_with_the_model(result: dict[str, Any]) -> None:
    auto = result["auto"]
    text = auto["encoders"]["text"]
    section = auto["config"]["scratch"]["text"]
    assert text["mode"] == "scratch" and text["name"] == "scratch_byte_cnn"
    # The feature-cache key names the weights, never a frozen encoder's version.
    assert text["version"] == f"scratch_byte_cnn-{section['weights_blob'][:16]}"
    assert result["classify"]["state"] == "succeeded"
    assert result["classify"]["failed"] == 0 and result["classify"]["done"] > 0


def test_classifying_the_training_data_does_not_warn(result: dict[str, Any]) -> None:
    shift = result["classify"]["shift"]
    assert shift is not None and shift["warnings"] == []
    assert set(shift["modalities"]) == {"image", "text"}
    assert all(s["mean_shift"] < 0.3 for s in shift["modalities"].values())


def _moved_archive(path: Path) -> Path:
    """Large colour photos-like gradients and English sentences: nothing like the training."""
    rng = np.random.default_rng(5)
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(24):
            pixels = rng.integers(0, 255, (96, 128, 3)).astype(np.uint8)
            pixels[:, :, i % 3] = np.linspace(0, 255, 128).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            add(f"moved/{i:03d}.png", buf.getvalue())
            add(f"moved/{i:03d}.txt",
                f"The quick brown fox number {i} jumps over the lazy dog again.".encode())
    return path


def test_classifying_moved_data_warns(result: dict[str, Any]) -> None:
    data: Path = result["data_dir"]
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(data),
                                  "MMBATCH_BROKER_URL": "memory://"})
    rt = Runtime(settings)
    try:
        job_id = run_job(rt, _moved_archive(data / "moved.tar"), "classify",
                         model=result["auto"]["id"])
        with rt.db.session() as s:
            job = jobs.get_job(s, job_id)
            assert job.state == "succeeded", job.error
            shift = job.report["shift"]
            assert get_model(s, result["auto"]["id"]).id == job.model_version_id
    finally:
        rt.close()
    assert {w.split()[0] for w in shift["warnings"]} == {"image", "text"}, shift
    assert all(s["mean_shift"] > 0.3 for s in shift["modalities"].values())
