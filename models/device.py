"""Choosing the torch device a worker runs its models on, and how models run on it."""

from __future__ import annotations

import contextlib
import itertools
import re
from typing import Any

import torch

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve a device name.

    ``"auto"`` picks the first CUDA device when one is available, else the CPU. ``"cpu"``,
    ``"cuda"`` and ``"cuda:N"`` are taken literally; asking for CUDA on a machine without it, or
    for an index that does not exist, is an error rather than a silent fall back to the CPU.
    """
    if not isinstance(requested, str):
        raise ValueError(f"device must be a string, got {type(requested).__name__}")
    name = requested.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(name)
    if match is None:
        raise ValueError(
            f"unknown device {requested!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    index = int(match.group(1)) if match.group(1) is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {requested!r} requested but only {count} CUDA device(s) exist")
    return torch.device("cuda", index)


# --- running models on the device: precision and host-to-device copies -------------------------

PRECISIONS = ("auto", "fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls and convolutions run natively (not emulated) on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        # oneDNN's bf16 kernels need AVX512-BF16 or AMX; elsewhere bf16 is slower than fp32.
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(requested: str, device: torch.device, preferred: str = "bf16") -> str:
    """``"fp32"`` or ``"bf16"`` for an encoder on ``device``.

    ``"auto"`` gives the encoder's ``preferred`` precision (the one its accuracy was checked in,
    see bench/precision.py) when the device runs it natively, else fp32. An explicit ``"bf16"``
    on a device without native bf16 is an error rather than a silent slowdown.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if preferred not in ("fp32", "bf16"):
        raise ValueError(f"preferred precision must be fp32 or bf16, got {preferred!r}")
    if requested == "fp32" or (requested == "auto" and preferred == "fp32"):
        return "fp32"
    if bf16_supported(device):
        return "bf16"
    if requested == "bf16":
        raise ValueError(f"precision 'bf16' requested but {device} has no native bf16 support")
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for inference: bf16 autocast where asked, else nothing.

    Autocast keeps reductions, norms and softmax in fp32 and runs matmuls and convolutions in
    bf16; the weights stay fp32, so a model can be switched back without reloading.
    """
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU batch to ``device``; for CUDA through pinned memory, without blocking.

    The copy is queued on the current stream ahead of the kernels that read it, so no explicit
    synchronisation is needed; the pinned staging buffer is kept alive by torch's caching host
    allocator until the copy has run. On the CPU the tensor is returned as it is.
    """
    if device.type != "cuda":
        return tensor
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
    return pinned.to(device, non_blocking=True)


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold each BatchNorm that directly follows a convolution into that convolution, for
    inference; returns how many were folded.

    ``conv -> bn`` becomes one convolution with scaled weights and a bias, so the normalisation
    costs no pass over the activations (under bf16 autocast it also ran in fp32, with casts each
    way). "Follows" means registered right after it in the same parent, which is how timm's
    EfficientNet blocks and the audio CNN are built; a timm ``BatchNormAct2d`` leaves behind what
    it applied after normalising (dropout, activation). The model must be in eval mode, and
    must not be trained or saved afterwards.
    """
    if model.training:
        raise ValueError("fold_batchnorm is for inference: call model.eval() first")
    folded = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            children = list(parent.named_children())
            for (_, conv), (bn_name, bn) in itertools.pairwise(children):
                if not (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
                        and bn.track_running_stats and bn.running_var is not None
                        and bn.running_mean is not None and conv.out_channels == bn.num_features):
                    continue
                scale = torch.rsqrt(bn.running_var + bn.eps)  # (C,)
                if bn.affine:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)  # (C,)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
                conv.weight = torch.nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1),
                                                 requires_grad=False)
                conv.bias = torch.nn.Parameter(bias * scale + shift, requires_grad=False)
                after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                         if m is not None]
                setattr(parent, bn_name, torch.nn.Sequential(*after) if after
                        else torch.nn.Identity())
                folded += 1
    return folded
