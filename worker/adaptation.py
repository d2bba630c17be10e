"""Encoder modes of a train job (frozen, scratch, auto), and a scratch-encoded model's
encoders at inference.

``frozen`` (the default) trains the fusion on cached features. ``scratch`` decodes the train
job's media again from their blobs, preprocesses them for the modality's scratch encoder
(models.scratch) and trains it end to end with the fusion. ``auto`` tries both per modality
within the time budget (models.adapt.choose_modes) and keeps the better one on validation.
A scratch encoder's weights are stored as a safetensors blob next to the fusion checkpoint,
and its ``version`` (the feature-cache key) names those weights, so its features never mix with
another model's or a frozen encoder's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker.runtime import Runtime

log = logging.getLogger(__name__)

MODES = ("frozen", "scratch", "auto")
DEFAULT_BUDGET_SECONDS = 300.0
# Training touches its job this often: well under MMBATCH_STALE_AFTER_SECONDS (600 by default).
HEARTBEAT_SECONDS = 60.0
# Scratch encoders of the service: low-resolution grayscale images, the first 128 UTF-8 bytes
# of a text, the first 3 s of audio.
SCRATCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {"dim": 64, "width": 32, "image_size": 32, "image_channels": 1},
    "text": {"dim": 64, "width": 32, "max_bytes": 128},
    "audio": {"dim": 64, "width": 32, "max_frames": 300},
}


def encoder_modes(options: dict[str, Any], modalities: list[str]) -> dict[str, str]:
    """Each modality's mode: ``<modality>_mode``, else ``mode``, else frozen."""
    modes = {}
    for m in modalities:
        mode = str(options.get(f"{m}_mode") or options.get("mode") or "frozen")
        if mode not in MODES:
            raise ValueError(f"unknown {m} mode {mode!r}: expected one of {MODES}")
        modes[m] = mode
    return modes


def decode_inputs(rt: Runtime, rows: list[Any], modalities: list[str]) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """Scratch-encoder inputs of every row for ``modalities``: per modality an (N, ...) tensor
    (zeros where the item lacks it or it no longer decodes), and the configs. The media were
    decoded once already (extraction), so a failure here is rare; such an item counts as
    missing that modality."""
    import torch

    from models.scratch import ScratchConfig, preprocess
    from worker.media import MediaError
    from worker.pipeline import _decoder

    configs = {m: ScratchConfig(m, **SCRATCH_DEFAULTS[m]) for m in modalities}
    inputs: dict[str, Any] = {}
    present: dict[str, list[bool]] = {}
    for m in modalities:
        decode = _decoder(rt, m)
        tensors, ok = [], []
        blank = None
        for r in rows:
            ref = r.media.get(m)
            x = None
            if ref is not None:
                try:
                    x = preprocess(configs[m], decode(rt.blobs.read(ref["blob"]), ref["name"]))
                except (MediaError, ValueError, TypeError, OSError) as exc:  # the item loses m
                    log.warning("scratch_decode_failed blob=%s error=%s", ref["blob"], exc)
            if x is not None and blank is None:
                blank = torch.zeros_like(x)
            tensors.append(x)
            ok.append(x is not None)
        if blank is None:
            continue
        inputs[m] = torch.stack([t if t is not None else blank for t in tensors])
        present[m] = ok
    return inputs, {"configs": configs, "present": present}


def train_adapted(rt: Runtime, job_id: str, rows: list[Any], modes: dict[str, str],
                  input_dims: dict[str, int], train_idx: list[int], val_idx: list[int],
                  train_set: Any, val_set: Any, num_classes: int, fusion_kw: dict[str, Any],
                  tcfg: Any, budget_seconds: float) -> dict[str, Any]:
    """Train with scratch/auto modes. Returns the fusion model, fit metrics, FeatureSets of
    train and val as the final model sees them, the scratch encoders and their configs, and the
    adaptation report for the model's metrics. The job's ``updated_at`` moves at least every
    HEARTBEAT_SECONDS meanwhile, so the sweeper does not take a long training for a lost one."""
    import torch

    from models.adapt import AdaptedClassifier, InputSet, choose_modes, encode_all, fit_adapted
    from models.fusion import FusionConfig
    from models.training import fit

    started = time.perf_counter()
    heartbeat = _heartbeat(rt, job_id)
    wanted = [m for m in input_dims if modes[m] in ("scratch", "auto")]
    raw, info = decode_inputs(rt, rows, wanted)
    configs = {m: c for m, c in info["configs"].items() if m in raw}
    columns = {m: i for i, m in enumerate(input_dims)}

    def inputs_of(idx: list[int], features: Any) -> InputSet:
        sel = torch.tensor(idx, dtype=torch.long)
        mask = features.mask.clone()
        inputs = dict(features.features)
        for m in raw:
            inputs[m] = raw[m][sel]
            mask[:, columns[m]] &= torch.tensor([info["present"][m][i] for i in idx])
        return InputSet(inputs, mask, features.labels)

    train_in = inputs_of(train_idx, train_set)
    val_in = inputs_of(val_idx, val_set) if val_set is not None else None
    chosen = {m: ("frozen" if modes[m] == "frozen" or m not in raw else modes[m])
              for m in input_dims}
    report: dict[str, Any] = {m: {"mode": chosen[m], "requested": modes[m]} for m in input_dims}
    init: dict[str, Any] = {}
    auto = [m for m in input_dims if chosen[m] == "auto"]
    if auto:
        if val_in is None:
            raise ValueError("auto needs a validation split to choose on")
        picked, trials, init = choose_modes(
            train_in, val_in, input_dims, {m: configs[m] for m in auto}, num_classes, tcfg,
            budget_seconds / 2, train_set, val_set, on_epoch=heartbeat)
        for m in auto:
            chosen[m] = picked[m]
            report[m].update(trials[m], requested="auto")
    for m in input_dims:
        report[m]["mode"] = chosen[m]
    scratch = {m: configs[m] for m in input_dims if chosen[m] == "scratch"}
    left = max(budget_seconds - (time.perf_counter() - started), budget_seconds / 4)
    if not scratch:
        cfg = FusionConfig(input_dims=input_dims, num_classes=num_classes, **fusion_kw)
        model, metrics = fit(train_set, val_set, cfg, tcfg)
        return {"fusion": model, "metrics": metrics, "train": train_set, "val": val_set,
                "encoders": {}, "configs": {}, "report": report}
    dims = {m: scratch[m].dim if m in scratch else d for m, d in input_dims.items()}
    cfg = FusionConfig(input_dims=dims, num_classes=num_classes, **fusion_kw)
    adapted, fit_metrics = fit_adapted(train_in, val_in, cfg, tcfg, scratch,
                                       budget_seconds=left, init=init, on_epoch=heartbeat)
    train_feats = encode_all(adapted, train_in)
    val_feats = encode_all(adapted, val_in) if val_in is not None else None
    metrics = _final_metrics(adapted, train_feats, val_feats, fit_metrics, cfg, tcfg)
    log.info("adapted_training modes=%s epochs=%s seconds_per_epoch=%.3f stopped=%s",
             ",".join(f"{m}:{chosen[m]}" for m in input_dims), fit_metrics["epochs"],
             fit_metrics["seconds_per_epoch"], fit_metrics["stopped"])
    assert isinstance(adapted, AdaptedClassifier)
    return {"fusion": adapted.fusion, "metrics": metrics, "train": train_feats, "val": val_feats,
            "encoders": dict(adapted.encoders), "configs": scratch, "report": report}


def _heartbeat(rt: Runtime, job_id: str) -> Callable[[int], None]:
    from store import jobs

    last = [time.monotonic()]

    def beat(epoch: int) -> None:
        if time.monotonic() - last[0] >= HEARTBEAT_SECONDS:
            with rt.db.session() as s:
                jobs.touch(s, job_id)
            last[0] = time.monotonic()

    return beat


def _final_metrics(model: Any, train: Any, val: Any, fit_metrics: dict[str, Any], cfg: Any,
                   tcfg: Any) -> dict[str, Any]:
    """The same top-level metrics models.training.fit reports, for an adapted model."""
    from models.training import _val_scores

    _, _, train_accuracy = _val_scores(model.fusion, train)
    f1, loss, acc = _val_scores(model.fusion, val) if val is not None else (None, None, None)
    return {
        "train_accuracy": train_accuracy, "val_accuracy": acc, "val_macro_f1": f1,
        "val_loss": loss, "epochs": fit_metrics["epochs"],
        "best_epoch": fit_metrics["best_epoch"], "train_size": len(train),
        "val_size": len(val) if val is not None else 0, "seconds": fit_metrics["seconds"],
        "seconds_per_epoch": fit_metrics["seconds_per_epoch"], "stopped": fit_metrics["stopped"],
        "strategy": cfg.strategy, "loss": tcfg.loss,
        "gamma": tcfg.gamma if tcfg.loss == "focal" else None, "balanced": tcfg.balanced,
        "seed": tcfg.seed,
    }


def save_scratch(rt: Runtime, encoders: dict[str, Any], configs: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Store each scratch encoder's weights; (checkpoint config section, registry encoders)."""
    from models.scratch import encoder_version, save_encoder

    section: dict[str, Any] = {}
    registry: dict[str, Any] = {}
    for m, module in encoders.items():
        blob = rt.blobs.put_bytes(save_encoder(module))
        cfg = configs[m]
        section[m] = {"config": cfg.to_dict(), "weights_blob": blob}
        registry[m] = {"name": cfg.arch, "version": encoder_version(cfg, blob), "dim": cfg.dim,
                       "mode": "scratch"}
    return section, registry


def scratch_encoders(rt: Runtime, model: dict[str, Any]) -> dict[str, Any]:
    """The model's own (scratch) encoders by modality, loaded once per worker process."""
    section = (model.get("config") or {}).get("scratch") or {}
    return {m: rt.scratch_encoder(m, entry["weights_blob"], entry["config"],
                                  model["encoders"][m]["version"])
            for m, entry in section.items()}

