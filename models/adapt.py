"""Training with scratch encoders (models.scratch) or finetuned pretrained tops
(models.finetune) end to end with the fusion, and ``auto``: per modality, frozen features, a
scratch encoder or a finetuned top, whichever validates best within a time budget.

Modalities in ``frozen`` mode feed cached features, as in models.training; those in
``scratch`` mode feed raw inputs (pixels, byte tokens, log-mels) through their encoder, trained
with the fusion from random weights; those in ``finetune`` mode feed the cached activations
below the pretrained encoder's last blocks through those blocks, trained from the pretrained
weights at a smaller learning rate. After training, the encoders turn every item into
features, so evaluation, calibration and explanations run on a plain FeatureSet and the fusion
checkpoint is the usual one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models.finetune import LR_FACTOR
from models.fusion import FusionClassifier, FusionConfig
from models.losses import ClassificationLoss, balanced_order
from models.scratch import ScratchConfig, build_scratch
from models.training import (
    BestEpoch,
    FeatureSet,
    TrainConfig,
    _fit_standardization,
    _one_modality,
    _scores,
    drop_modalities,
    fit,
)

MODES = ("frozen", "finetune", "scratch", "auto")
AUTO_MARGIN = 0.01  # auto keeps frozen unless a candidate validates better by more than this


@dataclass
class InputSet:
    """N items: per modality either cached features (N, D) or raw encoder inputs (N, ...);
    ``mask`` columns follow the fusion config's modality order."""

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor  # (N, M) bool
    labels: torch.Tensor  # (N,) int64

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.mask.ndim != 2 or self.mask.dtype != torch.bool or self.mask.shape[0] != n:
            raise ValueError(f"mask must be ({n}, M) bool, got {tuple(self.mask.shape)}")
        for m, x in self.inputs.items():
            if x.shape[0] != n:
                raise ValueError(f"inputs[{m!r}] has {x.shape[0]} rows, labels {n}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> InputSet:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return InputSet({m: x[idx] for m, x in self.inputs.items()}, self.mask[idx],
                        self.labels[idx])


class AdaptedClassifier(nn.Module):
    """Scratch encoders for some modalities, then the fusion classifier over all of them."""

    def __init__(self, fusion: FusionClassifier, encoders: dict[str, nn.Module]) -> None:
        super().__init__()
        unknown = set(encoders) - set(fusion.modalities)
        if unknown:
            raise ValueError(f"encoders for modalities the fusion does not take: {unknown}")
        self.fusion = fusion
        self.encoders = nn.ModuleDict(encoders)

    def features(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """inputs[m]: raw (B, ...) for scratch modalities, (B, D_m) for the others."""
        return {m: self.encoders[m](x) if m in self.encoders else x for m, x in inputs.items()}

    def forward(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fusion(self.features(inputs), mask)  # (B, C), (B, F)


def encode_all(model: AdaptedClassifier, data: InputSet, batch_size: int = 256) -> FeatureSet:
    """Every item's features (the model's encoders in eval mode): a FeatureSet for evaluation."""
    model.eval()
    out = {m: _encode(model.encoders[m], x, model.fusion.cfg.input_dims[m], batch_size)
           if m in model.encoders else x.float() for m, x in data.inputs.items()}
    return FeatureSet(out, data.mask, data.labels)


def _encode(encoder: nn.Module, x: torch.Tensor, dim: int, batch_size: int = 256
            ) -> torch.Tensor:
    """``encoder``'s features (N, dim) of inputs ``x`` (N, ...), in eval mode, in batches,
    without gradients."""
    encoder.eval()
    with torch.no_grad():
        parts = [encoder(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, dim)


def _shift_images(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translation by up to ``pixels`` (zero fill): (B, C, H, W) -> (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pixels + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None])  # (B, W)
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _macro_f1(model: AdaptedClassifier, data: InputSet) -> tuple[float, float]:
    """(macro F1, loss) with every modality, eval mode."""
    feats = encode_all(model, data)
    model.fusion.eval()
    with torch.no_grad():
        logits, _ = model.fusion(feats.features, feats.mask)
        loss = torch.nn.functional.cross_entropy(logits, data.labels).item()
    _, _, f1 = _scores(data.labels.numpy(), logits.argmax(dim=1).numpy(),
                       model.fusion.cfg.num_classes)
    return f1, loss


def fit_adapted(train: InputSet, val: InputSet | None, cfg: FusionConfig, tcfg: TrainConfig,
                scratch: dict[str, ScratchConfig], *, budget_seconds: float = 600.0,
                init: dict[str, nn.Module] | None = None, encoder_lr: float | None = None,
                finetune: dict[str, nn.Module] | None = None,
                on_epoch: Callable[[int], None] | None = None,
                ) -> tuple[AdaptedClassifier, dict[str, Any]]:
    """Train the scratch encoders of ``scratch`` (modality -> config) and the pretrained tops
    of ``finetune`` (modality -> models.finetune top, fed the cached activations below it) with
    the fusion, Adam, the loss and modality dropout of ``tcfg``; early stopping on the
    validation macro F1 with every modality (ties: lower loss), and at ``budget_seconds``
    whatever the epoch count.

    ``init`` gives scratch encoders to start from (a trial's, in ``auto``); ``encoder_lr`` is
    theirs (default: the fusion's); finetuned tops learn at models.finetune.LR_FACTOR times the
    fusion's rate, and neither ``init`` nor ``finetune`` modules are modified (copies train).
    ``on_epoch(epoch)`` is called after every epoch (the worker's heartbeat: a long run must not
    look stale). Seeded like models.training.fit. Returns the model in eval mode and metrics
    with ``seconds_per_epoch`` and ``stopped`` ("patience", "epochs" or "budget").
    """
    started = time.perf_counter()
    finetune = finetune or {}
    if not scratch and not finetune:
        raise ValueError("no scratch or finetune modality: use models.training.fit")
    if set(scratch) & set(finetune):
        raise ValueError(f"a modality cannot be both scratch and finetune: "
                         f"{sorted(set(scratch) & set(finetune))}")
    for m, scfg in scratch.items():
        if scfg.dim != cfg.input_dims.get(m):
            raise ValueError(f"the fusion takes {cfg.input_dims.get(m)} {m} features, "
                             f"the scratch encoder gives {scfg.dim}")
    if len(train) == 0:
        raise ValueError("no training items")
    if val is not None and len(val) == 0:
        val = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)
        generator = torch.Generator().manual_seed(tcfg.seed)
        encoders = {m: copy.deepcopy(init[m]) if init and m in init else build_scratch(s)
                    for m, s in scratch.items()}
        tuned = {m: copy.deepcopy(top).requires_grad_(True) for m, top in finetune.items()}
        fusion = FusionClassifier(cfg)
        if len(scratch) < len(cfg.input_dims):
            # Frozen features as they are, finetuned tops' as they start (the pretrained
            # features); scratch modalities keep the identity.
            _fit_standardization(fusion, FeatureSet(
                {m: _encode(tuned[m], train.inputs[m], cfg.input_dims[m]) if m in tuned else
                 torch.zeros(len(train), cfg.input_dims[m]) if m in scratch else
                 train.inputs[m].float() for m in cfg.input_dims},
                train.mask, train.labels))
        if "audio" in tuned:
            tuned["audio"].augment = generator  # SpecAugment (models.finetune.AudioTop)
        model = AdaptedClassifier(fusion, {**encoders, **tuned})
        groups: list[dict[str, Any]] = [{"params": list(fusion.parameters())}]
        if encoders:
            groups.append({"params": [p for e in encoders.values() for p in e.parameters()],
                           "lr": encoder_lr or tcfg.lr})
        if tuned:
            groups.append({"params": [p for e in tuned.values() for p in e.parameters()],
                           "lr": tcfg.lr * LR_FACTOR})
        optimizer = torch.optim.Adam(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        criterion = ClassificationLoss(tcfg.loss, train.labels, cfg.num_classes, tcfg.gamma)
        best, epoch, stopped = BestEpoch(model, tcfg.patience), 0, "epochs"
        for epoch in range(1, tcfg.epochs + 1):
            model.train()
            order = (balanced_order(train.labels, generator) if tcfg.balanced
                     else torch.randperm(len(train), generator=generator))
            for start in range(0, len(train), tcfg.batch_size):
                idx = order[start : start + tcfg.batch_size]
                if len(idx) < 2 and any(isinstance(mod, nn.BatchNorm2d) and mod.training
                                        for mod in model.modules()):
                    continue  # BatchNorm cannot train on one item
                inputs = {m: x[idx] for m, x in train.inputs.items()}
                if "image" in scratch:
                    inputs["image"] = _shift_images(inputs["image"], generator)
                mask = drop_modalities(train.mask[idx], tcfg.modality_dropout, generator)
                logits, _ = model(inputs, mask)
                loss = criterion(logits, train.labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if val is None:
                best.epoch = epoch
            elif best.update(epoch, *_macro_f1(model, val)):
                stopped = "patience"
                break
            if on_epoch is not None:
                on_epoch(epoch)
            if time.perf_counter() - started >= budget_seconds:
                stopped = "budget"
                break
        if val is not None:
            best.restore()
        if "audio" in tuned:
            tuned["audio"].augment = None
    model.eval()
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "val_macro_f1": best.f1 if val is not None else None,
        "epochs": epoch,
        "best_epoch": best.epoch,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(epoch, 1),
        "stopped": stopped,
    }
    return model, metrics


def _only(data: InputSet, column: int, modality: str) -> InputSet:
    """The items that have ``modality``, with that modality alone."""
    idx = torch.nonzero(data.mask[:, column]).flatten()
    return InputSet({modality: data.inputs[modality][idx]}, torch.ones(len(idx), 1,
                    dtype=torch.bool), data.labels[idx])


def choose_modes(train: InputSet, val: InputSet, features: dict[str, int],
                 scratch: dict[str, ScratchConfig], num_classes: int, tcfg: TrainConfig,
                 budget_seconds: float, frozen_train: FeatureSet, frozen_val: FeatureSet,
                 on_epoch: Callable[[int], None] | None = None,
                 tops: dict[str, nn.Module] | None = None,
                 tuned_train: InputSet | None = None, tuned_val: InputSet | None = None,
                 ) -> tuple[dict[str, str], dict[str, Any], dict[str, nn.Module]]:
    """``auto``: for each modality of ``scratch`` or ``tops``, a single-modality model on
    frozen features and one per candidate: the scratch encoder (raw inputs of ``train``/
    ``val``) and the finetuned pretrained top (cached activations of ``tuned_train``/
    ``tuned_val``). The best candidate is kept where it validates better than frozen by
    AUTO_MARGIN (a tie between candidates goes to scratch: far cheaper to serve).

    ``frozen_train``/``frozen_val`` carry the cached features of every modality
    (``features``: modality -> dim, mask column order). Each trial gets an equal share of
    ``budget_seconds``. Returns the chosen modes, a report per modality (each candidate's
    scores and seconds per epoch, the reason) and the trained encoders of the chosen
    candidates (to start the final model from).
    """
    tops = tops or {}
    modes = {m: "frozen" for m in features}
    report: dict[str, Any] = {}
    trained: dict[str, nn.Module] = {}
    trials = len(scratch) + len(tops)
    share = budget_seconds / max(trials, 1)
    columns = {m: i for i, m in enumerate(features)}
    single = TrainConfig(**{**_fields(tcfg), "modality_dropout": 0.0, "select": "full",
                            "stacking_folds": 0})
    for m in [m for m in features if m in scratch or m in tops]:
        col = columns[m]
        ftrain, fval = _one_modality(frozen_train, m, col), _one_modality(frozen_val, m, col)
        if len(ftrain) == 0 or len(fval) == 0:
            report[m] = {"mode": "frozen", "why": "no validation items with this modality"}
            continue
        _, frozen_metrics = fit(ftrain, fval, FusionConfig({m: features[m]}, num_classes), single)
        f_frozen = float(frozen_metrics["val_macro_f1"])
        entry: dict[str, Any] = {"frozen": {"val_macro_f1": f_frozen,
                                            "epochs": frozen_metrics["epochs"],
                                            "seconds_per_epoch": frozen_metrics["seconds_per_epoch"]}}
        candidates: dict[str, tuple[float, nn.Module]] = {}
        if m in scratch:
            model, metrics = fit_adapted(
                _only(train, col, m), _only(val, col, m),
                FusionConfig({m: scratch[m].dim}, num_classes), single, {m: scratch[m]},
                budget_seconds=share, on_epoch=on_epoch)
            candidates["scratch"] = (float(metrics["val_macro_f1"]), model.encoders[m])
            entry["scratch"] = _trial(metrics)
        if m in tops:
            if tuned_train is None or tuned_val is None:
                raise ValueError("finetune candidates need tuned_train and tuned_val")
            model, metrics = fit_adapted(
                _only(tuned_train, col, m), _only(tuned_val, col, m),
                FusionConfig({m: features[m]}, num_classes), single, {},
                finetune={m: tops[m]}, budget_seconds=share, on_epoch=on_epoch)
            candidates["finetune"] = (float(metrics["val_macro_f1"]), model.encoders[m])
            entry["finetune"] = _trial(metrics)
        best = max(candidates, key=lambda c: candidates[c][0])  # dict order: scratch first
        f_best = candidates[best][0]
        if f_best > f_frozen + AUTO_MARGIN:
            modes[m] = best
            trained[m] = candidates[best][1]
            why = (f"{best} validated better alone: macro F1 {f_best:.3f} against "
                   f"{f_frozen:.3f} frozen")
        else:
            why = (f"frozen validated as well alone (macro F1 {f_frozen:.3f} against "
                   f"{f_best:.3f} {best}) and costs less")
        report[m] = {"mode": modes[m], "why": why, **entry}
    return modes, report, trained


def _trial(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"val_macro_f1": float(metrics["val_macro_f1"]), "epochs": metrics["epochs"],
            "seconds_per_epoch": metrics["seconds_per_epoch"], "stopped": metrics["stopped"]}


def _fields(tcfg: TrainConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(tcfg)


def scratch_features(model: AdaptedClassifier, data: InputSet) -> dict[str, np.ndarray]:
    """Each scratch modality's features (N_m, D) over the items that have it."""
    feats = encode_all(model, data)
    columns = {m: i for i, m in enumerate(model.fusion.modalities)}
    return {m: feats.features[m][data.mask[:, columns[m]]].numpy() for m in model.encoders}
