"""Learning from the archive being classified (``adapt=true`` on a classify job): a stacked
model (models.stacking) adapted to the job's own unlabelled items, as a new model version.

Two steps, both on cached features, no labels of the job's items:

1. **Re-standardisation.** Where a dense column's features moved (their standardised mean shift
   against the training items, as the shift report measures it, exceeds ``MOVED``), the
   column's head reads them standardised by the job's own mean and spread instead of the
   training's: what a feature means relative to its archive survives a change of camera,
   microphone or level better than its raw value.
2. **Co-training across modalities.** An item's modalities are different views of one thing.
   For a few rounds, the views other than ``m`` predict each job item (the meta-model over
   their columns); where that prediction is confident (at least the threshold), the item
   becomes a training example, with that label, for ``m``'s heads, which are refitted on the
   training items plus those. The threshold is picked on the validation split: the lowest
   whose confident predictions there are right at least ``PRECISION`` of the time.

With one modality there is no other view to learn from: only the re-standardisation applies
(docs/models.md says when this helps).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from mmbatch.contract import column_modality
from models.fusion import FusionClassifier
from models.stacking import COUNT_C, DENSE_C, copy_linear
from models.training import FeatureSet, forward_eval

ROUNDS = 3
MOVED = 0.3  # the shift report's "moved" (models.shift: a mean shift of 0.3 warns)
PRECISION = 0.99  # confident predictions must be this often right on the validation split
# Never below 0.95: the validation split comes from the training sources, where the model is
# surer of itself than on shifted data; on the shifted set (bench.models_report --shifted),
# lower thresholds let the wrong pseudo-labels of unseen sources teach the heads.
THRESHOLDS = (0.95, 0.97, 0.99)
MAX_PSEUDO_SHARE = 4.0  # at most this many pseudo-labelled items per training item


@dataclass
class Adapted:
    """The adapted model and what was done, for the derived version's metrics."""

    model: FusionClassifier
    report: dict[str, Any] = field(default_factory=dict)


def mean_shift(train: np.ndarray, target: np.ndarray) -> float:
    """Root mean square over features of the standardised mean difference (the shift
    report's ``mean_shift``, without its small-sample correction)."""
    std = np.maximum(train.std(axis=0), 1e-6)
    return float(np.sqrt(np.mean(((target.mean(axis=0) - train.mean(axis=0)) / std) ** 2)))


def _view_probs(model: FusionClassifier, data: FeatureSet, keep: list[int]) -> np.ndarray:
    """Class probabilities (N, C) from the columns ``keep`` only (the others masked)."""
    mask = torch.zeros_like(data.mask)
    mask[:, keep] = data.mask[:, keep]
    logits, _ = forward_eval(model, data.features, mask)
    return torch.softmax(logits, dim=1).numpy()


def adapt_stack(model: FusionClassifier, train: FeatureSet, val: FeatureSet | None,
                target: FeatureSet, seed: int = 0, rounds: int = ROUNDS,
                strengths: dict[str, float] | None = None) -> Adapted:
    """A copy of the stacked ``model`` adapted to ``target`` (the job's items; its labels are
    ignored). ``train``/``val`` are the model's training and validation items, columns in the
    model's order; ``strengths``: each column's regularisation as the stacking chose it
    (``metrics.stacking.candidates[column].C``)."""
    if model.cfg.strategy != "stack":
        raise ValueError("adaptation applies to stacked models (strategy=stack)")
    adapted = copy.deepcopy(model).eval()
    columns = list(model.modalities)
    views: dict[str, list[int]] = {}
    for i, c in enumerate(columns):
        views.setdefault(column_modality(c), []).append(i)
    report: dict[str, Any] = {"target_items": len(target), "restandardised": {},
                              "views": sorted(views), "rounds": []}
    # 1. re-standardise the dense columns that moved
    for i, c in enumerate(columns):
        if c in model.cfg.count_columns:
            continue
        x_train = train.features[c][train.mask[:, i]].numpy()
        x_target = target.features[c][target.mask[:, i]].numpy()
        if len(x_train) < 2 or len(x_target) < 2:
            continue
        moved = mean_shift(x_train, x_target)
        report["restandardised"][c] = {"mean_shift": round(moved, 4), "applied": moved > MOVED}
        if moved > MOVED:
            mean = torch.from_numpy(x_target.mean(axis=0)).float()
            std = torch.from_numpy(np.maximum(x_target.std(axis=0), 1e-3)).float()
            adapted.set_standardization(c, mean, std)
    if len(views) < 2:
        report["co_training"] = "one modality: no other view to learn from"
        return Adapted(adapted, report)
    # 2. co-training: the threshold from the validation split (with the original model)
    threshold = _threshold(model, val if val is not None else train, views)
    report["threshold"] = threshold
    y_train = train.labels.numpy()
    c_count = model.cfg.num_classes
    for r in range(rounds):
        added: dict[str, int] = {}
        # the whole model's predictions: where a view is unsure, the others speak
        probs = _view_probs(adapted, target, list(range(len(columns))))
        for m, cols in views.items():
            others = [i for v, vc in views.items() if v != m for i in vc]
            has_m = target.mask[:, cols].any(dim=1).numpy()
            has_other = target.mask[:, others].any(dim=1).numpy()
            confident = (probs.max(axis=1) >= threshold) & has_m & has_other
            rows = np.nonzero(confident)[0][: int(MAX_PSEUDO_SHARE * len(y_train))]
            pseudo = probs[rows].argmax(axis=1)
            added[m] = len(rows)
            for i in cols:
                _refit_column(adapted, columns[i], i, train, target, rows, pseudo, y_train,
                              c_count, seed, (strengths or {}).get(columns[i]))
        report["rounds"].append({"round": r + 1, "pseudo_labels": added})
    return Adapted(adapted, report)


def _threshold(model: FusionClassifier, data: FeatureSet, views: dict[str, list[int]]) -> float:
    """The lowest threshold at which the other views' confident predictions on ``data`` are
    right at least PRECISION of the time (over every view), else the highest."""
    y = data.labels.numpy()
    right: list[np.ndarray] = []
    conf: list[np.ndarray] = []
    every = [i for vc in views.values() for i in vc]
    for m, cols in views.items():
        others = [i for v, vc in views.items() if v != m for i in vc]
        has = data.mask[:, cols].any(dim=1).numpy() & data.mask[:, others].any(dim=1).numpy()
        probs = _view_probs(model, data, every)[has]
        right.append(probs.argmax(axis=1) == y[has])
        conf.append(probs.max(axis=1))
    ok, confidence = np.concatenate(right), np.concatenate(conf)
    for t in THRESHOLDS:
        chosen = confidence >= t
        if chosen.sum() >= 5 and ok[chosen].mean() >= PRECISION:
            return t
    return THRESHOLDS[-1]


def _refit_column(model: FusionClassifier, column: str, index: int, train: FeatureSet,
                  target: FeatureSet, rows: np.ndarray, pseudo: np.ndarray, y_train: np.ndarray,
                  c_count: int, seed: int, strength: float | None) -> None:
    """Refit one column's head on its training items and the pseudo-labelled target items,
    each standardised as the model reads them (training items by the training statistics the
    head was fitted with, target items by the model's current ones)."""
    have_train = train.mask[:, index].numpy()
    have_target = target.mask[rows, index].numpy() if len(rows) else np.zeros(0, bool)
    if not len(rows) or not have_target.any():
        return
    with torch.no_grad():
        if column in model.cfg.count_columns:
            x_train = model.inputs(column, train.features[column][have_train]).numpy()
        else:
            x_train_raw = train.features[column][have_train].float()
            mean = x_train_raw.mean(dim=0)
            std = x_train_raw.std(dim=0, unbiased=False).clamp_min(1e-3)
            x_train = ((x_train_raw - mean) / std).numpy()
        x_target = model.inputs(column, target.features[column][rows[have_target]]).numpy()
    x = np.concatenate([x_train, x_target])
    y = np.concatenate([y_train[have_train], pseudo[have_target]])
    if len(np.unique(y)) < 2:
        return
    if strength is None:  # the stacking's first strength for such a column
        strength = COUNT_C[0] if column in model.cfg.count_columns else DENSE_C[0]
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=strength, max_iter=300, random_state=seed).fit(x, y)
    copy_linear(lr, model.column_heads[column], c_count)
