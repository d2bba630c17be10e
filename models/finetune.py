"""``finetune`` encoder mode: the last blocks of the pretrained encoders trained with the fusion.

Each pretrained encoder owns its cut (``bottom`` on the encoder, a ``pretrained_top`` and a
``*Top`` module in its own module). The bottom stays frozen and runs once per item before
training; its output (the activation below the cut) is cached in memory as the training input,
so an epoch costs only the top. The top starts from the pretrained weights and trains with the
fusion at a small learning rate (``LR_FACTOR`` times the fusion's):

- image: EfficientNet-Lite0's last stage (one inverted-residual block, 192 -> 320 channels),
  its 1x1 head convolution (320 -> 1280) and BatchNorm; the cached activation is the output of
  stage 6, (192, 7, 7) an image. About 50 M multiply-adds an image forward, against 400 M for
  the whole network.
- text: MiniLM's last transformer layer, then the same mean pooling and L2 norm as the frozen
  encoder; the cached activation is the hidden state entering that layer, (L, 384) a text.
- audio: the log-mel CNN has no pretrained weights (models.audio: seeded and frozen), so all
  of it trains, with SpecAugment-style masking of its input (a band of mel channels and a span
  of frames, per item); the band statistics beside it stay as they are, computed on the clean
  log-mel. The cached input is the log-mel of the first 10 s, which is also all a finetuned
  audio encoder reads of a clip at inference.

Inputs of variable length are packed with their validity mask as one more channel, so every
modality's training input is one tensor that can be indexed by item: text (N, L, 384 + 1), audio
(N, 64 + 1, T), the last channel 1 where a token or frame is real.

Only the top's weights are stored (safetensors); at inference the worker builds the pretrained
encoder, loads the top's weights over it (``finetuned=`` of the encoders) and serves it under a
version that names those weights (:func:`finetune_version`), so its features are cached apart
from the frozen encoder's and from any other training's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors.torch import save as save_tensors
from torch import nn

from models import audio, image, text
from models.checkpoint import state_tensors
from models.spec import EncoderTop

FINETUNABLE = ("image", "text", "audio")
LR_FACTOR = 0.1  # the top's learning rate, relative to the fusion's
FORMAT = "mmbatch.finetune"
_TOPS: dict[str, Callable[[], EncoderTop]] = {"image": image.pretrained_top,
                                              "text": text.pretrained_top,
                                              "audio": audio.pretrained_top}


def pretrained_top(modality: str) -> EncoderTop:
    """A fresh top of ``modality``'s encoder with the pretrained weights, ready to train."""
    if modality not in _TOPS:
        raise ValueError(f"modality must be one of {FINETUNABLE}, got {modality!r}")
    return _TOPS[modality]()


def bottom_inputs(modality: str, encoder: Any, items: Sequence[Any], batch_size: int = 32,
                  on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """The cached training input of every item: what the frozen bottom of ``encoder`` (the
    worker's frozen encoder of ``modality``) makes of its preprocessed ``items``. Image:
    (N, 192, 7, 7); text: packed (N, L, 385), L the longest text; audio: packed (N, 65, T).
    ``on_batch(items done)`` after every batch (the training heartbeat)."""
    if modality not in FINETUNABLE:
        raise ValueError(f"modality must be one of {FINETUNABLE}, got {modality!r}")
    if len(items) == 0:
        raise ValueError("no items")
    result: torch.Tensor = encoder.bottom(items, batch_size=batch_size, on_batch=on_batch)
    return result


def save_top(module: nn.Module) -> bytes:
    """A top's weights (and BatchNorm statistics) as safetensors bytes."""
    return save_tensors(state_tensors(module), metadata={"format": FORMAT})


def finetune_version(base_version: str, weights_blob: str) -> str:
    """The feature-cache key of a finetuned encoder: the pretrained one's version and the hash
    of the top's weights, so features from two trainings never mix."""
    return f"{base_version}-ft-{weights_blob[:16]}"
