"""Classification scores in numpy: confusion matrix, per-class precision, recall and F1, macro F1,
and expected calibration error. Training, model evaluation and a classify job's evaluation all
score with these, so a number means the same wherever it is shown. Imports nothing of the
project (``models/`` may import it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows the true class, columns the predicted one."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)),
              1)
    return confusion


def per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class: precision, recall, F1 (0 where undefined) and support, from a confusion
    matrix; each (C,) float64."""
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1, support


def macro_f1(confusion: np.ndarray) -> float | None:
    """The mean F1 over the classes that occur as truth or prediction; None when none does."""
    _, _, f1, support = per_class(confusion)
    seen = (support > 0) | (confusion.sum(axis=0) > 0)
    return float(f1[seen].mean()) if seen.any() else None


def scores(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Confusion matrix, per-class rows [precision, recall, f1, support] (C, 4), and macro F1
    (0 when no class occurs)."""
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    table = np.stack(per_class(confusion), axis=1)
    return confusion, table, macro_f1(confusion) or 0.0


def expected_calibration_error(confidence: Any, correct: Any, bins: int = ECE_BINS) -> float:
    """ECE: the support-weighted gap between confidence and accuracy over ``bins`` equal-width
    confidence bins, bin b holding confidences in (b/bins, (b+1)/bins]. confidence: (N,) top-1
    probabilities; correct: (N,) bools."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape[0] == 0:
        raise ValueError("no items")
    index = np.clip(np.ceil(confidence * bins).astype(np.int64), 1, bins) - 1
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += float(members.mean()) * abs(float(confidence[members].mean())
                                                  - float(correct[members].mean()))
    return total


def score_labels(pairs: Sequence[tuple[str, str | None, float | None]], classes: Sequence[str]
                 ) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall, confusion matrix and ECE of (given label,
    predicted label or None if not classified, confidence) triples: a classify job scored
    against the labels its archive gave.

    Items whose given label the model does not know count as errors in accuracy and are
    listed in ``unknown_labels``; unclassified items (failed or pending) are counted apart.
    """
    index = {c: i for i, c in enumerate(classes)}
    done = [(g, p, c) for g, p, c in pairs if p is not None]
    known = [(index[g], index[p], c) for g, p, c in done if g in index and p in index]
    unknown = sorted({g for g, _, _ in done if g not in index})
    confusion = confusion_matrix([t for t, _, _ in known], [p for _, p, _ in known],
                                 len(classes))
    precision, recall, f1, support = per_class(confusion)
    correct = np.array([t == p for t, p, _ in known] + [False] * (len(done) - len(known)))
    confidences = np.array([c or 0.0 for _, _, c in known], dtype=float)
    return {
        "items": len(pairs),
        "classified": len(done),
        "not_classified": len(pairs) - len(done),
        "accuracy": float(correct.mean()) if len(done) else None,
        "macro_f1": macro_f1(confusion),
        "ece": expected_calibration_error(confidences, correct[: len(known)]) if known else None,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
        "unknown_labels": unknown,
    }
