"""The inputs that encoder modes other than frozen train on, decoded again from a train job's
stored media: the raw inputs of the scratch encoders (models.scratch) and the activations below
the pretrained encoders' finetunable tops (models.finetune). The worker decodes; which modes to
train and how is ``models.adapt``'s business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from media.decode import MediaError
from models.adapt import scratch_config
from models.finetune import bottom_inputs
from models.scratch import preprocess
from store.jobs import ItemRow
from worker.model_cache import ModelCache
from worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class RawInputs:
    """Per modality an (N, ...) tensor over every row (zeros where the item lacks it or it no
    longer decodes), and per modality which rows have it."""

    scratch: dict[str, torch.Tensor] = field(default_factory=dict)
    scratch_present: dict[str, list[bool]] = field(default_factory=dict)
    finetune: dict[str, torch.Tensor] = field(default_factory=dict)
    finetune_present: dict[str, list[bool]] = field(default_factory=dict)


def decode_inputs(rt: Runtime, models: ModelCache, rows: list[ItemRow], scratch: list[str],
                  finetune: list[str], on_progress: Callable[[int], None] | None = None
                  ) -> RawInputs:
    """Training inputs of every row: for ``scratch`` the scratch encoders', for ``finetune``
    the activations below the pretrained encoders' tops, each medium decoded once. The media
    were decoded once already (extraction), so a failure here is rare; such an item counts as
    missing that modality. ``on_progress(rows done)`` is called every 64 rows (the training
    heartbeat: decoding a large archive again takes a while)."""
    out = RawInputs()
    for m in dict.fromkeys([*scratch, *finetune]):
        decode = models.decoder(m)
        config = scratch_config(m) if m in scratch else None
        encoder = models.encoder(m) if m in finetune else None
        scratch_x: list[Any] = []
        tuned_x: list[Any] = []  # preprocessed for the pretrained encoder, None where missing
        pending: list[int] = []  # image rows preprocessed but not yet through the bottom
        for i, r in enumerate(rows):
            if on_progress is not None and i % 64 == 63:
                on_progress(i + 1)
            ref = r.media.get(m)
            x = t = None
            if ref is not None:
                try:
                    raw = decode(rt.blobs.read(ref.blob), ref.name)
                    if config is not None:
                        x = preprocess(config, raw)
                    if encoder is not None:
                        t = (encoder.training_input(raw) if m == "audio"  # type: ignore[attr-defined]
                             else encoder.preprocess(raw))
                except (MediaError, ValueError, TypeError, OSError) as exc:  # the item loses m
                    log.warning("adaptation_decode_failed blob=%s error=%s", ref.blob, exc)
                    x = t = None
            scratch_x.append(x)
            tuned_x.append(t)
            if m == "image" and t is not None:
                # A preprocessed image is 600 KB, its activation 37 KB: through the bottom in
                # chunks, so that an archive's worth of 224 x 224 inputs never sits in memory.
                pending.append(i)
                if len(pending) == models.batch_sizes[m]:
                    _bottom_in_place(m, encoder, tuned_x, pending)
        if config is not None and any(x is not None for x in scratch_x):
            blank = torch.zeros_like(next(x for x in scratch_x if x is not None))
            out.scratch[m] = torch.stack([x if x is not None else blank for x in scratch_x])
            out.scratch_present[m] = [x is not None for x in scratch_x]
        if encoder is not None and any(t is not None for t in tuned_x):
            have = [i for i, t in enumerate(tuned_x) if t is not None]
            if m == "image":
                _bottom_in_place(m, encoder, tuned_x, pending)
                acts = torch.stack([tuned_x[i] for i in have])  # (n, 192, 7, 7)
            else:
                acts = bottom_inputs(m, encoder, [tuned_x[i] for i in have],
                                     batch_size=models.batch_sizes[m], on_batch=on_progress)
            full = torch.zeros(len(rows), *acts.shape[1:])
            full[torch.tensor(have)] = acts
            out.finetune[m] = full
            out.finetune_present[m] = [t is not None for t in tuned_x]
    return out


def _bottom_in_place(modality: str, encoder: Any, items: list[Any], rows: list[int]) -> None:
    """Replace ``items[i]`` for ``i`` in ``rows`` by its bottom activation; empties ``rows``."""
    if rows:
        acts = bottom_inputs(modality, encoder, [items[i] for i in rows], batch_size=len(rows))
        for i, a in zip(rows, acts, strict=True):
            items[i] = a.clone()  # its own storage: the batch's is freed
        rows.clear()
