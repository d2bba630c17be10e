"""The encoders: one place to find each modality's spec and build its encoder.

Each encoder module owns its spec, its builder, its weights and its preprocessing, versioned
together (``models.image``, ``models.text``, ``models.audio``); this registry maps a modality to
them.
"""

from __future__ import annotations

from typing import Any

import torch

from mmbatch.contract import MODALITIES
from models import audio, image, text, video
from models.spec import Encoder, EncoderSpec

ENCODERS: dict[str, Any] = {"image": image.ImageEncoder, "text": text.TextEncoder,
                            "audio": audio.AudioEncoder}
# ``video`` has a spec and no encoder: its features are the image encoder's over sampled
# frames, pooled (models.video).
SPECS: dict[str, EncoderSpec] = {"image": image.SPEC, "text": text.SPEC, "audio": audio.SPEC,
                                 "video": video.SPEC}


def build_encoder(modality: str, device: torch.device | str = "cpu", **options: Any) -> Encoder:
    """Build the frozen encoder for ``modality`` (eval mode, no gradients), weights loaded from
    local packages. Slow: build each encoder once per process. ``options`` go to the encoder's
    constructor (``max_batch``, ``precision``, ``finetuned`` and ``version``)."""
    if modality == "video":
        raise ValueError("video has no encoder of its own: its frames go through the image "
                         "encoder (models.video)")
    if modality not in ENCODERS:
        raise ValueError(f"unknown modality {modality!r}: expected one of {MODALITIES}")
    encoder: Encoder = ENCODERS[modality](device=torch.device(device), **options)
    return encoder
