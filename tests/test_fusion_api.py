"""Model options of train jobs, and the model registry endpoints (web/models_api.py).

The app from its factory over a real SQLite database; the broker is kombu's in-memory
transport and nothing consumes it, so results are written here the way a worker writes them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from mmbatch.contract import TrainOptions
from mmbatch.scoring import score_labels as score
from mmbatch.settings import Settings
from store import jobs
from store.blobs import BlobStore
from store.db import Database
from store.keys import create_key
from store.migrate import upgrade
from store.registry import register_model
from tests.util import tar_bytes
from web.app import create_app

ENCODERS = {"text": {"name": "minilm", "version": "v1", "dim": 384}}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    with db.session() as s:
        mine, other = create_key(s, "mine"), create_key(s, "other")
    app = create_app(settings)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {mine.key}"
    yield {"settings": settings, "db": db, "client": client, "tenant": mine.tenant_id,
           "other_tenant": other.tenant_id, "blobs": BlobStore(settings.blobs)}
    db.dispose()


def _model(env: dict[str, Any], tenant: int | None = None, **metrics: Any) -> int:
    with env["db"].session() as s:
        return register_model(s, name="m", fusion="gated", classes=["a", "b"], encoders=ENCODERS,
                              metrics=metrics, config={}, checkpoint_blob="0" * 64, job_id=None,
                              tenant_id=env["tenant"] if tenant is None else tenant).id


def _error(response: Any) -> str:
    return str(response.get_json()["error"]["code"])


@pytest.mark.parametrize("form, code", [
    ({"strategy": "sum"}, "invalid_strategy"),
    ({"loss": "hinge"}, "invalid_loss"),
    ({"loss": "focal", "gamma": "lots"}, "invalid_gamma"),
    ({"loss": "focal", "gamma": "nan"}, "invalid_gamma"),
    ({"loss": "focal", "gamma": "11"}, "invalid_gamma"),
    ({"gamma": "2"}, "invalid_gamma"),  # gamma without focal loss
    ({"balanced": "maybe"}, "invalid_balanced"),
    ({"modality_dropout": "0.95"}, "invalid_modality_dropout"),
    ({"patience": "0"}, "invalid_patience"),
    ({"mode": "tuned"}, "invalid_mode"),
    ({"strategy": "late", "stacking_folds": "3", "mode": "finetune"}, "invalid_stacking_folds"),
    ({"text_mode": "warm"}, "invalid_text_mode"),
    ({"budget": "5"}, "invalid_budget"),
    ({"budget": "nan"}, "invalid_budget"),
    ({"budget": "soon"}, "invalid_budget"),
])
def test_bad_train_options_are_400(env: dict[str, Any], form: dict[str, str], code: str) -> None:
    r = env["client"].post("/api/v1/jobs", data={
        "kind": "train", **form, "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar")})
    assert r.status_code == 400 and _error(r) == code, r.get_json()


def test_train_options_reach_the_job(env: dict[str, Any]) -> None:
    r = env["client"].post("/api/v1/jobs", data={
        "kind": "train", "strategy": "Attention", "loss": "focal", "gamma": "1.5",
        "balanced": "yes", "modality_dropout": "0.3", "patience": "12", "epochs": "20",
        "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar")})
    assert r.status_code == 202, r.get_json()
    with env["db"].session() as s:
        options = jobs.get_job(s, r.get_json()["id"]).options
    assert options == {"epochs": 20, "strategy": "attention", "loss": "focal", "gamma": 1.5,
                       "balanced": True, "modality_dropout": 0.3, "patience": 12}
    assert TrainOptions.from_dict(options) == TrainOptions(
        epochs=20, strategy="attention", loss="focal", gamma=1.5, balanced=True,
        modality_dropout=0.3, patience=12)


def test_encoder_modes_reach_the_job(env: dict[str, Any]) -> None:
    r = env["client"].post("/api/v1/jobs", data={
        "kind": "train", "mode": "Auto", "image_mode": "frozen", "budget": "60",
        "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar")})
    assert r.status_code == 202, r.get_json()
    with env["db"].session() as s:
        options = jobs.get_job(s, r.get_json()["id"]).options
    assert options == {"mode": "auto", "image_mode": "frozen", "budget": 60.0}
    assert TrainOptions.from_dict(options).encoder_modes(["image", "text"]) == {
        "image": "frozen", "text": "auto"}


def test_promote_makes_a_version_the_default_within_its_tenant(env: dict[str, Any]) -> None:
    first, second = _model(env), _model(env)
    theirs = _model(env, tenant=env["other_tenant"])
    client = env["client"]
    assert client.get(f"/api/v1/models/{first}").get_json()["is_default"] is True
    r = client.post(f"/api/v1/models/{second}/promote")
    assert r.status_code == 200 and r.get_json()["is_default"] is True
    listed = {m["id"]: m["is_default"] for m in client.get("/api/v1/models").get_json()["models"]}
    assert listed == {first: False, second: True}
    r = client.post(f"/api/v1/models/{theirs}/promote")  # another tenant's: as if absent
    assert r.status_code == 404 and _error(r) == "not_found"
    assert client.post("/api/v1/models/9999/promote").status_code == 404
    assert client.get(f"/api/v1/models/{second}/promote").status_code == 405


def test_confusion_png_is_served_from_its_blob(env: dict[str, Any]) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"fake"
    with_png = _model(env, confusion_png=env["blobs"].put_bytes(png), val_accuracy=0.5)
    without = _model(env)
    r = env["client"].get(f"/api/v1/models/{with_png}/confusion.png")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data == png
    r = env["client"].get(f"/api/v1/models/{without}/confusion.png")
    assert r.status_code == 404 and _error(r) == "not_found"


def test_evaluate_classifies_a_labelled_archive_and_scores_its_results(
    env: dict[str, Any],
) -> None:
    model_id = _model(env)
    client = env["client"]
    archive = tar_bytes({"x1.txt": b"a", "x2.txt": b"b", "x3.txt": b"c", "x4.txt": b"d",
                    "labels.csv": b"key,label\nx1,a\nx2,b\nx3,b\nx4,zebra\n"})
    r = client.post(f"/api/v1/models/{model_id}/evaluate",
                    data={"archive": (io.BytesIO(archive), "eval.tar")})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert job["kind"] == "classify" and job["model"]["id"] == model_id
    assert r.headers["Location"] == job["links"]["self"]
    with env["db"].session() as s:
        assert jobs.get_job(s, job["id"]).options == {"evaluate": True}
        # What ingest and process_batch would have written:
        jobs.add_items(s, job["id"], [{"key": k, "media": {"text": {"blob": "0", "name": k}},
                                        "label": lab, "split": None}
                                       for k, lab in (("x1", "a"), ("x2", "b"), ("x3", "b"),
                                                      ("x4", "zebra"), ("x5", None))])
        ids = jobs.item_ids(s, job["id"])
        jobs.record_outcomes(s, job["id"], model_id, [
            jobs.ItemOutcome(ids[0], label="a", confidence=0.9),
            jobs.ItemOutcome(ids[1], label="a", confidence=0.6),
            jobs.ItemOutcome(ids[2], label="b", confidence=0.8),
            jobs.ItemOutcome(ids[3], label="b", confidence=0.7),
            jobs.ItemOutcome(ids[4], label="a", confidence=0.99)])
    scores = client.get(job["links"]["evaluation"]).get_json()
    assert scores["items"] == 4 and scores["classified"] == 4  # the unlabelled x5 is left out
    assert scores["confusion"] == [[1, 0], [1, 1]]
    assert scores["accuracy"] == pytest.approx(2 / 4)  # zebra: a label the model lacks
    assert scores["unknown_labels"] == ["zebra"]
    assert scores["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert scores["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert scores["shift"] is None  # the worker writes it when the job finishes
    shift = {"modalities": {"text": {"items": 5, "mean_shift": 0.9}}, "warnings": ["text …"]}
    with env["db"].session() as s:
        jobs.get_job(s, job["id"]).report = {"shift": shift}
    assert client.get(job["links"]["evaluation"]).get_json()["shift"] == shift
    r = client.post(f"/api/v1/models/{model_id}/evaluate", data={})
    assert r.status_code == 400 and _error(r) == "missing_archive"
    r = client.post(f"/api/v1/models/{model_id}/evaluate",
                    data={"archive": (io.BytesIO(b"not an archive" * 50), "x.zip")})
    assert r.status_code == 415
    r = client.post("/api/v1/models/9999/evaluate",
                    data={"archive": (io.BytesIO(archive), "eval.tar")})
    assert r.status_code == 404


def test_score_by_hand() -> None:
    pairs = [("a", "a", 0.9), ("a", "b", 0.8), ("b", "b", 0.7), ("b", None, None)]
    out = score(pairs, ["a", "b"])
    assert (out["items"], out["classified"], out["not_classified"]) == (4, 3, 1)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    # bins: 0.9 -> (0.8667, 0.9333] correct; 0.8 -> (0.7333, 0.8] wrong; 0.7 -> (0.6667, 0.7333]
    assert out["ece"] == pytest.approx((0.1 + 0.8 + 0.3) / 3)
    assert score([], ["a", "b"])["accuracy"] is None
