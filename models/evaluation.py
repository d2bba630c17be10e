"""Evaluating a trained fusion classifier: calibration, temperature scaling, modality ablation,
and the report a model version stores in its metrics."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmbatch import scoring
from mmbatch.contract import column_modality
from models.fusion import FusionClassifier
from models.training import FeatureSet, evaluate, forward_eval

# log T is searched on a grid over [1/20, 20]: wide enough for any sane model, and
# deterministic (no optimiser state, no tolerance to tune).
_LOG_T_GRID = torch.linspace(float(np.log(0.05)), float(np.log(20.0)), 401, dtype=torch.float64)


def logits_of(model: FusionClassifier, data: FeatureSet) -> torch.Tensor:
    """The model's logits for every item, in eval mode: (N, C) float32 on the CPU."""
    logits, _ = forward_eval(model, data.features, data.mask)
    return logits


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = scoring.ECE_BINS
) -> float:
    """ECE (mmbatch.scoring) of class probabilities (N, C) against labels (N,) int64."""
    if probs.shape[0] == 0:
        raise ValueError("no items")
    confidence, predicted = probs.max(dim=1)  # (N,), (N,)
    return scoring.expected_calibration_error(confidence.double().numpy(),
                                              (predicted == labels).numpy(), bins)


def fit_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    prior_std: float = 1.0,
    keep_calibration: bool = True,
) -> float:
    """The temperature T > 0 of ``softmax(logits / T)`` fitted on labelled logits (Guo et al.,
    2017): the minimum of the mean NLL plus a weak log-normal prior on T,
    ``(log T)^2 / (2 prior_std^2 N)``, over a grid of T in [1/20, 20].

    Without the prior, a validation split the model gets entirely right drives T towards 0
    (every item ever more confident), which says nothing about the items it will get wrong
    later; the prior keeps T near 1 unless the data argue clearly for moving it.

    With ``keep_calibration``, only temperatures whose ECE on these logits is no worse than at
    T = 1 are admissible (T = 1 always is): NLL and ECE usually agree, but on a well-calibrated
    model and a small split the NLL optimum can cost a little ECE, and a calibration step that
    worsens calibration on the data it was fitted on is not worth shipping.

    logits: (N, C); labels: (N,) int64. Scaling by one number never changes the predicted
    class, so accuracy and F1 are untouched; only the confidence moves.
    """
    if logits.shape[0] == 0:
        raise ValueError("no items to fit a temperature on")
    if not prior_std > 0:
        raise ValueError(f"prior_std must be positive, got {prior_std!r}")
    z = logits.double()  # (N, C)
    grid = torch.cat([_LOG_T_GRID, torch.zeros(1, dtype=torch.float64)])  # (G,) with T = 1
    nll = torch.stack([F.cross_entropy(z / t, labels) for t in grid.exp()])  # (G,)
    objective = nll + grid**2 / (2 * prior_std**2 * z.shape[0])  # (G,)
    if keep_calibration:
        ece_at_one = expected_calibration_error(torch.softmax(z, dim=1), labels)
        for g in objective.argsort().tolist():
            probs = torch.softmax(z / grid[g].exp(), dim=1)
            if expected_calibration_error(probs, labels) <= ece_at_one:
                return float(grid[g].exp())
        return 1.0
    return float(grid[int(objective.argmin())].exp())


def calibration(model: FusionClassifier, data: FeatureSet) -> dict[str, float]:
    """Temperature fitted on ``data`` (see :func:`fit_temperature`), with ECE and NLL before
    (T = 1) and after, and the temperature the NLL alone would have picked."""
    logits = logits_of(model, data)  # (N, C)
    labels = data.labels.cpu()
    temperature = fit_temperature(logits, labels)
    before = torch.softmax(logits.double(), dim=1)
    after = torch.softmax(logits.double() / temperature, dim=1)
    return {
        "temperature": temperature,
        "temperature_nll": fit_temperature(logits, labels, keep_calibration=False),
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "nll_before": float(F.cross_entropy(logits.double(), labels)),
        "nll_after": float(F.cross_entropy(logits.double() / temperature, labels)),
    }


def accuracy_with_mask(model: FusionClassifier, data: FeatureSet, mask: torch.Tensor) -> float:
    """Accuracy on ``data`` when the model is shown only the modalities in ``mask`` (N, M)."""
    if len(data) == 0:
        raise ValueError("no items")
    logits = logits_of(model, FeatureSet(data.features, mask, data.labels))  # (N, C)
    return float((logits.argmax(dim=1) == data.labels.cpu()).double().mean())


def modality_ablation(model: FusionClassifier, data: FeatureSet) -> dict[str, Any]:
    """Accuracy on all of ``data`` with every modality, with each modality alone, and with each
    one dropped. An item that has nothing left to show is still counted (the model predicts
    from no input), so the three figures share one denominator."""
    full = accuracy_with_mask(model, data, data.mask)
    alone: dict[str, float] = {}
    without: dict[str, float] = {}
    # a modality's columns go together: its encoder's and its feature families' (stack)
    groups: dict[str, list[int]] = {}
    for i, column in enumerate(model.modalities):
        groups.setdefault(column_modality(column), []).append(i)
    for m, cols in groups.items():
        only = torch.zeros_like(data.mask)
        only[:, cols] = data.mask[:, cols]
        alone[m] = accuracy_with_mask(model, data, only)
        dropped = data.mask.clone()
        dropped[:, cols] = False
        without[m] = accuracy_with_mask(model, data, dropped)
    present = {m: int(data.mask[:, cols].any(dim=1).sum()) for m, cols in groups.items()}
    return {"all": full, "alone": alone, "without": without, "items": len(data),
            "items_with": present}


def evaluation_report(
    model: FusionClassifier, data: FeatureSet, classes: list[str]
) -> dict[str, Any]:
    """Everything a model version stores about its validation split: accuracy, macro F1,
    per-class precision/recall/F1, the confusion matrix, the calibration before and after
    temperature scaling (the temperature is fitted here, on ``data``), and modality ablation."""
    cal = calibration(model, data)
    report = evaluate(model, data, classes)
    report["calibration"] = cal
    report["ablation"] = modality_ablation(model, data)
    return report


def confusion_png(confusion: list[list[int]], classes: list[str], title: str = "") -> bytes:
    """The confusion matrix (rows: true class, columns: predicted) rendered as a PNG."""
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion must be {n}x{n} for {n} classes, got {counts.shape}")
    size = 2.0 + 0.6 * n
    # A Figure of its own with the Agg canvas: no pyplot, so no global backend or figure state.
    fig = Figure(figsize=(size + 1.0, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(counts, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    # No timestamp or software chunk: the same matrix gives the same bytes (and blob hash).
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
