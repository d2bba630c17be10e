"""Choosing the torch device a worker runs its models on, and how models run on it."""

from __future__ import annotations

import contextlib
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
