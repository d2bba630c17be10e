"""Fusion of per-modality features into one embedding, and the classifier head on top."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from models.registry import MODALITIES

STRATEGIES: tuple[str, ...] = ("concat",)


@dataclass(frozen=True)
class FusionConfig:
    """Shape and hyper-parameters of a :class:`FusionClassifier`.

    ``input_dims`` maps each modality the model takes to its feature size; it is stored in
    ``MODALITIES`` order, whatever order it was given in, because that order is the column order
    of the mask.
    """

    input_dims: dict[str, int]
    num_classes: int
    strategy: str = "concat"
    proj_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.input_dims, dict) or not self.input_dims:
            raise ValueError("input_dims must be a non-empty dict of modality -> feature dim")
        unknown = sorted(set(self.input_dims) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}: expected a subset of {MODALITIES}")
        for name, dim in self.input_dims.items():
            if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
                raise ValueError(f"input_dims[{name!r}] must be a positive int, got {dim!r}")
        # A private copy in canonical order: the caller's dict may change later.
        ordered = {m: self.input_dims[m] for m in MODALITIES if m in self.input_dims}
        object.__setattr__(self, "input_dims", ordered)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: expected one of {STRATEGIES}")
        for name in ("proj_dim", "hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusionConfig:
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
        return cls(**{**d, "input_dims": dict(input_dims)})


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


class FusionClassifier(nn.Module):
    """Concat fusion: project each modality, zero the missing ones, concatenate with the mask.

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
        self.norms = nn.ModuleDict({m: Standardize(d) for m, d in cfg.input_dims.items()})
        self.projections = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, cfg.proj_dim), nn.LayerNorm(cfg.proj_dim), nn.GELU())
                for m, d in cfg.input_dims.items()
            }
        )
        self.fused_dim = len(self.modalities) * (cfg.proj_dim + 1)
        self.head = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(self.fused_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, cfg.num_classes),
        )

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

    def fuse(self, features: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """features[m]: (B, D_m); mask: (B, M) bool -> fused (B, M * proj_dim + M)."""
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
            x = self.norms[m](features[m].float())  # (B, D_m)
            # where(), not a product: exactly zero even if missing features hold NaN or inf.
            parts.append(torch.where(mask[:, i : i + 1], self.projections[m](x), 0.0))  # (B, P)
        parts.append(mask.float())
        return torch.cat(parts, dim=1)  # (B, M * P + M)

    def forward(
        self, features: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.fuse(features, mask)  # (B, F)
        return self.head(fused), fused  # (B, C), (B, F)
