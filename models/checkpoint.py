"""Checkpoint format of a fusion classifier: safetensors weights plus a JSON-able config.

Weights never go through pickle: ``safetensors`` stores raw tensors only, so loading a
checkpoint cannot run code.
"""

from __future__ import annotations

from typing import Any, TypeVar

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from models.fusion import FusionClassifier, FusionConfig

M = TypeVar("M", bound=nn.Module)

FORMAT = "mmbatch.fusion"
FORMAT_VERSION = 1


def save_checkpoint(model: FusionClassifier) -> tuple[bytes, dict[str, Any]]:
    """The model's weights as safetensors bytes, and the config needed to rebuild it."""
    if not isinstance(model, FusionClassifier):
        raise ValueError(f"expected a FusionClassifier, got {type(model).__name__}")
    tensors = state_tensors(model)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "fusion": model.cfg.to_dict()}
    return save_tensors(
        tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    ), config


def load_checkpoint(data: bytes, config: dict[str, Any]) -> FusionClassifier:
    """Rebuild a model saved by :func:`save_checkpoint` (CPU, eval mode).

    Every tensor must match the architecture the config describes: nothing is ignored.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} checkpoint config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"unsupported checkpoint format_version {version!r}; this code reads {FORMAT_VERSION}"
        )
    if "fusion" not in config:
        raise ValueError("checkpoint config has no 'fusion' section")
    model = FusionClassifier(FusionConfig.from_dict(config["fusion"]))
    return load_weights(model, data, "checkpoint")


def state_tensors(module: nn.Module) -> dict[str, Any]:
    """A module's state as contiguous CPU tensors, ready for ``safetensors``."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def load_weights(module: M, data: bytes, what: str) -> M:
    """Load safetensors ``data`` into ``module`` strictly (every tensor must match, nothing is
    ignored) and put it in eval mode; ``what`` names the weights in the ValueError raised for
    bytes that are not safetensors or tensors that do not fit."""
    try:
        tensors = load_tensors(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise ValueError(f"unreadable {what} weights: {exc}") from exc
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{what} weights do not match its config: {exc}") from exc
    return module.eval()
