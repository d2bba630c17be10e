"""Fusion of per-modality features into one embedding, and the classifier head on top.

Every strategy starts the same way: each modality's features are standardised and projected to
``proj_dim`` values (``p_i``), and a missing modality's projection is replaced by exact zeros.
The strategies differ in how the projections are combined:

- ``concat``: ``[p_1, …, p_M, mask]`` into an MLP head (the baseline);
- ``weighted``: ``Σ_i w_i p_i`` with ``w = softmax(a)`` over the present modalities, ``a`` a
  learned vector (one weight per modality, the same for every item);
- ``gated``: the same sum, but the weights come from a gate that looks at the item's projections,
  so they change per item;
- ``attention``: one token per modality plus a learned summary token through a small pre-norm
  transformer encoder, missing modalities masked out as keys; the summary token is the embedding;
- ``hierarchical``: two levels, pairwise fusions of every two present modalities, then an
  attention pooling over the single-modality and pairwise units;
- ``late``: decision-level fusion, one classifier per modality, their log-probabilities combined
  as ``Σ_i w_i log p_i(c)`` with learned softmax weights over the present modalities (trained
  jointly with the classifiers, or stacked on out-of-fold predictions: models/training.py).
- ``stack``: one linear classifier per input column (a modality's encoder features, or one of
  its feature families: ``"image:hog"``, models.families), their centred log-probabilities
  concatenated into a linear meta-model; fitted by models.stacking on out-of-fold predictions,
  not by gradient descent here. A missing column contributes exactly zero (a uniform vote).

All of them take any subset of modalities per item, and a masked modality's features cannot
change any output, NaN included: masked positions are replaced (``torch.where``) before use, and
masked softmax weights are exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from mmbatch.contract import MODALITIES, STRATEGIES, column_modality

# Strategies whose forward pass yields per-item modality weights (gate, attention, ...).
WEIGHTED_STRATEGIES: frozenset[str] = frozenset(STRATEGIES) - {"concat"}
# ``stack``: a column's log-probabilities are floored here (log 1e-6), so that one
# overconfident head cannot outvote every other column by itself.
LOG_PROB_FLOOR = math.log(1e-6)


@dataclass(frozen=True)
class FusionConfig:
    """Shape and hyper-parameters of a :class:`FusionClassifier`.

    ``input_dims`` maps each input column the model takes to its feature size: a modality (its
    encoder's features) or ``"<modality>:<family>"`` (a feature family of it, models.families).
    It is stored in ``MODALITIES`` order, a modality's own column before its families (in the
    order given), whatever order it was given in, because that order is the column order of the
    mask. ``num_heads`` and ``num_layers`` shape the ``attention`` strategy only.
    ``count_columns``: columns whose inputs are term counts (hashed character n-grams), turned
    into sublinear TF-IDF with IDF weights the model keeps, instead of standardised.
    """

    input_dims: dict[str, int]
    num_classes: int
    strategy: str = "concat"
    proj_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.2
    num_heads: int = 4
    num_layers: int = 1
    count_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.input_dims, dict) or not self.input_dims:
            raise ValueError("input_dims must be a non-empty dict of modality -> feature dim")
        unknown = sorted(c for c in self.input_dims
                         if not isinstance(c, str) or column_modality(c) not in MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {unknown}: expected a subset of {MODALITIES} "
                             "(or <modality>:<family>)")
        for name, dim in self.input_dims.items():
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"input_dims[{name!r}] must be a positive int, got {dim!r}")
        # A private copy in canonical order: the caller's dict may change later.
        given = list(self.input_dims)
        order = sorted(given, key=lambda c: (MODALITIES.index(column_modality(c)),
                                             c != column_modality(c), given.index(c)))
        object.__setattr__(self, "input_dims", {c: self.input_dims[c] for c in order})
        counts = tuple(self.count_columns)
        if not set(counts) <= set(self.input_dims):
            raise ValueError(f"count_columns {counts} must be among the inputs")
        object.__setattr__(self, "count_columns", counts)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: expected one of {STRATEGIES}")
        for name in ("proj_dim", "hidden_dim", "num_heads", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.strategy == "attention" and self.proj_dim % self.num_heads:
            raise ValueError(
                f"attention: proj_dim ({self.proj_dim}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities in mask column order."""
        return tuple(self.input_dims)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal config."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["input_dims"] = dict(self.input_dims)
        out["dropout"] = float(self.dropout)
        out["count_columns"] = list(self.count_columns)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionConfig:
        """Keys missing from ``d`` other than ``input_dims`` and ``num_classes`` take their
        defaults, so configs saved before a field existed still load."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FusionConfig keys: {unknown}")
        missing = sorted({"input_dims", "num_classes"} - set(d))
        if missing:
            raise ValueError(f"missing FusionConfig keys: {missing}")
        input_dims = d["input_dims"]
        if not isinstance(input_dims, dict):
            raise ValueError("input_dims must be a dict")
        return cls(**{**d, "input_dims": dict(input_dims),
                      "count_columns": tuple(d.get("count_columns", ()))})


@dataclass
class FusionOutput:
    """Everything one forward pass computes."""

    logits: torch.Tensor  # (B, C)
    fused: torch.Tensor  # (B, F) the fused embedding
    # (B, M): how much each modality weighs in the fusion, 0 where missing, rows summing to 1
    # over the present modalities (0 everywhere for an item with none); None for ``concat``.
    weights: torch.Tensor | None = None
    # (B, M, C): the per-modality classifiers of ``late`` fusion (meaningless where missing).
    unimodal_logits: torch.Tensor | None = None


class Standardize(nn.Module):
    """Per-dimension (x - mean) / std with statistics fixed at training time (buffers, so they
    travel with the checkpoint). Defaults to the identity."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # (D,)
        self.register_buffer("std", torch.ones(dim))  # (D,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (B, D)


class TfIdf(nn.Module):
    """Term counts -> sublinear TF-IDF, L2-normalised: ``(1 + log tf) * idf``, as
    scikit-learn's ``TfidfTransformer(sublinear_tf=True)``, with the IDF weights fixed at
    training time (a buffer, so they travel with the checkpoint)."""

    idf: torch.Tensor  # (D,)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("idf", torch.ones(dim))  # (D,)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        tf = torch.where(counts > 0, 1.0 + torch.log(counts.clamp_min(1e-12)), 0.0)  # (B, D)
        x = tf * self.idf
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (B, D)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``mask`` is True; exactly 0 elsewhere.

    scores: (..., K) float; mask: (..., K) bool -> (..., K). A row with nothing present is all
    zeros. A finite fill value, not -inf, so that such a row has no NaN in its gradient either.
    """
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.where(mask, torch.softmax(filled, dim=-1), 0.0)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim),
    )


class AttentionBlock(nn.Module):
    """A pre-norm transformer encoder layer that also returns its attention weights.

    Written out rather than ``nn.TransformerEncoderLayer`` because the explanation needs the
    summary token's attention over the modality tokens, which that layer does not expose.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D); present: (B, T) bool, False for padding keys -> (B, T, D), (B, H, T, T)."""
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )  # each (B, H, T, d_h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, T, T)
        attn = masked_softmax(scores, present[:, None, None, :].expand_as(scores))  # (B, H, T, T)
        h = (self.drop(attn) @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        x = x + self.drop(self.out(h))
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, attn


class FusionClassifier(nn.Module):
    """Per-modality projections, one fusion strategy (``cfg.strategy``), a classifier head.

    ``forward(features, mask)`` returns ``(logits (B, C), fused (B, F))``; ``forward_details``
    also returns the modality weights (and late fusion's per-modality logits).

    For ``concat`` (the first strategy, whose checkpoints predate the others):

        fused = [p_1 * m_1, ..., p_M * m_M, m]  -> (B, M * proj_dim + M)
        logits = head(fused)                    -> (B, C)

    A missing modality contributes exactly zero whatever its features hold, and the mask
    indicators let the head tell "missing" from "present but projected to zero".
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        if not isinstance(cfg, FusionConfig):
            raise ValueError(f"expected a FusionConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.modalities: tuple[str, ...] = cfg.modalities
        m_count, p, c = len(self.modalities), cfg.proj_dim, cfg.num_classes
        strategy = cfg.strategy
        dense = {m: d for m, d in cfg.input_dims.items() if m not in cfg.count_columns}
        self.norms = nn.ModuleDict({m: Standardize(d) for m, d in dense.items()})
        self.tfidf = nn.ModuleDict({m: TfIdf(cfg.input_dims[m]) for m in cfg.count_columns})
        if strategy == "stack":
            # a linear head per column on its standardised (or TF-IDF) inputs, then a linear
            # meta-model over their centred log-probabilities: (M * C) -> C
            self.column_heads = nn.ModuleDict(
                {m: nn.Linear(d, c) for m, d in cfg.input_dims.items()})
            self.meta = nn.Linear(m_count * c, c)
            self.fused_dim = m_count * c
            return
        self.projections = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, p), nn.LayerNorm(p), nn.GELU())
                for m, d in cfg.input_dims.items()
            }
        )
        if strategy == "concat":
            self.fused_dim = m_count * (p + 1)
        elif strategy == "weighted":
            self.modality_logits = nn.Parameter(torch.zeros(m_count))  # (M,)
            self.fused_dim = p + m_count
        elif strategy == "gated":
            # One gate per modality and dimension (a gated multimodal unit, Arevalo et al.
            # 2017): each dimension of the sum can come from a different modality.
            self.gate = nn.Linear(m_count * p + m_count, m_count * p)
            # Zero-initialised: training starts from the plain average of the present
            # modalities, and the gate learns to move away from it only where that helps.
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            self.fused_dim = p + m_count
        elif strategy == "attention":
            self.modality_tokens = nn.Parameter(0.02 * torch.randn(m_count, p))  # (M, P)
            self.summary_token = nn.Parameter(0.02 * torch.randn(p))  # (P,)
            self.blocks = nn.ModuleList(
                AttentionBlock(p, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers)
            )
            self.final_norm = nn.LayerNorm(p)
            self.fused_dim = p
        elif strategy == "hierarchical":
            self.pairs: tuple[tuple[int, int], ...] = tuple(
                (i, j) for i in range(m_count) for j in range(i + 1, m_count)
            )
            self.pair_nets = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * p, p), nn.LayerNorm(p), nn.GELU()) for _ in self.pairs
            )
            units = m_count + len(self.pairs)
            self.unit_tokens = nn.Parameter(torch.zeros(units, p))  # (U, P) which unit is which
            self.unit_score = nn.Sequential(nn.Linear(p, p), nn.Tanh(), nn.Linear(p, 1))
            self.fused_dim = p + m_count
        else:  # late
            self.modality_heads = nn.ModuleDict(
                {m: nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(p, c)) for m in self.modalities}
            )
            self.modality_logits = nn.Parameter(torch.zeros(m_count))  # (M,)
            self.fused_dim = p
        if strategy != "late":
            self.head = _mlp(self.fused_dim, cfg.hidden_dim, c, cfg.dropout)

    def set_standardization(self, modality: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the input statistics of ``modality``: (D_m,) each, std > 0."""
        if modality not in self.norms:
            raise ValueError(f"unknown modality {modality!r}: the model takes {self.modalities}")
        norm = self.norms[modality]
        assert isinstance(norm, Standardize)
        if mean.shape != norm.mean.shape or std.shape != norm.std.shape:
            raise ValueError(f"{modality}: statistics must have shape {tuple(norm.mean.shape)}")
        if not (std > 0).all():
            raise ValueError(f"{modality}: std must be positive")
        with torch.no_grad():
            norm.mean.copy_(mean)
            norm.std.copy_(std)

    def _project(
        self, features: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated inputs -> projections (B, M, P), exactly 0 where missing, and mask (B, M)."""
        if mask.ndim != 2 or mask.shape[1] != len(self.modalities):
            raise ValueError(
                f"mask must be (B, {len(self.modalities)}) for {self.modalities}, "
                f"got {tuple(mask.shape)}"
            )
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(f"features lack modalities {missing}")
        mask = mask.bool()
        parts = []
        for i, m in enumerate(self.modalities):
            x = self.inputs(m, features[m])  # (B, D_m)
            # where(), not a product: exactly zero even if missing features hold NaN or inf.
            parts.append(torch.where(mask[:, i : i + 1], self.projections[m](x), 0.0))  # (B, P)
        return torch.stack(parts, dim=1), mask  # (B, M, P), (B, M)

    def inputs(self, column: str, x: torch.Tensor) -> torch.Tensor:
        """A column's features as its head sees them: standardised, or TF-IDF for counts."""
        if column in self.tfidf:
            return self.tfidf[column](x.float())  # (B, D_m)
        return self.norms[column](x.float())  # (B, D_m)

    def column_log_probs(self, features: dict[str, torch.Tensor], mask: torch.Tensor
                         ) -> torch.Tensor:
        """``stack``: each column's head's log-probabilities, centred over the classes, exactly
        0 where the column is missing (a uniform vote): (B, M, C)."""
        mask = mask.bool()
        out = []
        for i, m in enumerate(self.modalities):
            present = mask[:, i : i + 1]  # (B, 1)
            x = torch.where(present, self.inputs(m, features[m]), 0.0)  # (B, D_m)
            lp = torch.log_softmax(self.column_heads[m](x), dim=-1).clamp_min(LOG_PROB_FLOOR)
            out.append(torch.where(present, lp - lp.mean(dim=-1, keepdim=True), 0.0))
        return torch.stack(out, dim=1)  # (B, M, C)

    def fuse(self, features: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """features[m]: (B, D_m); mask: (B, M) bool -> fused (B, F)."""
        return self.forward_details(features, mask).fused

    def forward(
        self, features: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_details(features, mask)
        return out.logits, out.fused  # (B, C), (B, F)

    def forward_details(self, features: dict[str, torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        """features[m]: (B, D_m) for every modality of the config; mask: (B, M) bool."""
        strategy = self.cfg.strategy
        if strategy == "stack":
            return self._stack(features, mask)
        proj, mask = self._project(features, mask)  # (B, M, P), (B, M)
        if strategy == "concat":
            fused = torch.cat([proj.flatten(1), mask.float()], dim=1)  # (B, M * P + M)
            return FusionOutput(self.head(fused), fused)
        if strategy == "weighted":
            weights = masked_softmax(self.modality_logits.expand(mask.shape), mask)  # (B, M)
            pooled = (weights[:, :, None] * proj).sum(dim=1)  # (B, P)
            fused = torch.cat([pooled, mask.float()], dim=1)  # (B, P + M)
            return FusionOutput(self.head(fused), fused, weights)
        if strategy == "gated":
            scores = self.gate(torch.cat([proj.flatten(1), mask.float()], dim=1))  # (B, M * P)
            gates = masked_softmax(
                scores.view(proj.shape).transpose(1, 2), mask[:, None, :].expand(-1, proj.shape[2], -1)
            ).transpose(1, 2)  # (B, M, P), summing to 1 over the present modalities
            pooled = (gates * proj).sum(dim=1)  # (B, P)
            fused = torch.cat([pooled, mask.float()], dim=1)  # (B, P + M)
            return FusionOutput(self.head(fused), fused, gates.mean(dim=2))  # weights (B, M)
        if strategy == "attention":
            return self._attention(proj, mask)
        if strategy == "hierarchical":
            return self._hierarchical(proj, mask)
        return self._late(proj, mask)

    def _attention(self, proj: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        b = proj.shape[0]
        tokens = torch.cat(
            [
                self.summary_token.expand(b, 1, -1),  # (B, 1, P)
                proj + self.modality_tokens,  # (B, M, P)
            ],
            dim=1,
        )  # (B, 1 + M, P)
        present = torch.cat([mask.new_ones(b, 1), mask], dim=1)  # (B, 1 + M)
        attn = tokens.new_zeros(b, 1, 1, 1)
        for block in self.blocks:
            tokens, attn = block(tokens, present)  # (B, 1 + M, P), (B, H, 1 + M, 1 + M)
        fused = self.final_norm(tokens[:, 0])  # (B, P)
        # The summary token's attention over the modality tokens in the last layer, averaged
        # over heads and renormalised without its attention to itself.
        to_modalities = attn[:, :, 0, 1:].mean(dim=1)  # (B, M)
        total = to_modalities.sum(dim=1, keepdim=True)  # (B, 1)
        weights = torch.where(total > 0, to_modalities / total.clamp_min(1e-12), 0.0)
        return FusionOutput(self.head(fused), fused, weights)

    def _hierarchical(self, proj: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        units = [proj[:, i] for i in range(proj.shape[1])]  # M x (B, P)
        present = [mask[:, i] for i in range(mask.shape[1])]  # M x (B,)
        for (i, j), net in zip(self.pairs, self.pair_nets, strict=True):
            both = mask[:, i] & mask[:, j]  # (B,)
            pair = net(torch.cat([proj[:, i], proj[:, j]], dim=1))  # (B, P)
            units.append(torch.where(both[:, None], pair, 0.0))
            present.append(both)
        stacked = torch.stack(units, dim=1)  # (B, U, P)
        unit_mask = torch.stack(present, dim=1)  # (B, U)
        scores = self.unit_score(stacked + self.unit_tokens).squeeze(-1)  # (B, U)
        unit_weights = masked_softmax(scores, unit_mask)  # (B, U)
        pooled = (unit_weights[:, :, None] * stacked).sum(dim=1)  # (B, P)
        fused = torch.cat([pooled, mask.float()], dim=1)  # (B, P + M)
        # A modality's weight: its own unit's plus half of each pair it is in.
        m_count = mask.shape[1]
        share = torch.zeros(len(units), m_count, device=proj.device)  # (U, M)
        share[torch.arange(m_count), torch.arange(m_count)] = 1.0
        for u, (i, j) in enumerate(self.pairs, start=m_count):
            share[u, i] = share[u, j] = 0.5
        weights = unit_weights @ share  # (B, M)
        return FusionOutput(self.head(fused), fused, weights)

    def _stack(self, features: dict[str, torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        if mask.ndim != 2 or mask.shape[1] != len(self.modalities):
            raise ValueError(f"mask must be (B, {len(self.modalities)}) for {self.modalities}, "
                             f"got {tuple(mask.shape)}")
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(f"features lack modalities {missing}")
        votes = self.column_log_probs(features, mask)  # (B, M, C)
        fused = votes.flatten(1)  # (B, M * C)
        logits = self.meta(fused)  # (B, C)
        # A column's weight: the size of what its vote adds to the logits, over the item's
        # present columns (rows sum to 1; an item with nothing present is all zeros).
        c = self.cfg.num_classes
        blocks = self.meta.weight.view(c, len(self.modalities), c).transpose(0, 1)  # (M, C, C)
        moved = torch.einsum("bmk,mck->bmc", votes, blocks).norm(dim=-1)  # (B, M)
        total = moved.sum(dim=1, keepdim=True)
        weights = torch.where(total > 0, moved / total.clamp_min(1e-12), 0.0)  # (B, M)
        return FusionOutput(logits, fused, weights)

    def _late(self, proj: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        unimodal = torch.stack(
            [self.modality_heads[m](proj[:, i]) for i, m in enumerate(self.modalities)], dim=1
        )  # (B, M, C)
        logits, weights = combine_late(
            torch.log_softmax(unimodal, dim=-1), mask, self.modality_logits
        )  # (B, C), (B, M)
        fused = (weights[:, :, None] * proj).sum(dim=1)  # (B, P)
        return FusionOutput(logits, fused, weights, unimodal)


def combine_late(
    log_probs: torch.Tensor, mask: torch.Tensor, modality_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Late fusion's combination of per-modality predictions: ``Σ_i w_i log p_i(c)`` with
    ``w = softmax(modality_logits)`` over the present modalities.

    log_probs: (B, M, C); mask: (B, M) bool; modality_logits: (M,) -> logits (B, C) and
    weights (B, M). A weighted product of the per-modality distributions (log-linear pooling);
    missing modalities have weight exactly 0, and their log-probabilities must be finite. The
    forward pass and stacking (models.training) both combine through here, so weights fit on
    out-of-fold predictions mean at inference what they meant when they were fit.
    """
    weights = masked_softmax(modality_logits.expand(mask.shape), mask)  # (B, M)
    return (weights[:, :, None] * log_probs).sum(dim=1), weights  # (B, C), (B, M)
