"""Feature families (models.families) and ``strategy=stack`` (models.stacking): the families'
invariances, the stacking's choices, its budget, determinism, masking and mixed encoder modes,
and a default train job then a classify job through the worker's functions (families cached
under their own versions, read back, the model refused where a family changed)."""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from bench.adaptation_report import run_job
from cli import main as cli_main
from cli.client import Client
from mmbatch.contract import DEFAULT_STRATEGY
from mmbatch.settings import Settings
from models.adapt import TrainingData, TrainingPlan, scratch_config, train_classifier
from models.checkpoint import load_checkpoint, save_checkpoint
from models.families import BY_COLUMN, FAMILIES, dense, families_of
from models.fusion import FusionConfig
from models.scratch import preprocess
from models.stacking import fit_stack, group_folds
from models.training import FeatureSet, TrainConfig, predict
from models.transduct import adapt_stack
from store import features as feature_cache
from store import jobs
from store.db import Database
from store.keys import create_key
from store.migrate import upgrade
from store.registry import ModelRow, default_model, get_model, register_model
from tests.util import embedded_runtime, tar_bytes
from web.app import create_app
from worker.model_cache import models_of
from worker.runtime import Runtime

# --- families ------------------------------------------------------------------------------------


def _digit(size: int, box: int, dark_on_light: bool, width: int = 2) -> Image.Image:
    """A "7" drawn in a ``box`` x ``box`` square in the middle of a ``size`` frame."""
    fg, bg = (20, 235) if dark_on_light else (235, 20)
    img = Image.new("L", (size * 4, size * 4), bg)
    draw = ImageDraw.Draw(img)
    o = (size - box) * 2
    b = box * 4
    draw.line([(o, o), (o + b, o), (o + b // 3, o + b)], fill=fg, width=width * 4)
    return img.resize((size, size), Image.Resampling.BOX).convert("RGB")


def test_image_families_ignore_polarity_and_framing() -> None:
    for family in families_of("image"):
        base = family.features(_digit(28, 20, dark_on_light=False))
        inverted = family.features(_digit(28, 20, dark_on_light=True))
        smaller = family.features(_digit(56, 20, dark_on_light=False))
        other = family.features(_digit(28, 20, dark_on_light=False).rotate(90))
        assert base.shape == (family.dim,) and np.isfinite(base).all()

        def cos(a: np.ndarray, b: np.ndarray) -> float:
            return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

        assert cos(base, inverted) > 0.95, family.column  # the same digit either way round
        assert cos(base, smaller) > 0.8, family.column  # the same digit in a wider margin
        assert cos(base, other) < min(cos(base, inverted), cos(base, smaller)) - 0.1


def test_a_photograph_and_a_blank_image_get_features_too() -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    for family in families_of("image"):
        for img in (photo, Image.new("RGB", (5, 300), "white")):
            x = family.features(img)
            assert x.shape == (family.dim,) and np.isfinite(x).all()


def test_character_ngrams_are_cached_sparse_and_fold_accents() -> None:
    family = BY_COLUMN["text:chars"]
    assert family.sparse
    cached = family.features("Sieben  Äpfel")
    assert len(cached) < 200 < family.dim  # pairs, not 16,384 values
    x = dense(family, cached)
    assert x.shape == (family.dim,) and x.sum() == cached[len(cached) // 2:].sum() > 10
    assert np.array_equal(dense(family, family.features("sieben apfel")), x)  # case, accents
    assert dense(family, family.features("")).sum() == 0


def test_audio_statistics_are_finite_whatever_the_clip() -> None:
    family = BY_COLUMN["audio:mfcc"]
    rng = np.random.default_rng(0)
    t = np.arange(16_000) / 16_000
    for wave in (np.zeros(50, np.float32), np.zeros(16_000, np.float32),
                 (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
                 rng.normal(0, 0.1, 16_000 * 40).astype(np.float32)):
        x = family.features(wave)
        assert x.shape == (family.dim,) and np.isfinite(x).all()
    glide = np.sin(2 * np.pi * (200 * t + 400 * t**2)) * np.sin(np.pi * t)  # a "word"
    quiet, loud = (family.features((g * glide).astype(np.float32)) for g in (0.01, 0.5))
    grid = slice(40, 40 + 100)  # the normalised cepstra: the same word at any loudness
    assert np.allclose(quiet[grid], loud[grid], atol=0.02)


def test_every_family_has_its_own_version() -> None:
    versions = [f.version for f in FAMILIES]
    assert len(set(versions)) == len(versions)
    assert {f.modality for f in FAMILIES} == {"image", "text", "audio"}


# --- stacking ------------------------------------------------------------------------------------


def _columns(n: int = 240, classes: int = 4, seed: int = 0) -> tuple[FeatureSet, FusionConfig]:
    """A useful dense column, a noise column the heads can memorise, a count column that tells
    the class most of the time; one item in five lacks the "image" modality."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    good = rng.normal(0, 1, (n, 16))
    good[:, :classes] += 1.5 * np.eye(classes)[y]
    noise = rng.normal(0, 1, (n, 300))
    counts = np.zeros((n, 256))
    for i in range(n):
        counts[i, rng.integers(0, 256, 6)] += 1
        if rng.random() < 0.7:
            counts[i, 200 + y[i]] += 2
    cfg = FusionConfig({"image": 16, "image:noise": 300, "text:chars": 256}, classes,
                       strategy="stack", count_columns=("text:chars",))
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[rng.random(n) < 0.2, :2] = False
    feats = {"image": good, "image:noise": noise, "text:chars": counts}
    return FeatureSet({c: torch.tensor(feats[c], dtype=torch.float32) for c in cfg.modalities},
                      mask, torch.tensor(y)), cfg


def test_stacking_keeps_what_predicts_held_out_items_and_says_why() -> None:
    data, cfg = _columns()
    result = fit_stack(data.subset(range(160)), data.subset(range(160, 240)), cfg,
                       TrainConfig(seed=0))
    cands = result.report["candidates"]
    assert cands["image"]["kept"] and cands["text:chars"]["kept"]
    assert not cands["image:noise"]["kept"] and "prior" in cands["image:noise"]["why"]
    assert result.model.modalities == ("image", "text:chars")
    assert result.metrics["strategy"] == "stack" and result.metrics["val_accuracy"] > 0.7
    assert result.oof.shape == (160, 4) and np.allclose(result.oof.sum(axis=1), 1)
    # the stack beats each column alone out of fold
    assert result.report["oof_accuracy"] > max(cands["image"]["oof_accuracy"],
                                               cands["text:chars"]["oof_accuracy"])


def test_stacking_is_deterministic_and_round_trips_its_checkpoint() -> None:
    data, cfg = _columns(seed=1)
    train, val = data.subset(range(160)), data.subset(range(160, 240))
    one = fit_stack(train, val, cfg, TrainConfig(seed=3))
    two = fit_stack(train, val, cfg, TrainConfig(seed=3))
    assert _timeless(one.metrics) == _timeless(two.metrics)
    assert np.array_equal(one.oof, two.oof)
    kept = list(one.model.modalities)
    cols = [cfg.modalities.index(c) for c in kept]
    feats, mask = {c: val.features[c] for c in kept}, val.mask[:, cols]
    data_bytes, config = save_checkpoint(one.model)
    p1, _ = predict(one.model, feats, mask)
    p2, _ = predict(load_checkpoint(data_bytes, config), feats, mask)
    assert torch.equal(p1, p2)


def _timeless(value: Any) -> Any:
    """``value`` without its "seconds" entries, at any depth."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def test_a_missing_column_cannot_change_the_prediction() -> None:
    data, cfg = _columns(seed=2)
    model = fit_stack(data.subset(range(160)), None, cfg, TrainConfig(seed=0)).model
    val = data.subset(range(160, 240))
    kept = list(model.modalities)
    cols = [cfg.modalities.index(c) for c in kept]
    feats, mask = {c: val.features[c].clone() for c in kept}, val.mask[:, cols]
    before, _ = predict(model, feats, mask)
    feats["image"][~mask[:, 0]] = float("nan")
    after, _ = predict(model, feats, mask)
    assert torch.equal(before, after) and torch.isfinite(after).all()


def test_the_budget_is_counted_on_the_callers_clock() -> None:
    data, cfg = _columns(seed=3)
    ticks = itertools.count()
    generous = fit_stack(data, None, cfg, TrainConfig(seed=0), budget_seconds=1e9,
                         clock=lambda: float(next(ticks)))
    hours = itertools.count(step=3600)
    spent = fit_stack(data, None, cfg, TrainConfig(seed=0), budget_seconds=60,
                      clock=lambda: float(next(hours)))
    assert all(len(c["trials"]) == 3 for c in generous.report["candidates"].values())
    assert all(len(c["trials"]) == 1 for c in spent.report["candidates"].values())


def test_folds_keep_groups_apart_and_every_item_is_held_out_once() -> None:
    labels = [i % 3 for i in range(60)]
    groups = [f"g{i // 6}" for i in range(60)]
    folds = group_folds(labels, groups, seed=0)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(60))
    for train, held_out in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in held_out}


def test_stacking_takes_a_scratch_encoder_beside_frozen_features() -> None:
    rng = np.random.default_rng(0)
    n, classes = 120, 3
    y = rng.integers(0, classes, n)
    words = [f"{'abc'[c]}{''.join(rng.choice(list('xyzw'), 4))}" for c in y]  # first byte tells
    frozen = torch.tensor(rng.normal(0, 1, (n, 8)), dtype=torch.float32)  # frozen text: noise
    image = torch.tensor(rng.normal(0, 1, (n, 8)) + np.eye(classes, 8)[y], dtype=torch.float32)
    cfg = FusionConfig({"image": 8, "text": 8}, classes, strategy="stack")
    data = FeatureSet({"image": image, "text": frozen}, torch.ones(n, 2, dtype=torch.bool),
                      torch.tensor(y))
    raw = torch.stack([preprocess(scratch_config("text"), w) for w in words])
    train_idx, val_idx = list(range(90)), list(range(90, n))
    training = TrainingData(data.subset(train_idx), data.subset(val_idx), train_idx, val_idx,
                            scratch={"text": raw}, scratch_present={"text": [True] * n})
    plan = TrainingPlan(cfg, TrainConfig(epochs=30, patience=10, seed=0),
                        {"image": "frozen", "text": "scratch"}, budget_seconds=60)
    trained = train_classifier(training, plan)
    text = trained.metrics["stacking"]["candidates"]["text"]
    assert text["trials"][0]["encoder"] == "trained per fold"
    assert trained.modes == {"image": "frozen", "text": "scratch"}
    assert trained.fusion.cfg.input_dims["text"] == scratch_config("text").dim
    assert text["kept"] and text["oof_accuracy"] > 0.6  # the byte CNN reads the first letter
    assert trained.oof is not None and trained.oof.shape == (90, classes)


# --- through the worker --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    runtime = embedded_runtime(tmp_path_factory.mktemp("stack_job"), MMBATCH_BATCH_SIZE="64")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def stacked(rt: Runtime, sample_dir: Any) -> dict[str, Any]:
    job_id = run_job(rt, sample_dir.train, "train", options={"name": "default"})
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded", job.error
        model = get_model(s, job.model_version_id)
        return {"id": model.id, "job": job_id, "fusion": model.fusion,
                "metrics": dict(model.metrics), "encoders": dict(model.encoders),
                "row": ModelRow.of(model)}


def test_the_default_train_job_stacks_feature_families(rt: Runtime, sample_dir: Any,
                                                       stacked: dict[str, Any]) -> None:
    assert DEFAULT_STRATEGY == "stack" and stacked["fusion"] == "stack"
    metrics = stacked["metrics"]
    candidates = metrics["stacking"]["candidates"]
    assert set(candidates) == {"image", "text", "audio", *BY_COLUMN}  # every family tried
    assert all("why" in c and "oof_macro_f1" in c for c in candidates.values())
    for column in metrics["stacking"]["kept"]:
        if column in BY_COLUMN:
            assert stacked["encoders"][column] == {
                "name": BY_COLUMN[column].name, "version": BY_COLUMN[column].version,
                "dim": BY_COLUMN[column].dim, "mode": "family"}
    assert metrics["encoder_modes"] == {"image": "frozen", "text": "frozen", "audio": "frozen"}
    assert "stack" in metrics["label_issues"]["method"]
    assert set(metrics["validation"]["ablation"]["alone"]) == {"image", "text", "audio"}
    # each family is cached per file under its own version, like an encoder's features
    with rt.db.session() as s:
        items = jobs.labelled_items(s, stacked["job"])
        for family in FAMILIES:
            blobs = [r.media[family.modality].blob for r in items if family.modality in r.media]
            assert len(feature_cache.get_features(s, family.version, blobs)) == len(set(blobs))


def test_a_classify_job_reads_the_families_back_and_explains_by_column(
        rt: Runtime, sample_dir: Any, stacked: dict[str, Any]) -> None:
    job_id = run_job(rt, sample_dir.unlabelled, "classify", model=stacked["id"])
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded", job.error
        rows = jobs.results_page(s, job, after=0, limit=1000)
    kept = stacked["metrics"]["stacking"]["kept"]
    assert rows and all(r.status == "ok" for _, r in rows)
    for item, r in rows:
        note = r.explanation
        assert note["strategy"] == "stack"
        present = [c for c in kept if c.split(":")[0] in item.media]
        # by modality, families with their modality; each column's own share beside
        assert list(note["leave_one_out"]) == list(dict.fromkeys(c.split(":")[0]
                                                                  for c in present))
        assert list(note["column_weights"]) == present
        assert sum(note["weights"].values()) == pytest.approx(1.0, abs=1e-4)
        for m, w in note["weights"].items():
            assert w == pytest.approx(sum(v for c, v in note["column_weights"].items()
                                          if c.split(":")[0] == m), abs=1e-5)
    # a worker whose family has another version refuses the model, as for an encoder
    family = next(c for c in kept if c in BY_COLUMN)
    row = stacked["row"]
    moved = dataclasses.replace(row, encoders={**row.encoders, family: {
        **row.encoders[family], "version": "old-v0"}})
    assert "retrain" in (models_of(rt).mismatch(moved) or "")
    assert models_of(rt).mismatch(row) is None


# --- learning from the archive being classified (adapt=true) ------------------------------------


def _shifted_views(seed: int = 0) -> tuple[FeatureSet, FeatureSet, FeatureSet, FusionConfig]:
    """Three views of five classes; in the target the image features are scrambled and
    offset (a new camera), the other two views unchanged."""
    rng = np.random.default_rng(seed)
    classes = 5

    def make(n: int, scramble: np.ndarray, offset: float) -> FeatureSet:
        y = rng.integers(0, classes, n)
        img = rng.normal(0, 1, (n, 20))
        img[:, :classes] += 2.0 * np.eye(classes)[y]
        aud = rng.normal(0, 1, (n, 12))
        aud[:, :classes] += 1.2 * np.eye(classes)[y]
        txt = rng.normal(0, 1, (n, 10))
        txt[:, :classes] += 1.5 * np.eye(classes)[y]
        feats = {"image": img @ scramble + offset, "text": txt, "audio": aud}
        return FeatureSet({c: torch.tensor(feats[c], dtype=torch.float32) for c in feats},
                          torch.ones(n, 3, dtype=torch.bool), torch.tensor(y))

    train, val = make(450, np.eye(20), 0.0), make(150, np.eye(20), 0.0)
    mix = 0.3 * np.eye(20) + 0.7 * np.eye(20)[rng.permutation(20)]
    target = make(600, mix, 1.5)
    return train, val, target, FusionConfig({"image": 20, "text": 10, "audio": 12}, classes,
                                            strategy="stack")


def _accuracy(model: Any, data: FeatureSet) -> float:
    probs, _ = predict(model, data.features, data.mask)
    return float((probs.argmax(dim=1) == data.labels).float().mean())


def test_co_training_learns_the_moved_view_from_the_others() -> None:
    gains = []
    for seed in (1, 2, 3):  # seeds 0-5 gave +0.3, +12.8, +4.3, +10.3, +6.9, +5.2 points
        train, val, target, cfg = _shifted_views(seed)
        model = fit_stack(train, val, cfg, TrainConfig(seed=0)).model
        assert model.modalities == ("image", "text", "audio")
        unlabelled = FeatureSet(target.features, target.mask, torch.zeros_like(target.labels))
        adapted = adapt_stack(model, train, val, unlabelled, seed=0)
        report = adapted.report
        assert report["restandardised"]["image"]["applied"]
        assert not report["restandardised"]["text"]["applied"]
        assert 0.5 <= report["threshold"] <= 0.99 and len(report["rounds"]) == 3
        gains.append(_accuracy(adapted.model, target) - _accuracy(model, target))
    assert min(gains) > 0 and sum(gains) / len(gains) >= 0.03, gains
    # the original is untouched, and the same inputs give the same adapted model
    assert torch.equal(predict(model, target.features, target.mask)[0],
                       predict(fit_stack(train, val, cfg, TrainConfig(seed=0)).model,
                               target.features, target.mask)[0])
    again = adapt_stack(model, train, val, unlabelled, seed=0)
    assert torch.equal(predict(again.model, target.features, target.mask)[0],
                       predict(adapted.model, target.features, target.mask)[0])


def test_with_one_modality_only_the_statistics_adapt() -> None:
    train, val, target, _ = _shifted_views(seed=1)

    def only_image(d: FeatureSet) -> FeatureSet:
        return FeatureSet({"image": d.features["image"]}, d.mask[:, :1], d.labels)

    cfg = FusionConfig({"image": 20}, 5, strategy="stack")
    model = fit_stack(only_image(train), only_image(val), cfg, TrainConfig(seed=0)).model
    adapted = adapt_stack(model, only_image(train), only_image(val), only_image(target))
    assert adapted.report["co_training"].startswith("one modality")
    assert adapted.report["restandardised"]["image"]["applied"]


def test_a_classify_job_with_adapt_answers_from_a_derived_version(
        rt: Runtime, sample_dir: Any, stacked: dict[str, Any]) -> None:
    with rt.db.session() as s:
        before = default_model(s, None)
        default_before = before.id if before is not None else None
    job_id = run_job(rt, sample_dir.unlabelled, "classify", model=stacked["id"],
                     options={"adapt": True})
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        assert job.state == "succeeded", job.error
        derived = get_model(s, job.model_version_id)
        assert derived.id != stacked["id"] and derived.fusion == "stack"
        assert derived.metrics["derived_from"] == stacked["id"]
        assert derived.metrics["adapted_on_job"] == job_id
        assert "rounds" in derived.metrics["transductive"]
        after = default_model(s, None)
        assert (after.id if after is not None else None) == default_before  # never by itself
        rows = jobs.results_page(s, job, after=0, limit=1000)
        assert len(rows) == job.total and job.done + job.failed == job.total
        assert all(r is not None and r.model_version_id == derived.id for _, r in rows)
        assert all(r.status == "ok" and r.label in derived.classes for _, r in rows)


def test_adapt_is_asked_of_a_classify_job_with_a_stacked_model(tmp_path: Any) -> None:
    settings = Settings.from_env({"MMBATCH_DATA_DIR": str(tmp_path),
                                  "MMBATCH_BROKER_URL": "memory://"})
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    with db.session() as s:
        key = create_key(s, "mine")
        ids = {fusion: register_model(s, name=fusion, fusion=fusion, classes=["a", "b"],
                                      encoders={}, metrics={}, config={}, checkpoint_blob="0",
                                      job_id=None, tenant_id=key.tenant_id).id
               for fusion in ("concat", "stack")}
    client = create_app(settings).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {key.key}"

    def post(**form: str) -> Any:
        return client.post("/api/v1/jobs", data={
            **form, "archive": (io.BytesIO(tar_bytes({"a.txt": b"x"})), "a.tar")})

    for form in ({"kind": "train", "adapt": "true"},
                 {"kind": "classify", "adapt": "maybe", "model": str(ids["stack"])},
                 {"kind": "classify", "adapt": "true", "model": str(ids["concat"])}):
        r = post(**form)
        assert r.status_code == 400, (form, r.get_json())
        assert r.get_json()["error"]["code"] == "invalid_adapt"
    r = post(kind="classify", adapt="true", model=str(ids["stack"]))
    assert r.status_code == 202, r.get_json()
    with db.session() as s:
        assert jobs.get_job(s, r.get_json()["id"]).options == {"adapt": True}
    r = post(kind="classify", adapt="false", model=str(ids["stack"]))
    assert r.status_code == 202, r.get_json()
    db.dispose()


def test_the_command_line_asks_for_adaptation(tmp_path: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sent: dict[str, Any] = {}

    def submit(self: Any, archive: Any, kind: str, **options: Any) -> dict[str, Any]:
        sent.update(kind=kind, **options)
        return {"id": "j1", "state": "queued"}

    monkeypatch.setattr(Client, "submit", submit)
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes({"a.txt": b"x"}))
    out = CliRunner().invoke(cli_main.main, ["submit", str(archive), "--kind", "classify",
                                             "--adapt", "--no-resume", "--model", "3",
                                             "--url", "http://127.0.0.1:9"])
    assert out.exit_code == 0, out.output
    assert sent["kind"] == "classify" and sent["adapt"] == "true" and sent["model"] == 3
