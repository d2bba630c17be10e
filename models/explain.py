"""Per-item explanations: how much each present modality contributed to a prediction."""

from __future__ import annotations

from typing import Any

import torch

from mmbatch.contract import column_modality
from models.fusion import FusionClassifier

# What the weights of each strategy are, in words, for the stored explanation.
WEIGHT_KINDS: dict[str, str] = {
    "weighted": "learned softmax weights",
    "gated": "per-item gate",
    "attention": "summary-token attention (last layer, mean over heads)",
    "hierarchical": "attention pooling over modalities and pairs (a pair's weight split evenly)",
    "late": "learned decision weights",
    "stack": "each input column's share of what its vote moves the meta-model's logits by",
}


def explain(
    model: FusionClassifier,
    features: dict[str, torch.Tensor],
    mask: torch.Tensor,
    temperature: float = 1.0,
    digits: int = 6,
) -> list[dict[str, Any]]:
    """One JSON-able dict per item:

    - ``strategy``;
    - ``weights``: ``{modality: weight}`` over the present modalities, where the strategy has
      them (gate, attention, learned weights; ``None`` for ``concat``), with ``weights_kind``;
    - ``leave_one_out``: ``{modality: p(c | all) - p(c | all but that modality)}`` for every
      present modality, ``c`` the class predicted with all of them: positive when the modality
      supported the prediction, negative when it argued against it. An item with one modality
      is compared with the prediction from no input at all. A modality's feature families
      (``stack``) go with it: its weight is theirs summed, and ``column_weights`` keeps each
      column's own.

    features[m]: (B, D_m); mask: (B, M) bool. Probabilities use ``temperature`` like
    :func:`models.training.predict`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    device = next(model.parameters()).device
    feats = {m: features[m].to(device) for m in model.modalities}
    mask = mask.to(device).bool()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.forward_details(feats, mask)
            probs = torch.softmax(out.logits.float() / temperature, dim=1)  # (B, C)
            predicted = probs.argmax(dim=1)  # (B,)
            p_full = probs.gather(1, predicted[:, None]).squeeze(1)  # (B,)
            # a modality's columns go together (its encoder's and its feature families')
            groups: dict[str, list[int]] = {}
            for i, column in enumerate(model.modalities):
                groups.setdefault(column_modality(column), []).append(i)
            drops = []
            for cols in groups.values():
                reduced = mask.clone()
                reduced[:, cols] = False
                logits, _ = model(feats, reduced)  # (B, C)
                p = torch.softmax(logits.float() / temperature, dim=1)
                drops.append(p_full - p.gather(1, predicted[:, None]).squeeze(1))  # (B,)
            delta = torch.stack(drops, dim=1).cpu()  # (B, G)
            weights = None if out.weights is None else out.weights.float().cpu()  # (B, M)
    finally:
        model.train(was_training)

    strategy = model.cfg.strategy
    mask_cpu = mask.cpu()
    by_column = any(len(cols) > 1 or model.modalities[cols[0]] != m
                    for m, cols in groups.items())
    explanations = []
    for b in range(mask_cpu.shape[0]):
        present = [(g, m, cols) for g, (m, cols) in enumerate(groups.items())
                   if bool(mask_cpu[b, cols].any())]
        note = {
            "strategy": strategy,
            "weights": None if weights is None else {
                m: round(float(weights[b, cols].sum()), digits) for _, m, cols in present},
            "weights_kind": WEIGHT_KINDS.get(strategy),
            "leave_one_out": {m: round(float(delta[b, g]), digits) for g, m, _ in present},
        }
        if by_column and weights is not None:  # stacked families: each column's own share
            note["column_weights"] = {model.modalities[i]: round(float(weights[b, i]), digits)
                                      for i in range(len(model.modalities))
                                      if bool(mask_cpu[b, i])}
        explanations.append(note)
    return explanations
