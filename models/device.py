"""Choosing the torch device a worker runs its models on."""

from __future__ import annotations

import re

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
