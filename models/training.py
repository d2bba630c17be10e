"""Training and evaluating a fusion classifier on cached (frozen) encoder features."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmbatch.contract import LOSSES
from mmbatch.scoring import scores
from models.fusion import FusionClassifier, FusionConfig, combine_late
from models.losses import ClassificationLoss, balanced_order


@dataclass
class FeatureSet:
    """Cached features of N items; a missing modality is zeros in ``features`` and False in
    ``mask``, whose columns follow the fusion config's modality order."""

    features: dict[str, torch.Tensor]  # modality -> (N, D_m) float32
    mask: torch.Tensor  # (N, M) bool
    labels: torch.Tensor  # (N,) int64 class indices

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a 2-D bool tensor, got {self.mask.dtype} {tuple(self.mask.shape)}"
            )
        if self.labels.ndim != 1 or self.labels.dtype != torch.int64:
            raise ValueError(
                "labels must be a 1-D int64 tensor, "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        n = self.labels.shape[0]
        if self.mask.shape[0] != n:
            raise ValueError(f"mask has {self.mask.shape[0]} rows, labels {n}")
        for name, x in self.features.items():
            if x.ndim != 2 or x.shape[0] != n:
                raise ValueError(f"features[{name!r}] must be ({n}, D), got {tuple(x.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> FeatureSet:
        """The items at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FeatureSet(
            features={m: x[idx] for m, x in self.features.items()},
            mask=self.mask[idx],
            labels=self.labels[idx],
        )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 30  # epochs without a better validation score before stopping
    seed: int = 0
    modality_dropout: float = 0.15  # chance of hiding each present modality of an item
    loss: str = "ce"  # "ce", "weighted" (inverse-frequency class weights) or "focal"
    gamma: float = 2.0  # focal loss focusing parameter
    balanced: bool = False  # draw each epoch's items so that every class is equally likely
    # Weight of the per-modality classifiers' own cross-entropy, for late fusion: each of them
    # must be a classifier on its own when the other modalities are missing.
    aux_weight: float = 0.5
    # What early stopping keeps: "full" = the best validation macro F1 with every modality;
    # "robust" = the best mean of that and of the macro F1 with each modality dropped in turn,
    # so that the kept epoch also copes when a modality is missing.
    select: str = "robust"
    # Late fusion only: 0 trains the per-modality classifiers and their weights jointly; k >= 2
    # stacks, fitting the weights on k-fold out-of-fold predictions (see fit).
    stacking_folds: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: expected one of {LOSSES}")
        if not 0.0 <= self.gamma <= 10.0:
            raise ValueError(f"gamma must be in [0, 10], got {self.gamma!r}")
        if not isinstance(self.balanced, bool):
            raise ValueError(f"balanced must be a bool, got {self.balanced!r}")
        if self.select not in ("full", "robust"):
            raise ValueError(f"select must be 'full' or 'robust', got {self.select!r}")
        if not self.aux_weight >= 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight!r}")
        folds = self.stacking_folds
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 0 or folds == 1:
            raise ValueError(f"stacking_folds must be 0 (joint) or an int >= 2, got {folds!r}")


def stack_features(input_dims: dict[str, int], feats: Sequence[dict[str, np.ndarray]]
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-modality (N, D) tensors from each item's features, zeros where missing, and the
    (N, M) presence mask (columns in ``input_dims`` order)."""
    n = len(feats)
    tensors = {m: torch.zeros(n, d) for m, d in input_dims.items()}
    mask = torch.zeros(n, len(input_dims), dtype=torch.bool)
    for i, f in enumerate(feats):
        for j, m in enumerate(input_dims):
            if m in f:
                tensors[m][i] = torch.from_numpy(np.array(f[m], dtype=np.float32))
                mask[i, j] = True
    return tensors, mask


@dataclass(frozen=True)
class Progress:
    """Where a training loop is, told after every epoch: the epoch, the last it may run (the
    epoch budget, or sooner when early stopping's patience would run out), and the best
    validation macro F1 so far (None without validation)."""

    epoch: int
    stops_by: int
    val_macro_f1: float | None


OnEpoch = Callable[[Progress], None]


class BestEpoch:
    """Early stopping on a validation score: keeps the weights of the best epoch (higher macro
    F1; on a tie, a loss lower by more than 1e-4) and says when ``patience`` epochs have passed
    without a better one."""

    def __init__(self, model: nn.Module, patience: int) -> None:
        self.model, self.patience = model, patience
        self.state = copy.deepcopy(model.state_dict())
        self.f1, self.loss, self.epoch, self.stale = -1.0, float("inf"), 0, 0

    def update(self, epoch: int, f1: float, loss: float) -> bool:
        """Score one epoch; True when training should stop (patience ran out)."""
        if f1 > self.f1 or (f1 == self.f1 and loss < self.loss - 1e-4):
            self.f1, self.loss, self.epoch, self.stale = f1, loss, epoch, 0
            self.state = copy.deepcopy(self.model.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self) -> None:
        """Put the best epoch's weights back into the model."""
        self.model.load_state_dict(self.state)

    def progress(self, epoch: int, epochs: int, validated: bool) -> Progress:
        """Where the loop is after ``epoch`` of at most ``epochs``."""
        if not validated:
            return Progress(epoch, epochs, None)
        return Progress(epoch, min(epochs, self.epoch + self.patience), self.f1)


def _check(data: FeatureSet, cfg: FusionConfig, what: str) -> None:
    if data.mask.shape[1] != len(cfg.input_dims):
        raise ValueError(
            f"{what}: mask has {data.mask.shape[1]} columns, "
            f"the config {len(cfg.input_dims)} modalities"
        )
    for m, dim in cfg.input_dims.items():
        if m not in data.features:
            raise ValueError(f"{what}: no features for modality {m!r}")
        if data.features[m].shape[1] != dim:
            raise ValueError(
                f"{what}: features[{m!r}] have dim {data.features[m].shape[1]}, config {dim}"
            )
    if len(data) and (int(data.labels.min()) < 0 or int(data.labels.max()) >= cfg.num_classes):
        raise ValueError(f"{what}: labels must be in [0, {cfg.num_classes})")


def _fit_standardization(model: FusionClassifier, train: FeatureSet) -> None:
    """Set each modality's mean/std from the training items that have it (term-count columns
    are TF-IDF'd instead, with the model's IDF)."""
    for i, m in enumerate(model.modalities):
        if m in model.cfg.count_columns:
            continue
        present = train.features[m][train.mask[:, i]].float()  # (n_m, D_m)
        if present.shape[0] < 2:
            continue  # too few to estimate: keep the identity
        mean = present.mean(dim=0)
        std = present.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant dims: leave unscaled
        model.set_standardization(m, mean, std)


def drop_modalities(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Hide each present modality with probability ``p``, never all of an item's modalities.

    mask: (B, M) bool -> (B, M) bool
    """
    if p <= 0:
        return mask
    kept = mask & ~(torch.rand(mask.shape, generator=generator) < p)  # (B, M)
    emptied = ~kept.any(dim=1) & mask.any(dim=1)  # (B,)
    # Where everything was hidden, bring back one present modality at random.
    scores = torch.rand(mask.shape, generator=generator).masked_fill(~mask, -1.0)  # (B, M)
    one = F.one_hot(scores.argmax(dim=1), mask.shape[1]).bool()  # (B, M)
    return torch.where(emptied[:, None], one, kept)


def predict(
    model: FusionClassifier,
    features: dict[str, torch.Tensor],
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (B, C) and fused embeddings (B, F), on the CPU.

    ``temperature`` > 1 softens the probabilities, < 1 sharpens them.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    logits, fused = forward_eval(model, features, mask)
    return torch.softmax(logits / temperature, dim=1), fused  # (B, C), (B, F)


def forward_eval(model: FusionClassifier, features: dict[str, torch.Tensor], mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and fused embeddings (B, F), float32 on the CPU, from the model in eval
    mode without gradients (its training mode is restored after)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits, fused = model(
                {m: features[m].to(device) for m in model.modalities if m in features},
                mask.to(device),
            )  # (B, C), (B, F)
    finally:
        model.train(was_training)
    # Cloned outside inference mode: ordinary tensors the caller may modify.
    return logits.float().cpu().clone(), fused.float().cpu().clone()


def evaluate(
    model: FusionClassifier, data: FeatureSet, classes: list[str], temperature: float = 1.0
) -> dict[str, Any]:
    """Accuracy, macro F1, loss (NLL at ``temperature``), per-class precision/recall/F1/support
    and the confusion matrix (rows: true class, columns: predicted, in ``classes`` order)."""
    if len(classes) != model.cfg.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.cfg.num_classes}-class model")
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    _check(data, model.cfg, "data")
    if len(data) == 0:
        raise ValueError("no items to evaluate")
    probs, _ = predict(model, data.features, data.mask, temperature)
    y_true = data.labels.cpu().numpy()
    y_pred = probs.argmax(dim=1).numpy()
    confusion, table, macro_f1 = scores(y_true, y_pred, len(classes))
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), data.labels.cpu()).item()
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": macro_f1,
        "loss": loss,
        "per_class": {
            name: {
                "precision": float(row[0]),
                "recall": float(row[1]),
                "f1": float(row[2]),
                "support": int(row[3]),
            }
            for name, row in zip(classes, table, strict=True)
        },
        "confusion": confusion.tolist(),
    }


def _val_scores(model: FusionClassifier, data: FeatureSet) -> tuple[float, float, float]:
    """(macro F1, loss, accuracy) on ``data`` in eval mode."""
    model.eval()
    with torch.no_grad():
        logits, _ = model(data.features, data.mask)  # (N, C)
        loss = F.cross_entropy(logits, data.labels).item()
        y_pred = logits.argmax(dim=1).numpy()
    y_true = data.labels.numpy()
    _, _, macro_f1 = scores(y_true, y_pred, model.cfg.num_classes)
    return macro_f1, loss, float((y_true == y_pred).mean())


def _selection_score(model: FusionClassifier, data: FeatureSet, select: str) -> tuple[float, float]:
    """(score, loss) that early stopping maximises / breaks ties on: macro F1 and loss with
    every modality, or for ``robust`` their means over that and each modality dropped in turn
    (a modality no validation item has is skipped)."""
    f1, loss, _ = _val_scores(model, data)
    if select == "full" or data.mask.shape[1] < 2:
        return f1, loss
    f1s, losses = [f1], [loss]
    for i in range(data.mask.shape[1]):
        if not data.mask[:, i].any():
            continue
        dropped = data.mask.clone()
        dropped[:, i] = False
        f1_i, loss_i, _ = _val_scores(model, FeatureSet(data.features, dropped, data.labels))
        f1s.append(f1_i)
        losses.append(loss_i)
    return float(np.mean(f1s)), float(np.mean(losses))


def fit(
    train: FeatureSet, val: FeatureSet | None, cfg: FusionConfig, tcfg: TrainConfig,
    on_epoch: OnEpoch | None = None,
) -> tuple[FusionClassifier, dict[str, Any]]:
    """Train a fusion classifier with Adam on the CPU, with the loss ``tcfg.loss`` (plain,
    class-weighted cross-entropy or focal loss), optionally class-balanced sampling, and
    modality dropout.

    Early stopping keeps the epoch with the best validation macro F1 (ties: lower validation
    loss); without validation data (``None`` or empty) it trains for all epochs. Seeded: the
    same inputs and config give the same model and metrics; the caller's RNG state is left
    untouched. Returns the model in eval mode and its metrics.

    ``tcfg.stacking_folds`` >= 2 (``late`` fusion only) stacks instead of training jointly: see
    :func:`_fit_stacked`; the result is the same kind of model. ``on_epoch`` hears of every
    epoch (a caller's heartbeat; it may raise to stop the training).
    """
    started = time.perf_counter()
    if tcfg.stacking_folds and cfg.strategy != "late":
        raise ValueError(
            f"stacking_folds applies to the late strategy only, not {cfg.strategy!r}"
        )
    _check(train, cfg, "train")
    if len(train) == 0:
        raise ValueError("no training items")
    if val is not None and len(val) == 0:
        val = None
    if val is not None:
        _check(val, cfg, "val")
    train = FeatureSet(
        {m: train.features[m].float().cpu() for m in cfg.input_dims},
        train.mask.cpu(),
        train.labels.cpu(),
    )
    if val is not None:
        val = FeatureSet(
            {m: val.features[m].float().cpu() for m in cfg.input_dims},
            val.mask.cpu(),
            val.labels.cpu(),
        )
    if tcfg.stacking_folds:
        model, extra = _fit_stacked(train, val, cfg, tcfg, on_epoch)
        epoch, best_epoch = extra.pop("epochs"), extra.pop("best_epoch")
    else:
        model, epoch, best_epoch = _fit_joint(train, val, cfg, tcfg, on_epoch)
        extra = {}
    model.eval()

    seconds = time.perf_counter() - started
    _, _, train_accuracy = _val_scores(model, train)
    final: tuple[float | None, float | None, float | None] = (
        _val_scores(model, val) if val is not None else (None, None, None)
    )
    metrics: dict[str, Any] = {
        "train_accuracy": train_accuracy,
        "val_accuracy": final[2],
        "val_macro_f1": final[0],
        "val_loss": final[1],
        "epochs": epoch,
        "best_epoch": best_epoch,
        "train_size": len(train),
        "val_size": len(val) if val is not None else 0,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(epoch, 1),
        "strategy": cfg.strategy,
        "loss": tcfg.loss,
        "gamma": tcfg.gamma if tcfg.loss == "focal" else None,
        "balanced": tcfg.balanced,
        "seed": tcfg.seed,
        **extra,
    }
    return model, metrics


def _fit_joint(
    train: FeatureSet, val: FeatureSet | None, cfg: FusionConfig, tcfg: TrainConfig,
    on_epoch: OnEpoch | None = None,
) -> tuple[FusionClassifier, int, int]:
    """fit's training loop on checked CPU data: (model, epochs run, epoch kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)  # weight init and dropout
        generator = torch.Generator().manual_seed(tcfg.seed)  # shuffling and modality dropout
        model = FusionClassifier(cfg)
        _fit_standardization(model, train)
        optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        criterion = ClassificationLoss(tcfg.loss, train.labels, cfg.num_classes, tcfg.gamma)

        best, epoch = BestEpoch(model, tcfg.patience), 0
        for epoch in range(1, tcfg.epochs + 1):
            model.train()
            if tcfg.balanced:
                order = balanced_order(train.labels, generator)
            else:
                order = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), tcfg.batch_size):
                idx = order[start : start + tcfg.batch_size]
                mask = drop_modalities(train.mask[idx], tcfg.modality_dropout, generator)  # (b, M)
                out = model.forward_details({m: x[idx] for m, x in train.features.items()}, mask)
                target = train.labels[idx]  # (b,)
                loss = criterion(out.logits, target)
                if out.unimodal_logits is not None and tcfg.aux_weight > 0:
                    loss = loss + tcfg.aux_weight * _unimodal_loss(
                        criterion, out.unimodal_logits, mask, target
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if val is None:
                best.epoch = epoch
            elif best.update(epoch, *_selection_score(model, val, tcfg.select)):
                break
            if on_epoch is not None:
                on_epoch(best.progress(epoch, tcfg.epochs, val is not None))
        if val is not None:
            best.restore()
    return model.eval(), epoch, best.epoch


# Ridge on the stacked modality logits: keeps them finite when one modality's out-of-fold
# predictions are perfect (the optimum is then at infinity), negligible otherwise.
STACKING_RIDGE = 1e-3


def _fit_stacked(
    train: FeatureSet, val: FeatureSet | None, cfg: FusionConfig, tcfg: TrainConfig,
    on_epoch: OnEpoch | None = None,
) -> tuple[FusionClassifier, dict[str, Any]]:
    """Late fusion by stacking, on checked CPU data.

    Jointly trained weights see each classifier's predictions on items it trains on, so they
    over-trust the modality whose classifier memorises the training set best. Here:

    1. the training items are split into ``k`` stratified folds (seeded);
    2. for each fold, every modality's classifier is trained on the other folds alone (as
       :func:`_fit_modality_heads`) and predicts the fold's items: out-of-fold log-probabilities
       (N, M, C) for every training item;
    3. the modality weights (the only parameters late fusion's combination has) are fit on
       those with :func:`models.fusion.combine_late`, missing modalities masked as at inference;
    4. the classifiers are trained once more on every training item, and take those weights.

    Returns the model and metrics: ``epochs``/``best_epoch`` (the largest over the final
    classifiers) and a ``stacking`` section.
    """
    k = tcfg.stacking_folds
    if len(train) < k:
        raise ValueError(f"stacking_folds={k} needs at least {k} training items, got {len(train)}")
    folds = stratified_folds(train.labels.tolist(), k, tcfg.seed)
    oof = torch.zeros(len(train), len(cfg.input_dims), cfg.num_classes)  # (N, M, C)
    for held in folds:
        held_set = set(held)
        rest = [i for i in range(len(train)) if i not in held_set]
        heads, _ = _fit_modality_heads(train.subset(rest), val, cfg, tcfg, on_epoch)
        part = train.subset(held)
        with torch.no_grad():
            out = heads.forward_details(part.features, part.mask)
            assert out.unimodal_logits is not None
            oof[torch.as_tensor(held)] = torch.log_softmax(out.unimodal_logits, dim=-1)
    criterion = ClassificationLoss(tcfg.loss, train.labels, cfg.num_classes, tcfg.gamma)
    modality_logits = fit_late_weights(oof, train.mask, train.labels, criterion)
    with torch.no_grad():
        oof_logits, _ = combine_late(oof, train.mask, modality_logits)  # (N, C)
    oof_accuracy = float((oof_logits.argmax(dim=1) == train.labels).float().mean())

    model, epochs = _fit_modality_heads(train, val, cfg, tcfg, on_epoch)
    with torch.no_grad():
        model.modality_logits.copy_(modality_logits)
    weights = torch.softmax(modality_logits, dim=0)  # (M,) with every modality present
    return model.eval(), {
        "epochs": max(e for e, _ in epochs.values()),
        "best_epoch": max(b for _, b in epochs.values()),
        "stacking": {
            "folds": k,
            "modality_weights": {m: float(w) for m, w in zip(model.modalities, weights)},
            "oof_accuracy": oof_accuracy,
            "head_epochs": {m: e for m, (e, _) in epochs.items()},
            "head_best_epochs": {m: b for m, (_, b) in epochs.items()},
        },
    }


def _fit_modality_heads(
    train: FeatureSet, val: FeatureSet | None, cfg: FusionConfig, tcfg: TrainConfig,
    on_epoch: OnEpoch | None = None,
) -> tuple[FusionClassifier, dict[str, tuple[int, int]]]:
    """A late fusion model whose per-modality classifiers are each trained alone, with equal
    modality weights, and each one's (epochs run, epoch kept).

    Each modality's classifier (standardisation, projection, head) is a one-modality late
    model trained by :func:`fit` on the items that have that modality (the same architecture,
    loss, sampling and early stopping, on the validation items that have it), then copied in.
    Modality dropout cannot act on one modality, and the auxiliary loss would only repeat the
    main one, so both are off. A modality no training item has keeps its initial weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tcfg.seed)
        model = FusionClassifier(cfg)
    alone = dataclasses.replace(tcfg, stacking_folds=0, modality_dropout=0.0, aux_weight=0.0)
    state = model.state_dict()
    epochs: dict[str, tuple[int, int]] = {}
    for i, (m, dim) in enumerate(cfg.input_dims.items()):
        unimodal_train = _one_modality(train, m, i)
        if len(unimodal_train) == 0:
            epochs[m] = (0, 0)
            continue
        unimodal_val = _one_modality(val, m, i) if val is not None else None
        one_cfg = dataclasses.replace(cfg, input_dims={m: dim})
        unimodal, metrics = fit(unimodal_train, unimodal_val, one_cfg, alone, on_epoch)
        for key, value in unimodal.state_dict().items():
            if key != "modality_logits":
                state[key] = value
        epochs[m] = (int(metrics["epochs"]), int(metrics["best_epoch"]))
    model.load_state_dict(state)
    return model.eval(), epochs


def _one_modality(data: FeatureSet, modality: str, column: int) -> FeatureSet:
    """The items of ``data`` that have ``modality``, with that modality only."""
    rows = data.mask[:, column]  # (N,)
    return FeatureSet(
        {modality: data.features[modality][rows]},
        torch.ones(int(rows.sum()), 1, dtype=torch.bool),
        data.labels[rows],
    )


def fit_late_weights(
    log_probs: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    criterion: ClassificationLoss,
) -> torch.Tensor:
    """Late fusion's modality logits (M,) that minimise ``criterion`` on the combination of
    given per-modality predictions (a small smooth problem: L-BFGS, full batch, from equal
    weights, deterministic), plus a ridge of STACKING_RIDGE.

    log_probs: (N, M, C) finite; mask: (N, M) bool; labels: (N,). Items with no modality
    present cannot move the weights and are left out.
    """
    some = mask.any(dim=1)  # (N,)
    log_probs, mask, labels = log_probs[some].detach(), mask[some], labels[some]
    modality_logits = torch.zeros(mask.shape[1], requires_grad=True)  # (M,)
    if not len(labels):
        return modality_logits.detach()
    optimizer = torch.optim.LBFGS(
        [modality_logits], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits, _ = combine_late(log_probs, mask, modality_logits)  # (N, C)
        loss = criterion(logits, labels) + STACKING_RIDGE * modality_logits.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return modality_logits.detach().clone()


def _unimodal_loss(
    criterion: ClassificationLoss, unimodal: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The loss of each per-modality classifier on the items that show it, averaged.

    unimodal: (B, M, C); mask: (B, M) bool; target: (B,) -> scalar.
    """
    losses = [
        criterion(unimodal[mask[:, i], i], target[mask[:, i]])
        for i in range(mask.shape[1])
        if mask[:, i].any()
    ]
    return torch.stack(losses).mean() if losses else unimodal.sum() * 0.0


def stratified_folds(labels: Sequence[Any], k: int, seed: int) -> list[list[int]]:
    """Split item indices into ``k`` folds with about the same share of each class.

    Each class's items, shuffled by the seed, are dealt to the folds in turn, continuing where
    the previous class stopped, so fold sizes differ by at most one. Deterministic for a given
    seed; each fold is sorted. With fewer than ``k`` items some folds are empty.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    folds: list[list[int]] = [[] for _ in range(k)]
    dealt = 0
    for label in sorted(groups, key=str):  # fixed class order: the draw depends on the seed only
        members = groups[label]
        for j in rng.permutation(len(members)):
            folds[dealt % k].append(members[j])
            dealt += 1
    return [sorted(f) for f in folds]


def stratified_split(
    labels: list[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split item indices into (train, val), about ``val_fraction`` of each class to val.

    Every class with at least two items has at least one on each side; a class with one item
    goes to train. Deterministic for a given seed; both lists are sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in sorted(groups, key=str):  # fixed class order: the draw depends on the seed only
        members = groups[label]
        n = len(members)
        n_val = 0 if n < 2 else min(max(round(n * val_fraction), 1), n - 1)
        shuffled = [members[j] for j in rng.permutation(n)]
        val_idx.extend(shuffled[:n_val])
        train_idx.extend(shuffled[n_val:])
    return sorted(train_idx), sorted(val_idx)


def group_split(
    labels: Sequence[str], groups: Sequence[str | None], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split item indices into (train, val) with no group on both sides, about
    ``val_fraction`` of each class in val.

    Items without a group (None) are groups of their own. Groups are visited in a seeded
    random order, and a group goes to val when that brings val's class counts closer to
    ``val_fraction`` of each class's total (squared error); train keeps at least one group,
    and val gets one as soon as there are two. Deterministic for a given seed; both lists
    are sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    classes = sorted(set(labels), key=str)
    column = {c: j for j, c in enumerate(classes)}
    members: dict[tuple[int, str], list[int]] = {}
    for i, (label, group) in enumerate(zip(labels, groups, strict=True)):
        key = (0, group) if group is not None else (1, str(i))  # ungrouped: one item each
        members.setdefault(key, []).append(i)
    names = sorted(members)
    counts = np.zeros((len(names), len(classes)))  # (G, C)
    for g, name in enumerate(names):
        for i in members[name]:
            counts[g, column[labels[i]]] += 1
    target = counts.sum(axis=0) * val_fraction  # (C,)
    order = np.random.default_rng(seed).permutation(len(names))
    in_val = np.zeros(len(names), dtype=bool)
    val_counts = np.zeros(len(classes))
    for g in order:
        if in_val.sum() + 1 >= len(names):
            break  # train keeps a group
        before = float(((val_counts - target) ** 2).sum())
        after = float(((val_counts + counts[g] - target) ** 2).sum())
        if after < before:
            in_val[g] = True
            val_counts += counts[g]
    if not in_val.any() and len(names) > 1:
        costs = ((counts - target) ** 2).sum(axis=1)  # (G,)
        in_val[int(np.argmin(costs))] = True
    val_idx = sorted(i for g, name in enumerate(names) if in_val[g] for i in members[name])
    train_idx = sorted(i for g, name in enumerate(names) if not in_val[g] for i in members[name])
    return train_idx, val_idx


def choose_split(labels: Sequence[str], splits: Sequence[str | None],
                 groups: Sequence[str | None], seed: int) -> tuple[list[int], list[int], str]:
    """(train, val, how): labels.csv's split where it gives one; else, where items have a
    group, a group-disjoint stratified split; else a stratified one. 20 % to validation."""
    if any(splits):
        train_idx = [i for i, split in enumerate(splits) if split != "val"]
        val_idx = [i for i, split in enumerate(splits) if split == "val"]
        return train_idx, val_idx, "labels.csv"
    if any(groups):
        train_idx, val_idx = group_split(labels, groups, 0.2, seed)
        return train_idx, val_idx, f"group-disjoint stratified, seed {seed}"
    train_idx, val_idx = stratified_split(list(labels), 0.2, seed)
    return train_idx, val_idx, f"stratified, seed {seed}"


def split_groups(groups: Sequence[str | None], train_idx: Sequence[int],
                 val_idx: Sequence[int]) -> dict[str, int]:
    """How many groups each side has, and how many are on both (0 for a group-disjoint
    split; labels.csv's own split may share some, which flatters validation)."""
    train = {groups[i] for i in train_idx if groups[i]}
    val = {groups[i] for i in val_idx if groups[i]}
    return {"train": len(train), "val": len(val), "shared": len(train & val)}
