"""Encoder modes of a train job (frozen, finetune, scratch, auto), and a model's own
encoders at inference.

``frozen`` (the default) trains the fusion on cached features. ``scratch`` decodes the train
job's media again from their blobs, preprocesses them for the modality's scratch encoder
(models.scratch) and trains it end to end with the fusion. ``finetune`` decodes them too, runs
the frozen bottom of the worker's pretrained encoder once and keeps the activations, then
trains the pretrained top (models.finetune) with the fusion. ``auto`` tries each per modality
within the time budget (models.adapt.choose_modes) and keeps the best on validation.
A trained encoder's weights (a scratch encoder's, or a finetuned top's) are stored as a
safetensors blob next to the fusion checkpoint, and its ``version`` (the feature-cache key)
names those weights, so its features never mix with another model's or a frozen encoder's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker.runtime import Runtime

log = logging.getLogger(__name__)

MODES = ("frozen", "finetune", "scratch", "auto")
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


def decode_inputs(rt: Runtime, rows: list[Any], modalities: list[str],
                  finetune: list[str] | None = None,
                  on_progress: Callable[[int], None] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Training inputs of every row: for ``modalities`` the scratch encoders' (models.scratch),
    for ``finetune`` the activations below the pretrained encoders' tops (models.finetune),
    each decoded once. Per modality an (N, ...) tensor (zeros where the item lacks it or it no
    longer decodes), and ``info``: the scratch configs, and ``present`` / ``tuned_present``
    (per modality, whether each row has it). The media were decoded once already
    (extraction), so a failure here is rare; such an item counts as missing that modality.
    ``on_progress(rows done)`` is called every 64 rows (the training heartbeat: decoding a
    large archive again takes a while). Returns ({"scratch": inputs, "finetune": inputs}, info).
    """
    import torch

    from models.finetune import bottom_inputs, training_audio
    from models.scratch import ScratchConfig, preprocess
    from worker.media import MediaError
    from worker.pipeline import _decoder

    finetune = finetune or []
    configs = {m: ScratchConfig(m, **SCRATCH_DEFAULTS[m]) for m in modalities}
    scratch_in: dict[str, Any] = {}
    tuned_in: dict[str, Any] = {}
    present: dict[str, list[bool]] = {}
    tuned_present: dict[str, list[bool]] = {}
    for m in dict.fromkeys([*modalities, *finetune]):
        decode = _decoder(rt, m)
        encoder = rt.encoder(m) if m in finetune else None
        scratch_x: list[Any] = []
        tuned_x: list[Any] = []  # preprocessed for the pretrained encoder, None where missing
        pending: list[int] = []  # image rows preprocessed but not yet through the bottom
        for i, r in enumerate(rows):
            if on_progress is not None and i % 64 == 63:
                on_progress(i + 1)
            ref = r.media.get(m)
            x = t = None
            if ref is not None:
                try:
                    raw = decode(rt.blobs.read(ref["blob"]), ref["name"])
                    if m in configs:
                        x = preprocess(configs[m], raw)
                    if encoder is not None:
                        t = (training_audio(encoder, raw) if m == "audio"
                             else encoder.preprocess(raw))
                except (MediaError, ValueError, TypeError, OSError) as exc:  # the item loses m
                    log.warning("adaptation_decode_failed blob=%s error=%s", ref["blob"], exc)
                    x = t = None
            scratch_x.append(x)
            tuned_x.append(t)
            if m == "image" and t is not None:
                # A preprocessed image is 600 KB, its activation 37 KB: through the bottom in
                # chunks, so that an archive's worth of 224 x 224 inputs never sits in memory.
                pending.append(i)
                if len(pending) == rt.batch_sizes[m]:
                    _bottom_in_place(m, encoder, tuned_x, pending)
        if m in configs and any(x is not None for x in scratch_x):
            blank = torch.zeros_like(next(x for x in scratch_x if x is not None))
            scratch_in[m] = torch.stack([x if x is not None else blank for x in scratch_x])
            present[m] = [x is not None for x in scratch_x]
        if encoder is not None and any(t is not None for t in tuned_x):
            have = [i for i, t in enumerate(tuned_x) if t is not None]
            if m == "image":
                _bottom_in_place(m, encoder, tuned_x, pending)
                acts = torch.stack([tuned_x[i] for i in have])  # (n, 192, 7, 7)
            else:
                acts = bottom_inputs(m, encoder, [tuned_x[i] for i in have],
                                     batch_size=rt.batch_sizes[m], on_batch=on_progress)
            full = torch.zeros(len(rows), *acts.shape[1:])
            full[torch.tensor(have)] = acts
            tuned_in[m] = full
            tuned_present[m] = [t is not None for t in tuned_x]
    return {"scratch": scratch_in, "finetune": tuned_in}, {
        "configs": configs, "present": present, "tuned_present": tuned_present}


def _bottom_in_place(modality: str, encoder: Any, items: list[Any], rows: list[int]) -> None:
    """Replace ``items[i]`` for ``i`` in ``rows`` by its bottom activation; empties ``rows``."""
    from models.finetune import bottom_inputs

    if rows:
        acts = bottom_inputs(modality, encoder, [items[i] for i in rows], batch_size=len(rows))
        for i, a in zip(rows, acts, strict=True):
            items[i] = a.clone()  # its own storage: the batch's is freed
        rows.clear()


def train_adapted(rt: Runtime, job_id: str, rows: list[Any], modes: dict[str, str],
                  input_dims: dict[str, int], train_idx: list[int], val_idx: list[int],
                  train_set: Any, val_set: Any, num_classes: int, fusion_kw: dict[str, Any],
                  tcfg: Any, budget_seconds: float) -> dict[str, Any]:
    """Train with finetune/scratch/auto modes. Returns the fusion model, fit metrics, FeatureSets
    of train and val as the final model sees them, the trained encoders (scratch encoders and
    finetuned tops) with the scratch configs, and the adaptation report for the model's
    metrics. The job's ``updated_at`` moves at least every HEARTBEAT_SECONDS meanwhile, so the
    sweeper does not take a long training for a lost one."""
    import torch

    from models.adapt import AdaptedClassifier, InputSet, choose_modes, encode_all, fit_adapted
    from models.finetune import pretrained_top
    from models.fusion import FusionConfig
    from models.training import fit

    started = time.perf_counter()
    heartbeat = _heartbeat(rt, job_id)
    raw, info = decode_inputs(rt, rows, [m for m in input_dims if modes[m] in ("scratch", "auto")],
                              [m for m in input_dims if modes[m] in ("finetune", "auto")],
                              on_progress=heartbeat)
    configs = {m: c for m, c in info["configs"].items() if m in raw["scratch"]}
    columns = {m: i for i, m in enumerate(input_dims)}

    def inputs_of(idx: list[int], features: Any, chosen: dict[str, str]) -> InputSet:
        """The items of ``idx``: per modality the inputs of its chosen mode."""
        sel = torch.tensor(idx, dtype=torch.long)
        mask = features.mask.clone()
        inputs = dict(features.features)
        for m, mode in chosen.items():
            if mode in ("scratch", "finetune"):
                inputs[m] = raw[mode][m][sel]
                ok = info["present" if mode == "scratch" else "tuned_present"][m]
                mask[:, columns[m]] &= torch.tensor([ok[i] for i in idx])
        return InputSet(inputs, mask, features.labels)

    def available(m: str, mode: str) -> bool:
        return m in raw["scratch" if mode == "scratch" else "finetune"]

    chosen = {m: modes[m] for m in input_dims}
    for m, mode in chosen.items():  # nothing decoded for a mode: frozen features it is
        if mode in ("scratch", "finetune") and not available(m, mode):
            chosen[m] = "frozen"
        if mode == "auto" and not (available(m, "scratch") or available(m, "finetune")):
            chosen[m] = "frozen"
    report: dict[str, Any] = {m: {"mode": chosen[m], "requested": modes[m]} for m in input_dims}
    init: dict[str, Any] = {}
    auto = [m for m in input_dims if chosen[m] == "auto"]
    if auto:
        if val_set is None:
            raise ValueError("auto needs a validation split to choose on")
        as_scratch = {m: "scratch" if available(m, "scratch") else "frozen" for m in input_dims}
        as_tuned = {m: "finetune" if available(m, "finetune") else "frozen" for m in input_dims}
        picked, trials, init = choose_modes(
            inputs_of(train_idx, train_set, as_scratch), inputs_of(val_idx, val_set, as_scratch),
            input_dims, {m: configs[m] for m in auto if m in configs}, num_classes, tcfg,
            budget_seconds / 2, train_set, val_set, on_epoch=heartbeat,
            tops={m: pretrained_top(m) for m in auto if available(m, "finetune")},
            tuned_train=inputs_of(train_idx, train_set, as_tuned),
            tuned_val=inputs_of(val_idx, val_set, as_tuned))
        for m in auto:
            chosen[m] = picked[m]
            report[m].update(trials[m], requested="auto")
    for m in input_dims:
        report[m]["mode"] = chosen[m]
    scratch = {m: configs[m] for m in input_dims if chosen[m] == "scratch"}
    tuned = {m: init[m] if m in init else pretrained_top(m) for m in input_dims
             if chosen[m] == "finetune"}
    left = max(budget_seconds - (time.perf_counter() - started), budget_seconds / 4)
    if not scratch and not tuned:
        cfg = FusionConfig(input_dims=input_dims, num_classes=num_classes, **fusion_kw)
        model, metrics = fit(train_set, val_set, cfg, tcfg)
        return {"fusion": model, "metrics": metrics, "train": train_set, "val": val_set,
                "encoders": {}, "configs": {}, "report": report}
    dims = {m: scratch[m].dim if m in scratch else d for m, d in input_dims.items()}
    cfg = FusionConfig(input_dims=dims, num_classes=num_classes, **fusion_kw)
    train_in = inputs_of(train_idx, train_set, chosen)
    val_in = inputs_of(val_idx, val_set, chosen) if val_set is not None else None
    adapted, fit_metrics = fit_adapted(train_in, val_in, cfg, tcfg, scratch,
                                       budget_seconds=left, init=init, finetune=tuned,
                                       on_epoch=heartbeat)
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


def save_encoders(rt: Runtime, encoders: dict[str, Any], configs: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Store each trained encoder's weights: scratch encoders (those with a config in
    ``configs``) and finetuned tops (the others). Returns the checkpoint config sections
    ({"scratch": ..., "finetune": ...}, empty ones left out) and the registry's encoders."""
    from models.finetune import finetune_version, save_top
    from models.registry import SPECS
    from models.scratch import encoder_version, save_encoder

    sections: dict[str, dict[str, Any]] = {"scratch": {}, "finetune": {}}
    registry: dict[str, Any] = {}
    for m, module in encoders.items():
        if m in configs:
            blob = rt.blobs.put_bytes(save_encoder(module))
            cfg = configs[m]
            sections["scratch"][m] = {"config": cfg.to_dict(), "weights_blob": blob}
            registry[m] = {"name": cfg.arch, "version": encoder_version(cfg, blob),
                           "dim": cfg.dim, "mode": "scratch"}
        else:
            blob = rt.blobs.put_bytes(save_top(module))
            base = SPECS[m]
            sections["finetune"][m] = {"weights_blob": blob, "base_version": base.version}
            registry[m] = {"name": base.name, "version": finetune_version(base.version, blob),
                           "dim": base.dim, "mode": "finetune", "base_version": base.version}
    return {k: v for k, v in sections.items() if v}, registry


def own_encoders(rt: Runtime, model: dict[str, Any]) -> dict[str, Any]:
    """The model's own encoders by modality (scratch encoders, finetuned pretrained ones),
    loaded once per worker process."""
    config = model.get("config") or {}
    own = {m: rt.scratch_encoder(m, entry["weights_blob"], entry["config"],
                                 model["encoders"][m]["version"])
           for m, entry in (config.get("scratch") or {}).items()}
    for m, entry in (config.get("finetune") or {}).items():
        own[m] = rt.finetuned_encoder(m, entry["weights_blob"], model["encoders"][m]["version"])
    return own
