"""What names an encoder: its modality, architecture, version and output size, and the interface
every encoder (pretrained, finetuned or trained from scratch) serves the worker with.

A spec's ``version`` names the weights *and* the preprocessing: bump it whenever either changes
(the image resize, the text token limit, the audio seed...), so cached features keyed by it are
never mixed across incompatible encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, Self, runtime_checkable

import torch
from torch import nn

from mmbatch.contract import MODALITIES
from models.checkpoint import load_weights
from models.device import resolve_precision


@dataclass(frozen=True)
class EncoderSpec:
    """Identity and output size of an encoder."""

    modality: str  # one of MODALITIES
    name: str  # e.g. "efficientnet_lite0"
    version: str  # bump when weights or preprocessing change
    dim: int  # feature size

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if not self.name or not self.version:
            raise ValueError("name and version must be non-empty")
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")

    def renamed(self, version: str | None) -> EncoderSpec:
        """This encoder under another version: a finetuned one serves under the version that
        names its own weights."""
        if not version:
            raise ValueError("a finetuned encoder needs the version that names its weights")
        return replace(self, version=version)


@runtime_checkable
class Encoder(Protocol):
    """A frozen feature extractor for one modality.

    ``preprocess`` is pure CPU work, safe to call from many threads at once. ``encode`` takes a
    list of preprocessed items and returns float32 features (B, spec.dim) on the CPU, in input
    order, batching and padding internally.
    """

    spec: EncoderSpec

    def preprocess(self, raw: Any) -> Any: ...

    def encode(self, items: Sequence[Any]) -> torch.Tensor: ...


class PretrainedEncoder:
    """What the pretrained encoders set up alike: the device, the most items one forward pass
    takes, the precision they run in, and, for a finetuned one, its own top's weights over the
    pretrained network and the version that names them."""

    spec: EncoderSpec

    def __init__(self, device: torch.device | str, max_batch: int, precision: str,
                 preferred: str) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.precision = resolve_precision(precision, self.device, preferred)

    def load_top(self, top: nn.Module, weights: bytes, version: str | None) -> None:
        """Load a train job's top (models.finetune) into the network it shares modules with;
        the encoder serves under ``version`` from now on."""
        load_weights(top, weights, f"finetuned {self.spec.modality} encoder")
        self.spec = self.spec.renamed(version)


class EncoderTop(nn.Module):
    """The trainable top of a pretrained encoder (its cut for finetuning, models.finetune): the
    encoder's own last blocks, shared with its network. Its BatchNorm layers keep their
    pretrained statistics when the top trains: batches are small and the statistics were
    estimated on far more data."""

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def trainable(self) -> Self:
        """This top with gradients on, in eval mode until a training loop says otherwise."""
        self.requires_grad_(True)
        return self.eval()
