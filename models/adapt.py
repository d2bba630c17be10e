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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from mmbatch.contract import MODALITIES
from mmbatch.scoring import scores
from models.finetune import LR_FACTOR, pretrained_top
from models.fusion import FusionClassifier, FusionConfig
from models.losses import ClassificationLoss, balanced_order
from models.scratch import ScratchConfig, build_scratch
from models.stacking import fit_head_log_probs, fit_stack, group_folds
from models.training import (
    BestEpoch,
    FeatureSet,
    OnEpoch,
    Progress,
    TrainConfig,
    _fit_standardization,
    _one_modality,
    _val_scores,
    drop_modalities,
    fit,
)

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
    _, _, f1 = scores(data.labels.numpy(), logits.argmax(dim=1).numpy(),
                      model.fusion.cfg.num_classes)
    return f1, loss


def fit_adapted(train: InputSet, val: InputSet | None, cfg: FusionConfig, tcfg: TrainConfig,
                scratch: dict[str, ScratchConfig], *, budget_seconds: float = 600.0,
                init: dict[str, nn.Module] | None = None, encoder_lr: float | None = None,
                finetune: dict[str, nn.Module] | None = None,
                on_epoch: OnEpoch | None = None,
                ) -> tuple[AdaptedClassifier, dict[str, Any]]:
    """Train the scratch encoders of ``scratch`` (modality -> config) and the pretrained tops
    of ``finetune`` (modality -> models.finetune top, fed the cached activations below it) with
    the fusion, Adam, the loss and modality dropout of ``tcfg``; early stopping on the
    validation macro F1 with every modality (ties: lower loss), and at ``budget_seconds``
    whatever the epoch count.

    ``init`` gives scratch encoders to start from (a trial's, in ``auto``); ``encoder_lr`` is
    theirs (default: the fusion's); finetuned tops learn at models.finetune.LR_FACTOR times the
    fusion's rate, and neither ``init`` nor ``finetune`` modules are modified (copies train).
    ``on_epoch(progress)`` is called after every epoch (the worker's heartbeat: a long run must not
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
                on_epoch(best.progress(epoch, tcfg.epochs, val is not None))
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
                 on_epoch: OnEpoch | None = None,
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
    single = TrainConfig(**{**asdict(tcfg), "modality_dropout": 0.0, "select": "full",
                            "stacking_folds": 0})
    for m in [m for m in features if m in scratch or m in tops]:
        col = columns[m]
        ftrain, fval = _one_modality(frozen_train, m, col), _one_modality(frozen_val, m, col)
        if len(ftrain) == 0 or len(fval) == 0:
            report[m] = {"mode": "frozen", "why": "no validation items with this modality"}
            continue
        _, frozen_metrics = fit(ftrain, fval, FusionConfig({m: features[m]}, num_classes), single,
                                on_epoch)
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


# --- a train job's training, whatever its encoder modes ------------------------------------------

# The scratch encoders a train job trains: low-resolution grayscale images, the first 128 UTF-8
# bytes of a text, the first 3 s of audio.
SCRATCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {"dim": 64, "width": 32, "image_size": 32, "image_channels": 1},
    "text": {"dim": 64, "width": 32, "max_bytes": 128},
    "audio": {"dim": 64, "width": 32, "max_frames": 300},
}


def scratch_config(modality: str) -> ScratchConfig:
    """The scratch encoder a train job trains for ``modality``."""
    return ScratchConfig(modality, **SCRATCH_DEFAULTS[modality])


def raw_inputs_needed(modes: dict[str, str]) -> tuple[list[str], list[str]]:
    """Which modalities need their media decoded again: for scratch encoders' inputs, and for
    the activations below the finetuned tops (``auto`` tries both)."""
    return ([m for m, mode in modes.items() if mode in ("scratch", "auto")],
            [m for m, mode in modes.items() if mode in ("finetune", "auto")])


@dataclass
class TrainingData:
    """A train job's items as training takes them: the frozen features of the training and
    validation items, and, for the modalities whose mode needs them, inputs of every item
    (rows in the job's item order; ``train_idx``/``val_idx`` pick the splits' rows): the raw
    inputs of the scratch encoders and the activations below the finetuned tops, with which
    rows have them."""

    train: FeatureSet
    val: FeatureSet | None
    train_idx: list[int]
    val_idx: list[int]
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)  # m -> (N, ...)
    scratch_present: dict[str, list[bool]] = field(default_factory=dict)
    finetune: dict[str, torch.Tensor] = field(default_factory=dict)  # m -> (N, ...)
    finetune_present: dict[str, list[bool]] = field(default_factory=dict)
    # per row, what keeps items together when folds are cut (None: the item alone)
    groups: list[str | None] | None = None


@dataclass(frozen=True)
class TrainingPlan:
    """How to train: the fusion over the frozen features (``fusion.input_dims``), the training
    loop, each modality's requested encoder mode, and auto's time budget."""

    fusion: FusionConfig
    training: TrainConfig
    modes: dict[str, str]
    budget_seconds: float


@dataclass
class TrainedClassifier:
    """What training made: the fusion classifier, its metrics, the training and validation
    features as it sees them (its own encoders' where it has them), its trained encoders
    (scratch encoders with their configs, finetuned tops), and, when an encoder mode other than
    frozen was asked for, the report of what each modality got and why."""

    fusion: FusionClassifier
    metrics: dict[str, Any]
    train: FeatureSet
    val: FeatureSet | None
    scratch: dict[str, tuple[nn.Module, ScratchConfig]]
    finetuned: dict[str, nn.Module]
    adaptation: dict[str, Any] | None
    # ``stack``: the training items' out-of-fold class probabilities (N_train, C)
    oof: np.ndarray | None = None

    @property
    def modes(self) -> dict[str, str]:
        """Each modality's encoder mode (its encoder's column; feature families have none)."""
        return {m: "scratch" if m in self.scratch else "finetune" if m in self.finetuned
                else "frozen" for m in self.fusion.modalities if m in MODALITIES}


# What an adapted encoder's column of a stack trains on: its inputs over the training and
# validation splits, and its scratch config or finetuned top (the other one None).
OwnColumn = tuple[InputSet, "InputSet | None", "ScratchConfig | None", "nn.Module | None"]


def train_classifier(data: TrainingData, plan: TrainingPlan,
                     on_epoch: OnEpoch | None = None) -> TrainedClassifier:
    """Train a train job's classifier with the encoder modes of ``plan``.

    All frozen: the fusion on cached features (models.training.fit). Otherwise scratch
    encoders and finetuned tops train with the fusion (:func:`fit_adapted`), and ``auto`` first
    chooses per modality among frozen, scratch and finetune on validation within half the budget
    (:func:`choose_modes`). A mode whose inputs no item has falls back to frozen. ``on_epoch``
    hears of every epoch (the worker's heartbeat)."""
    cfg, tcfg, modes = plan.fusion, plan.training, plan.modes
    if cfg.strategy == "stack" and all(mode == "frozen" for mode in modes.values()):
        return _train_stack(data, plan, {}, None, on_epoch)
    if all(mode == "frozen" for mode in modes.values()):
        model, metrics = fit(data.train, data.val, cfg, tcfg, on_epoch)
        return TrainedClassifier(model, metrics, data.train, data.val, {}, {}, None)
    started = time.perf_counter()
    dims = {m: d for m, d in cfg.input_dims.items() if m in modes}  # the encoders' columns
    columns = {m: i for i, m in enumerate(cfg.input_dims)}

    def inputs_of(idx: list[int], features: FeatureSet, chosen: dict[str, str]) -> InputSet:
        """The items of ``idx``: per modality the inputs of its chosen mode."""
        sel = torch.tensor(idx, dtype=torch.long)
        mask = features.mask.clone()
        inputs = dict(features.features)
        for m, mode in chosen.items():
            if mode in ("scratch", "finetune"):
                raw = data.scratch if mode == "scratch" else data.finetune
                ok = data.scratch_present if mode == "scratch" else data.finetune_present
                inputs[m] = raw[m][sel]
                mask[:, columns[m]] &= torch.tensor([ok[m][i] for i in idx])
        return InputSet(inputs, mask, features.labels)

    def available(m: str, mode: str) -> bool:
        return m in (data.scratch if mode == "scratch" else data.finetune)

    chosen = dict(modes)
    for m, mode in chosen.items():  # nothing decoded for a mode: frozen features it is
        if mode in ("scratch", "finetune") and not available(m, mode):
            chosen[m] = "frozen"
        if mode == "auto" and not (available(m, "scratch") or available(m, "finetune")):
            chosen[m] = "frozen"
    report: dict[str, Any] = {m: {"mode": chosen[m], "requested": modes[m]} for m in dims}
    init: dict[str, nn.Module] = {}
    auto = [m for m in dims if chosen[m] == "auto"]
    if auto:
        if data.val is None:
            raise ValueError("auto needs a validation split to choose on")
        as_scratch = {m: "scratch" if available(m, "scratch") else "frozen" for m in dims}
        as_tuned = {m: "finetune" if available(m, "finetune") else "frozen" for m in dims}
        picked, trials, init = choose_modes(
            inputs_of(data.train_idx, data.train, as_scratch),
            inputs_of(data.val_idx, data.val, as_scratch), cfg.input_dims,
            {m: scratch_config(m) for m in auto if available(m, "scratch")}, cfg.num_classes,
            tcfg, plan.budget_seconds / 2, data.train, data.val, on_epoch=on_epoch,
            tops={m: pretrained_top(m) for m in auto if available(m, "finetune")},
            tuned_train=inputs_of(data.train_idx, data.train, as_tuned),
            tuned_val=inputs_of(data.val_idx, data.val, as_tuned))
        for m in auto:
            chosen[m] = picked[m]
            report[m].update(trials[m], requested="auto")
    for m in dims:
        report[m]["mode"] = chosen[m]
    scratch = {m: scratch_config(m) for m in dims if chosen[m] == "scratch"}
    tuned = {m: init[m] if m in init else pretrained_top(m) for m in dims
             if chosen[m] == "finetune"}
    if cfg.strategy == "stack":
        left = max(plan.budget_seconds - (time.perf_counter() - started), plan.budget_seconds / 4)
        own_columns: dict[str, OwnColumn] = {
            m: (inputs_of(data.train_idx, data.train, {m: chosen[m]}),
                inputs_of(data.val_idx, data.val, {m: chosen[m]}) if data.val is not None
                else None, scratch.get(m), tuned.get(m))
            for m in [*scratch, *tuned]}
        return _train_stack(data, replace(plan, budget_seconds=left), own_columns, report,
                            on_epoch)
    if not scratch and not tuned:
        model, metrics = fit(data.train, data.val, cfg, tcfg, on_epoch)
        return TrainedClassifier(model, metrics, data.train, data.val, {}, {}, report)
    left = max(plan.budget_seconds - (time.perf_counter() - started), plan.budget_seconds / 4)
    adapted_cfg = FusionConfig(**{**asdict(cfg), "input_dims": {
        m: scratch[m].dim if m in scratch else d for m, d in dims.items()}})
    train_in = inputs_of(data.train_idx, data.train, chosen)
    val_in = inputs_of(data.val_idx, data.val, chosen) if data.val is not None else None
    adapted, fit_metrics = fit_adapted(train_in, val_in, adapted_cfg, tcfg, scratch,
                                       budget_seconds=left, init=init, finetune=tuned,
                                       on_epoch=on_epoch)
    train_feats = encode_all(adapted, train_in)
    val_feats = encode_all(adapted, val_in) if val_in is not None else None
    metrics = _final_metrics(adapted.fusion, train_feats, val_feats, fit_metrics, adapted_cfg,
                             tcfg)
    own = dict(adapted.encoders)
    return TrainedClassifier(adapted.fusion, metrics, train_feats, val_feats,
                             {m: (own[m], scratch[m]) for m in scratch},
                             {m: own[m] for m in tuned}, report)


def _train_stack(data: TrainingData, plan: TrainingPlan, own: dict[str, OwnColumn],
                 report: dict[str, Any] | None, on_epoch: OnEpoch | None
                 ) -> TrainedClassifier:
    """``strategy=stack`` (models.stacking) over the encoders' features and the feature
    families. A modality whose encoder is trained (``own``: scratch or finetune) gets its
    column's out-of-fold predictions honestly: per fold, its encoder trained on the other folds
    alone (early stopping on the validation split, never on the held-out fold), a linear head
    on those features, predictions for the held-out fold; then the encoder trained on the whole
    training split gives the column's features. That costs folds + 1 trainings per such
    modality, within the budget (an equal share each)."""
    groups = ([data.groups[i] for i in data.train_idx] if data.groups is not None else None)
    cfg, tcfg = plan.fusion, plan.training

    def step(column: str) -> None:
        if on_epoch is not None:
            on_epoch(Progress(0, 0, None))

    train, val = data.train, data.val
    given: dict[str, np.ndarray] = {}
    scratch_out: dict[str, tuple[nn.Module, ScratchConfig]] = {}
    tuned_out: dict[str, nn.Module] = {}
    dims = dict(cfg.input_dims)
    if own:
        folds = group_folds(train.labels.numpy(), groups, tcfg.seed)
        share = plan.budget_seconds / (len(own) * (len(folds) + 1))
        single = TrainConfig(**{**asdict(tcfg), "modality_dropout": 0.0, "select": "full",
                                "stacking_folds": 0})
        columns = list(cfg.modalities)
        for m, (train_in, val_in, scfg, top) in own.items():
            col = columns.index(m)
            dim = scfg.dim if scfg is not None else cfg.input_dims[m]

            def trained_encoder(rows: np.ndarray, m: str = m, train_in: InputSet = train_in,
                                val_in: InputSet | None = val_in, col: int = col,
                                scfg: ScratchConfig | None = scfg, top: nn.Module | None = top,
                                dim: int = dim) -> nn.Module:
                sub = _only(train_in.subset(rows), col, m)
                held_val = _only(val_in, col, m) if val_in is not None else None
                model, _ = fit_adapted(sub, held_val, FusionConfig({m: dim}, cfg.num_classes),
                                       single, {m: scfg} if scfg is not None else {},
                                       finetune={m: top} if top is not None else None,
                                       budget_seconds=share, on_epoch=on_epoch)
                return model.encoders[m]

            oof = np.full((len(train), cfg.num_classes), np.log(1.0 / cfg.num_classes))
            present = train_in.mask[:, col].numpy()  # where its media decoded again
            for fold_train, held in folds:
                fit_rows = fold_train[present[fold_train]]
                held_rows = held[present[held]]
                if len(held_rows) == 0 or len(np.unique(train.labels.numpy()[fit_rows])) < 2:
                    continue
                encoder = trained_encoder(fit_rows)
                feats = _encode(encoder, train_in.inputs[m], dim).numpy()
                oof[held_rows] = fit_head_log_probs(feats[fit_rows],
                                                    train.labels.numpy()[fit_rows],
                                                    feats[held_rows], cfg.num_classes, tcfg)
            given[m] = oof
            encoder = trained_encoder(np.arange(len(train)))
            train = _with_column(train, m, _encode(encoder, train_in.inputs[m], dim), col,
                                 train_in.mask[:, col])
            if val is not None and val_in is not None:
                val = _with_column(val, m, _encode(encoder, val_in.inputs[m], dim), col,
                                   val_in.mask[:, col])
            dims[m] = dim
            if scfg is not None:
                scratch_out[m] = (encoder, scfg)
            else:
                tuned_out[m] = encoder
    stack_cfg = replace(cfg, input_dims=dims)
    result = fit_stack(train, val, stack_cfg, tcfg, groups, budget_seconds=plan.budget_seconds,
                       on_step=step, given=given)
    kept = list(result.model.modalities)
    columns = list(stack_cfg.modalities)

    def narrowed(fs: FeatureSet | None) -> FeatureSet | None:
        if fs is None:
            return None
        return FeatureSet({c: fs.features[c] for c in kept},
                          fs.mask[:, [columns.index(c) for c in kept]], fs.labels)

    kept_train = narrowed(train)
    assert kept_train is not None
    return TrainedClassifier(result.model, result.metrics, kept_train, narrowed(val),
                             {m: v for m, v in scratch_out.items() if m in kept},
                             {m: v for m, v in tuned_out.items() if m in kept}, report,
                             result.oof)


def _with_column(data: FeatureSet, column: str, x: torch.Tensor, index: int,
                 present: torch.Tensor) -> FeatureSet:
    """``data`` with ``column`` (mask column ``index``) replaced by features ``x`` (N, D')
    present where ``present`` (N,) says, zeros elsewhere."""
    mask = data.mask.clone()
    mask[:, index] = present
    x = torch.where(present[:, None], x, 0.0)
    return FeatureSet({**data.features, column: x}, mask, data.labels)


def _final_metrics(model: FusionClassifier, train: FeatureSet, val: FeatureSet | None,
                   fit_metrics: dict[str, Any], cfg: FusionConfig, tcfg: TrainConfig
                   ) -> dict[str, Any]:
    """The same top-level metrics models.training.fit reports, for an adapted model."""
    _, _, train_accuracy = _val_scores(model, train)
    f1, loss, acc = _val_scores(model, val) if val is not None else (None, None, None)
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
