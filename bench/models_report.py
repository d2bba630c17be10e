"""Acceptance figures of the fusion models, on the project's generated sample.

    python -m bench.models_report [--train 480] [--seed 0] [--json var/bench/models.json]

Writes a labelled sample (``samples.sample``: the image tells the time of day, the audio the
animal, the caption hints weakly at either), extracts frozen encoder features once, splits the
items into stratified halves, and on them:

1. trains every fusion strategy and a single-modality model per modality, and prints validation
   accuracy, macro F1, the accuracy with each modality removed from every validation item, and
   the ECE before and after temperature scaling;
2. makes a 1:20 imbalanced variant (every class but the first cut to a twentieth of it) and
   compares macro F1 with plain cross-entropy, class weights, focal loss and balanced sampling;
3. trains one configuration twice with one seed and checks the metrics are identical.

A few minutes on two CPU cores; the figures are in docs/models.md, and
tests/test_acceptance_models.py asserts the acceptance criteria on the same computation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch

from bench.adaptation_report import embedded_runtime, run_timed_job
from bench.report import save_json
from mmbatch.contract import DEFAULT_STRATEGY, DERIVED_MODALITIES, MODALITIES, STRATEGIES
from mmbatch.scoring import score_labels
from models.evaluation import accuracy_with_mask, calibration, modality_ablation
from models.fusion import FusionConfig
from models.registry import build_encoder
from models.stacking import fit_fusion
from models.training import (
    FeatureSet,
    TrainConfig,
    evaluate,
    fit,
    stack_features,
    stratified_split,
)
from samples.shifted import write_shifted
from store import jobs
from store.registry import ModelRow, get_model
from worker.model_cache import models_of
from worker.runtime import Runtime
from worker.training import cached_inputs

# Training used throughout: the service's defaults except fewer epochs (early stopping ends
# runs well before 300 anyway).
# The modalities the sample's files hold (a clip's video features come from the image encoder:
# the sample has none unless written with clips).
FILE_MODALITIES = tuple(m for m in MODALITIES if m not in DERIVED_MODALITIES)
TRAIN = TrainConfig(epochs=150, patience=25, seed=0)


@dataclass
class Extracted:
    """Frozen features of a labelled archive, every modality in ``FILE_MODALITIES`` order."""

    data: FeatureSet  # features (N, D_m) zeros where missing, mask (N, 3), labels (N,)
    classes: list[str]
    keys: list[str]
    splits: list[str | None]  # from labels.csv

    def split(self, name: str) -> FeatureSet:
        return self.data.subset([i for i, s in enumerate(self.splits) if (s or "train") == name])


def extract(archive: Path, batch_size: int = 32) -> Extracted:
    """Walk ``archive`` as the service does, decode every file and run the frozen encoders."""
    from media import decode as media
    from media.archive import walk

    blobs: dict[str, bytes] = {}

    def keep(f: IO[bytes]) -> str:
        data = f.read()
        name = f"{len(blobs):08d}"
        blobs[name] = data
        return name

    found = walk(archive, keep)
    keys = sorted(k for k in found.items if k in found.labels)
    classes = sorted({found.labels[k][0] for k in keys})
    decoders = {"image": media.decode_image, "text": media.decode_text,
                "audio": media.decode_audio}
    features: dict[str, torch.Tensor] = {}
    mask = torch.zeros(len(keys), len(FILE_MODALITIES), dtype=torch.bool)
    for j, modality in enumerate(FILE_MODALITIES):
        encoder = build_encoder(modality)
        rows = [i for i, k in enumerate(keys) if modality in found.items[k]]
        inputs = []
        for i in rows:
            ref = found.items[keys[i]][modality]
            inputs.append(encoder.preprocess(decoders[modality](blobs[ref["blob"]], ref["name"])))
        out = torch.zeros(len(keys), encoder.spec.dim)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            out[chunk] = encoder.encode(inputs[start:start + batch_size]).float()
        features[modality] = out
        mask[rows, j] = True
        del encoder
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[found.labels[k][0]] for k in keys])
    return Extracted(FeatureSet(features, mask, labels), classes, keys,
                     [found.labels[k][1] for k in keys])


def sample_features(n_train: int = 480, seed: int = 0, out_dir: Path | None = None) -> Extracted:
    """Write the labelled sample and extract its features."""
    from samples.sample import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_sample(Path(out_dir or tmp), n_train=n_train, n_unlabelled=1, seed=seed,
                             fmt="tar")
        return extract(paths.train)


def fusion_config(ex: Extracted, strategy: str, modalities: tuple[str, ...] = FILE_MODALITIES
                  ) -> FusionConfig:
    return FusionConfig(
        input_dims={m: int(ex.data.features[m].shape[1]) for m in modalities},
        num_classes=len(ex.classes), strategy=strategy)


def restrict(data: FeatureSet, modalities: tuple[str, ...]) -> FeatureSet:
    """Only the features and mask columns of ``modalities`` (for single-modality models)."""
    cols = [FILE_MODALITIES.index(m) for m in modalities]
    return FeatureSet({m: data.features[m] for m in modalities}, data.mask[:, cols], data.labels)


def single_modality(ex: Extracted, train: FeatureSet, val: FeatureSet,
                    tcfg: TrainConfig = TRAIN) -> dict[str, float]:
    """Validation accuracy of a model trained and tested on one modality, per modality; items
    lacking it count (the model has nothing to go on for them)."""
    out = {}
    for m in FILE_MODALITIES:
        _, metrics = fit(restrict(train, (m,)), restrict(val, (m,)),
                             fusion_config(ex, "concat", (m,)), tcfg)
        out[m] = float(metrics["val_accuracy"])
    return out


def strategy_rows(ex: Extracted, train: FeatureSet, val: FeatureSet,
                  strategies: tuple[str, ...] = STRATEGIES,
                  tcfg: TrainConfig = TRAIN) -> dict[str, dict[str, Any]]:
    """Per strategy: validation accuracy and macro F1, accuracy with each modality removed
    from every validation item, ECE before and after temperature scaling, seconds."""
    rows: dict[str, dict[str, Any]] = {}
    for strategy in strategies:
        started = time.perf_counter()
        model, metrics = fit_fusion(train, val, fusion_config(ex, strategy), tcfg)
        without = {}
        for i, m in enumerate(FILE_MODALITIES):
            mask = val.mask.clone()
            mask[:, i] = False
            without[m] = accuracy_with_mask(model, val, mask)
        cal = calibration(model, val)
        rows[strategy] = {
            "accuracy": float(metrics["val_accuracy"]),
            "macro_f1": float(metrics["val_macro_f1"]),
            "without": without,
            "ece_before": cal["ece_before"],
            "ece_after": cal["ece_after"],
            "temperature": cal["temperature"],
            "epochs": metrics["epochs"],
            "seconds": time.perf_counter() - started,
        }
    return rows


def imbalanced(data: FeatureSet, ratio: int = 20) -> FeatureSet:
    """A 1:``ratio`` variant: the first class keeps all its items, every other class keeps
    1/``ratio`` as many (at least one), the first ones in order (deterministic)."""
    counts = torch.bincount(data.labels)
    minority = max(1, int(counts[0]) // ratio)
    keep: list[int] = []
    for c in range(len(counts)):
        members = (data.labels == c).nonzero().flatten().tolist()
        keep += members if c == 0 else members[:minority]
    return data.subset(sorted(keep))


IMBALANCE_VARIANTS: dict[str, dict[str, Any]] = {
    "ce": {"loss": "ce"},
    "weighted": {"loss": "weighted"},
    "focal (gamma 2)": {"loss": "focal", "gamma": 2.0},
    "ce + balanced sampling": {"loss": "ce", "balanced": True},
}


def imbalance_rows(ex: Extracted, train: FeatureSet, held_out: FeatureSet, seed: int = 0,
                   ratio: int = 20, tcfg: TrainConfig = TRAIN, strategy: str = "concat"
                   ) -> dict[str, Any]:
    """Macro F1 per loss when training on a 1:``ratio`` imbalanced variant.

    The model trains on the imbalanced ``train`` and stops early on an equally imbalanced
    validation half of ``held_out``, as a user's own split would be; it is scored on the other
    half, left balanced, so that every class weighs the same in the macro F1 and the three
    minority classes have more than one or two items each (the protocol of long-tailed
    benchmarks such as CIFAR-10-LT).
    """
    names = [str(int(c)) for c in held_out.labels.tolist()]
    val_idx, test_idx = stratified_split(names, 0.5, seed)
    train_i = imbalanced(train, ratio)
    val_i = imbalanced(held_out.subset(val_idx), ratio)
    test = held_out.subset(test_idx)
    out: dict[str, Any] = {"sizes": {"train": len(train_i), "val": len(val_i),
                                     "test": len(test)}, "losses": {}}
    for name, options in IMBALANCE_VARIANTS.items():
        model, _ = fit(train_i, val_i, fusion_config(ex, strategy), replace(tcfg, **options))
        scores = evaluate(model, test, ex.classes)
        out["losses"][name] = {"macro_f1": float(scores["macro_f1"]),
                               "accuracy": float(scores["accuracy"])}
    return out


def reproducible(ex: Extracted, train: FeatureSet, val: FeatureSet, strategy: str = "attention",
                 tcfg: TrainConfig = TRAIN) -> bool:
    """Two runs with one seed give identical metrics (timings aside)."""
    results = []
    for _ in range(2):
        _, metrics = fit(train, val, fusion_config(ex, strategy), tcfg)
        results.append({k: v for k, v in metrics.items() if not k.startswith("seconds")})
    return results[0] == results[1]


def split_half(ex: Extracted, seed: int) -> tuple[FeatureSet, FeatureSet]:
    """A stratified 50/50 split: a larger validation half than labels.csv's 20% keeps the
    figures' sampling noise near ±3 points instead of ±5."""
    names = [ex.classes[int(c)] for c in ex.data.labels.tolist()]
    train_idx, val_idx = stratified_split(names, 0.5, seed)
    return ex.data.subset(train_idx), ex.data.subset(val_idx)


def figures(ex: Extracted, seed: int = 0) -> dict[str, Any]:
    """Every acceptance figure, as plain numbers."""
    train, val = split_half(ex, seed)
    tcfg = replace(TRAIN, seed=seed)
    return {
        "sizes": {"items": len(ex.keys), "train": len(train), "val": len(val)},
        "single": single_modality(ex, train, val, tcfg),
        "strategies": strategy_rows(ex, train, val, tcfg=tcfg),
        "imbalance": imbalance_rows(ex, train, val, seed=seed, tcfg=tcfg),
        "reproducible": reproducible(ex, train, val, tcfg=tcfg),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render(fig: dict[str, Any]) -> str:
    """The figures as the Markdown tables of docs/models.md."""
    single, rows = fig["single"], fig["strategies"]
    best_single = max(single.values())
    sizes = fig["sizes"]
    lines = [
        f"{sizes['items']} labelled items: train {sizes['train']}, validation {sizes['val']} "
        "(stratified halves). Validation accuracy of a model trained on one modality: "
        + ", ".join(f"{m} {_pct(a)}" for m, a in single.items()) + ".",
        "",
        ("| strategy | val acc | macro F1 | vs best single | without image | without text "
         "| without audio | ECE before | ECE after | T |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for strategy, r in rows.items():
        lines.append(
            f"| {strategy} | {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | "
            f"{100 * (r['accuracy'] - best_single):+.1f} | "
            + " | ".join(_pct(r["without"][m]) for m in FILE_MODALITIES)
            + f" | {r['ece_before']:.3f} | {r['ece_after']:.3f} | {r['temperature']:.2f} |"
        )
    imb = fig["imbalance"]
    lines += [
        "",
        (f"1:20 imbalanced variant (concat): train {imb['sizes']['train']} items, validation "
         f"{imb['sizes']['val']} (both 1:20), scored on {imb['sizes']['test']} balanced "
         "held-out items:"),
        "",
        "| loss | macro F1 | accuracy |",
        "| --- | --- | --- |",
    ]
    for name, r in imb["losses"].items():
        lines.append(f"| {name} | {_pct(r['macro_f1'])} | {_pct(r['accuracy'])} |")
    lines += ["", f"Same seed, same metrics (attention, trained twice): {fig['reproducible']}"]
    return "\n".join(lines)


# --- the shifted acceptance set (samples.shifted), through the service's own train path --------

# What a user can ask of a train job, compared on data far from the encoders' world: the default
# first (it pays the feature extraction; the others read the cache).
SHIFTED_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "frozen concat": {"strategy": "concat", "mode": "frozen"},
    "late stacking_folds=5": {"strategy": "late", "stacking_folds": 5},
    "auto concat": {"strategy": "concat", "mode": "auto"},
    "auto stack": {"mode": "auto"},
}


def shifted_figures(data_dir: Path, n_train: int = 3200, n_test: int = 1200, seed: int = 0,
                    variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train each variant on ``shifted_train.tar`` (ingest, extraction and training as plain
    functions on SQLite, as bench.adaptation_report does), classify ``shifted_test.tar`` with
    it, and score: test accuracy and macro F1, each modality alone on the test items (the
    model with the others masked), extraction and training seconds."""
    rt = embedded_runtime(data_dir)
    try:
        train_tar, test_tar = write_shifted(data_dir / "shifted", n_train, n_test, seed)
        out: dict[str, Any] = {"train": n_train, "test": n_test, "seed": seed, "variants": {}}
        for name, options in (variants or SHIFTED_VARIANTS).items():
            job_id, times = run_timed_job(rt, train_tar, "train", options={"name": "shifted",
                                                                          "seed": seed,
                                                                          **options})
            model_id = _model_id(rt, job_id)
            classify, classify_times = run_timed_job(rt, test_tar, "classify", model=model_id)
            row = out["variants"][name] = {
                "options": options, **times, "classify_seconds": classify_times["extract_seconds"],
                **_test_scores(rt, classify, model_id)}
            if (options.get("strategy") or DEFAULT_STRATEGY) == "stack":
                # the same test archive again, the model adapted to it first (adapt=true)
                adapted, adapt_times = run_timed_job(rt, test_tar, "classify", model=model_id,
                                                  options={"adapt": True})
                derived = _model_id(rt, adapted)
                scores = _test_scores(rt, adapted, derived)
                row["adapt"] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                                "alone": scores["alone"], "model": derived,
                                "seconds": adapt_times["extract_seconds"]
                                + adapt_times["train_seconds"]}
        return out
    finally:
        rt.close()


def _model_id(rt: Runtime, job_id: str) -> int:
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        if job.state != "succeeded" or job.model_version_id is None:
            raise RuntimeError(f"job {job_id} {job.state}: {job.error}")
        return int(job.model_version_id)


def _test_scores(rt: Runtime, job_id: str, model_id: int) -> dict[str, Any]:
    """A classify job's scores against its archive's labels, and the model's test accuracy
    with each modality alone (read back from the feature cache)."""
    with rt.db.session() as s:
        job = jobs.get_job(s, job_id)
        version = get_model(s, model_id)
        model, metrics = ModelRow.of(version), dict(version.metrics or {})
        pairs, rows = [], []
        after = 0
        while page := jobs.results_page(s, job, after=after, limit=1000):
            for item, r in page:
                if item.label is None:
                    continue
                pairs.append((item.label, r.label if r is not None and r.status == "ok"
                              else None, r.confidence if r is not None else None))
                rows.append(jobs.ItemRow.of(item))
            after = page[-1][0].id
        scored = score_labels(pairs, list(model.classes))
    net = models_of(rt).classifier(model)
    dims = net.cfg.input_dims
    feats = cached_inputs(rt, rows, {c: model.encoders[c]["version"] for c in dims})
    tensors, mask = stack_features(dims, feats)
    labels = torch.tensor([list(model.classes).index(r.label) for r in rows])
    ablation = modality_ablation(net.cpu(), FeatureSet(tensors, mask, labels))
    return {"accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"],
            "alone": ablation["alone"], "all": ablation["all"],
            "val_accuracy": metrics.get("val_accuracy"),
            "stacking": metrics.get("stacking"),
            "adaptation": metrics.get("adaptation")}


def render_shifted(fig: dict[str, Any]) -> str:
    """The shifted set's table for docs/models.md."""
    lines = [(f"shifted set: train {fig['train']} items (12 sources), test {fig['test']} "
              f"(4 unseen sources), seed {fig['seed']}"), "",
             ("| train job | test acc | test macro F1 | image alone | text alone | audio alone "
              "| extraction s | training s |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in fig["variants"].items():
        for label, row, seconds in ((name, r, (f"{r['extract_seconds']:.0f}",
                                               f"{r['train_seconds']:.0f}")),
                                    (f"{name}, classified with adapt=true", r.get("adapt"),
                                     ("-", f"{(r.get('adapt') or {}).get('seconds', 0):.0f}"))):
            if row is None:
                continue
            alone = row["alone"]
            lines.append(f"| {label} | {_pct(row['accuracy'])} | {_pct(row['macro_f1'])} | "
                         + " | ".join(_pct(alone[m]) if m in alone else "-"
                                      for m in FILE_MODALITIES)
                         + f" | {seconds[0]} | {seconds[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=480, help="labelled items (default 480)")
    parser.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--shifted", action="store_true",
                        help="instead: the shifted acceptance set through the service's train "
                             "path (samples.shifted), default train job against each option")
    parser.add_argument("--shifted-train", type=int, default=3200)
    parser.add_argument("--shifted-test", type=int, default=1200)
    parser.add_argument("--variants", default=",".join(SHIFTED_VARIANTS),
                        help="with --shifted: which, comma-separated")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.shifted:
        chosen = {n: SHIFTED_VARIANTS[n] for n in args.variants.split(",")}
        with tempfile.TemporaryDirectory(prefix="shifted-") as tmp:
            shifted = shifted_figures(Path(tmp), args.shifted_train, args.shifted_test,
                                      args.seed, chosen)
        print(render_shifted(shifted))
        save_json(args.json, shifted)
        return 0
    started = time.perf_counter()
    ex = sample_features(args.train, args.seed)
    extracted = time.perf_counter()
    fig = figures(ex, args.seed)
    print(render(fig))
    print(f"\n(features {extracted - started:.0f} s, training and evaluation "
          f"{time.perf_counter() - extracted:.0f} s)")
    save_json(args.json, fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
