"""worker.adaptation on its own: encoder modes from job options, and the heartbeat that keeps a
long training from looking stale to the sweeper."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mmbatch.settings import Settings
from store import jobs
from store.migrate import upgrade
from worker import adaptation
from worker.runtime import Runtime


def test_modes_from_options() -> None:
    modes = adaptation.encoder_modes
    assert modes({}, ["image", "text"]) == {"image": "frozen", "text": "frozen"}
    assert modes({"mode": "scratch", "text_mode": "auto"}, ["image", "text", "audio"]) == {
        "image": "scratch", "text": "auto", "audio": "scratch"}
    assert modes({"mode": "finetune", "audio_mode": "frozen"}, ["image", "audio"]) == {
        "image": "finetune", "audio": "frozen"}
    with pytest.raises(ValueError, match="unknown image mode 'tuned'"):
        modes({"image_mode": "tuned"}, ["image"])


def test_heartbeat_touches_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    rt = Runtime(settings)
    try:
        with rt.db.session() as s:
            job_id = jobs.create_job(s, kind="train", archive_blob="0" * 64, archive_name="a",
                                     archive_bytes=1, model_version_id=None).id
            before = jobs.get_job(s, job_id).updated_at
        beat = adaptation._heartbeat(rt, job_id)
        beat(1)  # within HEARTBEAT_SECONDS of the start: nothing written
        with rt.db.session() as s:
            assert jobs.get_job(s, job_id).updated_at == before
        monkeypatch.setattr(adaptation, "HEARTBEAT_SECONDS", 0.0)
        time.sleep(0.01)
        beat(2)
        with rt.db.session() as s:
            assert jobs.get_job(s, job_id).updated_at > before
    finally:
        rt.close()


def test_own_encoders_beyond_the_cap_are_let_go(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import runtime as runtime_module

    monkeypatch.setattr(runtime_module, "OWN_ENCODERS", 2)
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    rt = Runtime(settings)
    try:
        with rt._lock:
            for blob in ("a", "b"):
                rt._own_encoders[blob] = blob.upper()
                rt._own(blob)
            assert rt._own("a") == "A"  # now the most recently used
            rt._own_encoders["c"] = "C"
            rt._own("c")
            assert list(rt._own_encoders) == ["a", "c"]  # b was the least recently used
    finally:
        rt.close()
