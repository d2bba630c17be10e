"""Light encoders trained from random weights on the raw input, for data far from what the
pretrained encoders saw: a small CNN for low-resolution images, a byte-level CNN over UTF-8
(any language, any script: no vocabulary), and a log-mel CNN for audio.

Build, preprocessing and weights are versioned together: :class:`ScratchConfig` fixes the
architecture and the preprocessing, the weights are stored as safetensors next to the fusion
(never pickled), and :class:`ScratchFeatureEncoder` serves a trained one to the worker with the
same ``preprocess``/``encode`` interface as the frozen encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image
from safetensors.torch import save as save_tensors
from torch import nn

from models.audio import HOP, LOG_EPS, N_FFT, SAMPLE_RATE
from models.checkpoint import load_weights, state_tensors
from models.spec import EncoderSpec

ARCHS = {"image": "scratch_image_cnn", "text": "scratch_byte_cnn", "audio": "scratch_logmel_cnn"}
PAD_BYTE = 0  # byte b is token b + 1; 0 pads
LOGMEL_CENTER = -6.0  # as models.audio: log-mel values to order one
LOGMEL_SCALE = 4.0


@dataclass(frozen=True)
class ScratchConfig:
    """Architecture and preprocessing of one scratch encoder."""

    modality: str
    dim: int = 64  # output features
    width: int = 32  # channels of the first layer; later layers double it
    image_size: int = 32  # images: resized to image_size x image_size
    image_channels: int = 1  # images: 1 grayscale, 3 RGB
    max_bytes: int = 64  # text: UTF-8 bytes kept (the start of the text)
    max_frames: int = 300  # audio: log-mel frames kept (10 ms each)
    n_mels: int = 64

    def __post_init__(self) -> None:
        if self.modality not in ARCHS:
            raise ValueError(f"modality must be one of {tuple(ARCHS)}, got {self.modality!r}")
        for name in ("dim", "width", "max_bytes", "max_frames", "n_mels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size not in (16, 32, 64):
            raise ValueError(f"image_size must be 16, 32 or 64, got {self.image_size!r}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {self.image_channels!r}")

    @property
    def arch(self) -> str:
        return ARCHS[self.modality]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScratchConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _conv2d(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU())


class _Conv2dEncoder(nn.Module):
    """A 2-D convolutional body ending in 4w channels, then mean and max over the plane, a
    linear head to ``dim`` and a LayerNorm."""

    def __init__(self, cfg: ScratchConfig, body: nn.Sequential) -> None:
        super().__init__()
        self.cfg = cfg
        self.body = body
        self.head = nn.Linear(8 * cfg.width, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, 4w, H', W')
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 8w)
        return self.norm(self.head(pooled))  # (B, dim)


class ImageCNN(_Conv2dEncoder):
    """(B, C, S, S) pixels in [0, 1] -> (B, dim). Each image is standardised on its own first,
    so brightness, contrast and inverted polarity between sources matter less."""

    def __init__(self, cfg: ScratchConfig) -> None:
        w = cfg.width
        super().__init__(cfg, nn.Sequential(
            _conv2d(cfg.image_channels, w), _conv2d(w, w), nn.MaxPool2d(2),
            _conv2d(w, 2 * w), nn.MaxPool2d(2),
            _conv2d(2 * w, 4 * w),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.cfg.image_channels:
            raise ValueError(f"expected (B, {self.cfg.image_channels}, H, W), got {tuple(x.shape)}")
        x = x.float()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        return self.pooled((x - mean) / std)  # (B, dim); the body's plane S/4 x S/4


class ByteCNN(nn.Module):
    """(B, L) byte tokens (byte + 1, 0 = padding) -> (B, dim): byte embeddings, convolutions of
    widths 3, 5 and 7 (a character in any script is 1-4 bytes), max over the real positions."""

    def __init__(self, cfg: ScratchConfig) -> None:
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.embed = nn.Embedding(257, w, padding_idx=PAD_BYTE)
        self.convs = nn.ModuleList(nn.Conv1d(w, 2 * w, k, padding=k // 2) for k in (3, 5, 7))
        self.mix = nn.Conv1d(6 * w, 4 * w, 3, padding=1)
        self.head = nn.Linear(4 * w, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"expected (B, L) byte tokens, got {tuple(tokens.shape)}")
        tokens = tokens.long()
        real = (tokens != PAD_BYTE)[:, None, :]  # (B, 1, L)
        x = self.embed(tokens).transpose(1, 2)  # (B, w, L)
        x = torch.cat([F.relu(conv(x)) for conv in self.convs], dim=1)  # (B, 6w, L)
        x = F.relu(self.mix(x))  # (B, 4w, L)
        # An empty text (all padding) pools to zeros, not -inf.
        pooled = x.masked_fill(~real, float("-inf")).amax(dim=2)  # (B, 4w)
        pooled = torch.where(real.any(dim=2), pooled, torch.zeros_like(pooled))
        return self.norm(self.head(pooled))  # (B, dim)


class LogmelCNN(_Conv2dEncoder):
    """(B, n_mels, T) log-mel -> (B, dim): the log-mel CNN, trained from random weights."""

    def __init__(self, cfg: ScratchConfig) -> None:
        w = cfg.width
        super().__init__(cfg, nn.Sequential(
            _conv2d(1, w // 2), nn.MaxPool2d(2),
            _conv2d(w // 2, w), nn.MaxPool2d(2),
            _conv2d(w, 2 * w), nn.MaxPool2d(2),
            _conv2d(2 * w, 4 * w),
        ))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        if logmel.ndim != 3 or logmel.shape[1] != self.cfg.n_mels:
            raise ValueError(f"expected (B, {self.cfg.n_mels}, T), got {tuple(logmel.shape)}")
        x = ((logmel.float() - LOGMEL_CENTER) / LOGMEL_SCALE)[:, None]  # (B, 1, F, T)
        return self.pooled(x)  # (B, dim); the body's plane F/8 x T/8


def build_scratch(cfg: ScratchConfig) -> nn.Module:
    """The encoder for ``cfg.modality``, randomly initialised (seed the RNG before)."""
    return {"image": ImageCNN, "text": ByteCNN, "audio": LogmelCNN}[cfg.modality](cfg)


def preprocess(cfg: ScratchConfig, raw: Any) -> torch.Tensor:
    """One decoded item (a PIL image, a str, a 16 kHz float waveform) -> the encoder's input:
    (C, S, S) float in [0, 1], (max_bytes,) int64 byte tokens, or (n_mels, max_frames) log-mel."""
    if cfg.modality == "image":
        if not isinstance(raw, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(raw).__name__}")
        img = raw.convert("L" if cfg.image_channels == 1 else "RGB")
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))
    if cfg.modality == "text":
        if not isinstance(raw, str):
            raise TypeError(f"expected str, got {type(raw).__name__}")
        data = " ".join(raw.split()).encode("utf-8")[: cfg.max_bytes]
        tokens = torch.zeros(cfg.max_bytes, dtype=torch.long)
        if data:
            tokens[: len(data)] = torch.tensor(list(data), dtype=torch.long) + 1
        return tokens
    return _logmel(cfg, raw)


def _logmel(cfg: ScratchConfig, wave: Any) -> torch.Tensor:
    if not isinstance(wave, np.ndarray) or wave.ndim != 1 or wave.size == 0:
        raise ValueError("expected a non-empty 1-D waveform")
    samples = torch.from_numpy(np.ascontiguousarray(
        wave[: cfg.max_frames * HOP], dtype=np.float32))
    if not torch.isfinite(samples).all():
        raise ValueError("audio contains NaN or infinite samples")
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=N_FFT,
                                               hop_length=HOP, n_mels=cfg.n_mels)
    with torch.no_grad():
        logmel = torch.log(mel(samples) + LOG_EPS)[:, : cfg.max_frames]  # (F, T)
    # Pad with silence to a fixed length: batches stack without masks.
    out = torch.full((cfg.n_mels, cfg.max_frames), float(np.log(LOG_EPS)))
    out[:, : logmel.shape[1]] = logmel
    return out


def save_encoder(module: nn.Module) -> bytes:
    """The encoder's weights (and BatchNorm statistics) as safetensors bytes."""
    return save_tensors(state_tensors(module), metadata={"format": "mmbatch.scratch"})


def load_encoder(cfg: ScratchConfig, data: bytes) -> nn.Module:
    """Rebuild an encoder saved by :func:`save_encoder` (CPU, eval mode); every tensor must
    match the architecture ``cfg`` describes."""
    return load_weights(build_scratch(cfg), data, "scratch encoder")


def encoder_version(cfg: ScratchConfig, weights_blob: str) -> str:
    """The feature-cache key of a trained scratch encoder: its architecture and the hash of its
    weights, so features from two trainings never mix."""
    return f"{cfg.arch}-{weights_blob[:16]}"


class ScratchFeatureEncoder:
    """A trained scratch encoder behind the frozen encoders' interface (models.registry)."""

    def __init__(self, cfg: ScratchConfig, module: nn.Module, version: str,
                 device: torch.device | str = "cpu", max_batch: int = 64) -> None:
        self.cfg = cfg
        self.spec = EncoderSpec(cfg.modality, cfg.arch, version, cfg.dim)
        self.device = torch.device(device)
        self.module = module.eval().requires_grad_(False).to(self.device)
        self.max_batch = max_batch

    def preprocess(self, raw: Any) -> torch.Tensor:
        return preprocess(self.cfg, raw)

    def encode(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(items) == 0:
            return torch.zeros(0, self.cfg.dim)
        out = []
        with torch.inference_mode():
            for start in range(0, len(items), self.max_batch):
                batch = torch.stack(list(items[start : start + self.max_batch]))
                out.append(self.module(batch.to(self.device)).float().cpu())
        return torch.cat(out).clone()  # (B, dim)
