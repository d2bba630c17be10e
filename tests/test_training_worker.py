"""The worker's side of encoder modes on its own: modes from job options, the heartbeat that
keeps a long training from looking stale to the sweeper, and the cap on models' own encoders a
worker keeps loaded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mmbatch.contract import OptionError, TrainOptions
from mmbatch.settings import Settings
from models.training import Progress
from store import jobs
from store.blobs import BlobStore
from store.migrate import upgrade
from store.registry import ModelRow
from worker import model_cache, training
from worker.model_cache import ModelCache
from worker.runtime import Runtime


def test_modes_from_options() -> None:
    def modes(options: dict[str, str], modalities: list[str]) -> dict[str, str]:
        return TrainOptions.from_dict(options).encoder_modes(modalities)

    assert modes({}, ["image", "text"]) == {"image": "frozen", "text": "frozen"}
    assert modes({"mode": "scratch", "text_mode": "auto"}, ["image", "text", "audio"]) == {
        "image": "scratch", "text": "auto", "audio": "scratch"}
    assert modes({"mode": "finetune", "audio_mode": "frozen"}, ["image", "audio"]) == {
        "image": "finetune", "audio": "frozen"}
    with pytest.raises(OptionError, match="image_mode must be one of .*got 'tuned'"):
        modes({"image_mode": "tuned"}, ["image"])


def test_the_pulse_writes_progress_and_stops_a_cancelled_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    rt = Runtime(settings)
    try:
        with rt.db.session() as s:
            job_id = jobs.create_job(s, kind="train", archive_blob="0" * 64, archive_name="a",
                                     archive_bytes=1, model_version_id=None).id
            jobs.transition(s, job_id, ("queued",), "running", stage="training")
            before = jobs.get_job(s, job_id).updated_at
        pulse = training.Pulse(rt, job_id, epochs=100)
        pulse(Progress(1, 31, 0.5))  # within PULSE_SECONDS of the start: nothing written
        with rt.db.session() as s:
            assert jobs.get_job(s, job_id).updated_at == before
        monkeypatch.setattr(training, "PULSE_SECONDS", 0.0)
        time.sleep(0.01)
        pulse(Progress(2, 32, 0.75))
        with rt.db.session() as s:
            job = jobs.get_job(s, job_id)
            assert job.updated_at > before
            assert job.report["training"]["epoch"] == 2
            assert job.report["training"]["val_macro_f1"] == 0.75
            jobs.cancel_job(s, job_id)
        with pytest.raises(training.TrainingStopped, match="cancelled"):
            pulse(Progress(3, 33, 0.75))
    finally:
        rt.close()


def test_the_pulse_gives_the_task_back_when_the_worker_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.worker import state

    rt = Runtime(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)}))
    try:
        monkeypatch.setattr(state, "should_stop", 0)  # a warm shutdown (SIGTERM)
        with pytest.raises(training.TrainingInterrupted):
            training.Pulse(rt, "no-job", epochs=10)(Progress(1, 10, None))
    finally:
        rt.close()


def _model(model_id: int, blob: str) -> ModelRow:
    """A model whose text encoder is its own scratch encoder, stored as ``blob``."""
    return ModelRow(model_id, None, "m", 1, ["a", "b"],
                    {"text": {"name": "scratch", "version": f"scratch-{blob}", "dim": 64,
                              "mode": "scratch"}},
                    {"scratch": {"text": {"config": {}, "weights_blob": blob}}}, "0" * 64)


def test_own_encoders_beyond_the_cap_are_let_go(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_cache, "OWN_ENCODERS", 2)
    loads: list[str] = []

    def load(self: ModelCache, modality: str, mode: str, entry: dict, version: str) -> str:
        loads.append(entry["weights_blob"])
        return entry["weights_blob"].upper()

    monkeypatch.setattr(ModelCache, "_load_own", load)
    cache = ModelCache(Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path)}),
                       BlobStore(tmp_path))
    a, b, c = _model(1, "a"), _model(2, "b"), _model(3, "c")
    assert cache.own_encoders(a) == {"text": "A"}
    assert cache.own_encoders(b) == {"text": "B"}
    assert cache.own_encoders(a) == {"text": "A"}  # loaded once, now the most recently used
    assert cache.own_encoders(c) == {"text": "C"}
    assert loads == ["a", "b", "c"]
    assert cache.own_encoders(b) == {"text": "B"}  # b was the least recently used: let go
    assert loads == ["a", "b", "c", "b"]
    cache.close()
