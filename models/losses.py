"""Classification losses for imbalanced labels, and class-balanced sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbatch.contract import LOSSES


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C_seen * n_c)``, 1 on average over the items.

    labels: (N,) int64 -> (C,) float32; a class absent from ``labels`` gets weight 0 (it cannot
    occur as a target anyway).
    """
    counts = torch.bincount(labels, minlength=num_classes).float()  # (C,)
    seen = counts > 0
    weights = torch.zeros(num_classes)
    weights[seen] = labels.numel() / (int(seen.sum()) * counts[seen])
    return weights


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of ``-α_y (1 - p_y)^γ log p_y`` (Lin et al., 2017); γ = 0 is cross-entropy.

    logits: (B, C); target: (B,) int64; weight: (C,) optional per-class α -> scalar. With
    weights, the mean is normalised by the weights of the targets, like ``F.cross_entropy``.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    log_p = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)  # (B,)
    loss = -((1.0 - log_p.exp()).clamp_min(0.0) ** gamma) * log_p  # (B,)
    if weight is None:
        return loss.mean()
    alpha = weight.to(loss.device)[target]  # (B,)
    return (alpha * loss).sum() / alpha.sum().clamp_min(1e-12)


class ClassificationLoss:
    """The loss a training run uses: ``ce``, class-``weighted`` CE or ``focal``.

    Class weights are computed once from the training labels.
    """

    def __init__(
        self, name: str, train_labels: torch.Tensor, num_classes: int, gamma: float = 2.0
    ) -> None:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}: expected one of {LOSSES}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.name, self.gamma = name, float(gamma)
        self.weight = class_weights(train_labels, num_classes) if name == "weighted" else None

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits: (B, C); target: (B,) -> scalar."""
        if self.name == "focal":
            return focal_loss(logits, target, self.gamma)
        return F.cross_entropy(logits, target, weight=self.weight)


def balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch of item indices drawn with replacement so that every class is equally likely.

    labels: (N,) int64 -> (N,) int64 indices into ``labels``.
    """
    counts = torch.bincount(labels).double()  # (C,)
    per_item = 1.0 / counts[labels]  # (N,)
    return torch.multinomial(per_item, labels.numel(), replacement=True, generator=generator)
