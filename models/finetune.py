"""``finetune`` encoder mode: the last blocks of the pretrained encoders trained with the fusion.

Each pretrained encoder is cut in two. The bottom stays frozen and runs once per item before
training; its output (the activation below the cut) is cached in memory as the training input,
so an epoch costs only the top. The top starts from the pretrained weights and trains with the
fusion at a small learning rate (``LR_FACTOR`` times the fusion's):

- image: EfficientNet-Lite0's last stage (one inverted-residual block, 192 -> 320 channels),
  its 1x1 head convolution (320 -> 1280) and BatchNorm; the cached activation is the output of
  stage 6, (192, 7, 7) an image. About 50 M multiply-adds an image forward, against 400 M for
  the whole network.
- text: MiniLM's last transformer layer, then the same mean pooling and L2 norm as the frozen
  encoder; the cached activation is the hidden state entering that layer, (L, 384) a text.
- audio: the log-mel CNN has no pretrained weights (models.audio: seeded and frozen), so all
  of it trains, with SpecAugment-style masking of its input (a band of mel channels and a span
  of frames, per item); the band statistics beside it stay as they are, computed on the clean
  log-mel. The cached input is the log-mel of the first 10 s, which is also all a finetuned
  audio encoder reads of a clip at inference.

BatchNorm layers of a top keep their pretrained statistics (eval mode while training): batches
are small and the statistics were estimated on far more data.

Inputs of variable length are packed with their validity mask as one more channel, so every
modality's training input is one tensor that can be indexed by item: text (N, L, 384 + 1), audio
(N, 64 + 1, T), the last channel 1 where a token or frame is real.

Only the top's weights are stored (safetensors); at inference the worker builds the pretrained
encoder, loads the top's weights over it (``finetuned=`` of models.image/text/audio) and serves
it under a version that names those weights (:func:`finetune_version`), so its features are
cached apart from the frozen encoder's and from any other training's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_tensors
from torch import nn

from models.checkpoint import load_weights, state_tensors
from models.registry import EncoderSpec

FINETUNABLE = ("image", "text", "audio")
LR_FACTOR = 0.1  # the top's learning rate, relative to the fusion's
IMAGE_CUT = 6  # EfficientNet-Lite0 stages from this one on train (of 7)
# A finetuned audio encoder sees the first 10 s of a clip, in training and at inference alike
# (models.audio keeps the same frames when built with finetuned=).
AUDIO_MAX_FRAMES = 1000
SPEC_AUGMENT = {"bands": 8, "frames": 40}  # widest mask of each kind, drawn uniformly
FORMAT = "mmbatch.finetune"


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Top(nn.Module):
    """A top whose BatchNorm layers stay in eval mode when the module trains."""

    def train(self, mode: bool = True) -> _Top:
        super().train(mode)
        _freeze_batchnorm(self)
        return self


class ImageTop(_Top):
    """EfficientNet-Lite0 from stage IMAGE_CUT on: (B, 192, 7, 7) -> (B, 1280) pooled features.
    Shares its modules with ``model`` (a timm EfficientNet): loading weights into the top
    changes the network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.blocks = model.blocks[IMAGE_CUT:]  # type: ignore[index]
        self.conv_head = model.conv_head
        self.bn2 = model.bn2
        self.global_pool = model.global_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x.float())))  # (B, 1280, 7, 7)
        return self.global_pool(x).flatten(1)  # (B, 1280)


class TextTop(_Top):
    """MiniLM's last layer, mean pooling and L2 norm: packed (B, L, 385) -> (B, 384)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layer = model.encoder.layer[-1]  # type: ignore[union-attr, index]
        self.config = model.config

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        from models.text import mean_pool

        # Texts are padded to the longest of the archive: run on this batch's longest only.
        longest = max(int(packed[..., -1].sum(dim=1).max().item()), 1) if len(packed) else 1
        packed = packed[:, :longest]
        hidden, mask = packed[..., :-1].float(), packed[..., -1].long()  # (B, L, 384), (B, L)
        attention = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                              attention_mask=mask)
        out = self.layer(hidden, attention)  # (B, L, 384)
        return F.normalize(mean_pool(out, mask), p=2, dim=1)  # (B, 384)


class AudioTop(_Top):
    """The whole log-mel CNN, plus the fixed band statistics: packed (B, 65, T) -> (B, 256),
    the frozen audio encoder's layout."""

    def __init__(self, cnn: nn.Module) -> None:
        super().__init__()
        self.cnn = cnn
        # While training: SpecAugment of the CNN's input, drawn from this generator (the
        # training loop's, so runs stay seeded). The band statistics always see the clean
        # log-mel: a masked band would have no spread, which inference never shows.
        self.augment: torch.Generator | None = None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        from models.audio import MIN_FRAMES, masked_band_stats

        valid = packed[:, -1]  # (B, T)
        longest = int(valid.sum(dim=1).max().item()) if len(packed) else 0
        width = max(longest, MIN_FRAMES)  # a batch of short clips runs on its own length
        packed = packed[..., :width] if packed.shape[-1] >= width else F.pad(
            packed, (0, width - packed.shape[-1]))
        logmel = packed[:, :-1].float()  # (B, 64, T)
        lengths = packed[:, -1].sum(dim=1).long()  # (B,)
        # An item without audio (all padding, masked out of the fusion) still needs finite
        # features: NaN would survive the mask's multiplications. Give it the shortest clip.
        lengths = torch.where(lengths > 0, lengths, MIN_FRAMES)
        heard = logmel
        if self.training and self.augment is not None:
            heard = spec_augment(packed, self.augment)[:, :-1].float()
        deep = self.cnn(heard, lengths)  # (B, 128)
        return torch.cat([deep, masked_band_stats(logmel, lengths)], dim=1)  # (B, 256)


def top_of(modality: str, model: nn.Module) -> nn.Module:
    """The trainable top of an encoder's network (sharing its modules)."""
    if modality == "image":
        return ImageTop(model)
    if modality == "text":
        return TextTop(model)
    if modality == "audio":
        return AudioTop(model)
    raise ValueError(f"modality must be one of {FINETUNABLE}, got {modality!r}")


def pretrained_top(modality: str) -> nn.Module:
    """A fresh top with the pretrained weights (unfolded BatchNorm), ready to train."""
    with torch.random.fork_rng(devices=[]):  # discarded random inits draw from the global RNG
        if modality == "image":
            from models.image import build_model, default_weights_path, load_weights

            model = build_model()
            load_weights(model, default_weights_path())
        elif modality == "text":
            from transformers import AutoModel

            from models.text import default_model_path

            model = AutoModel.from_pretrained(str(default_model_path()), local_files_only=True,
                                              dtype=torch.float32)
        elif modality == "audio":
            from models.audio import seeded_cnn

            model = seeded_cnn()
        else:
            raise ValueError(f"modality must be one of {FINETUNABLE}, got {modality!r}")
    top = top_of(modality, model)
    top.requires_grad_(True)
    return top.eval()


def bottom_inputs(modality: str, encoder: Any, items: Sequence[Any], batch_size: int = 32,
                  on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """The cached training input of every item: what the frozen bottom of ``encoder`` (the
    worker's frozen encoder of ``modality``) makes of its preprocessed ``items``. Image:
    (N, 192, 7, 7); text: packed (N, L, 385), L the longest text; audio: packed (N, 65, T).
    ``on_batch(items done)`` after every batch (the training heartbeat)."""
    if len(items) == 0:
        raise ValueError("no items")
    if modality == "image":
        return _image_bottom(encoder, items, batch_size, on_batch)
    if modality == "text":
        return _text_bottom(encoder, items, batch_size, on_batch)
    if modality == "audio":
        return pack_audio(items)
    raise ValueError(f"modality must be one of {FINETUNABLE}, got {modality!r}")


def _image_bottom(encoder: Any, items: Sequence[torch.Tensor], batch_size: int,
                  on_batch: Callable[[int], None] | None) -> torch.Tensor:
    from models.device import autocast, to_device

    net = encoder.model
    parts = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            x = torch.stack(list(items[start : start + batch_size])).float()  # (b, 3, 224, 224)
            x = to_device(x, encoder.device).contiguous(memory_format=encoder.memory_format)
            # The same precision the encoder serves with: training sees what inference will.
            with autocast(encoder.device, encoder.precision):
                x = net.bn1(net.conv_stem(x))
                x = net.blocks[:IMAGE_CUT](x)  # (b, 192, 7, 7)
            parts.append(x.float().cpu().contiguous())
            if on_batch is not None:
                on_batch(start + len(x))
    return torch.cat(parts).clone()


def _text_bottom(encoder: Any, items: Sequence[str], batch_size: int,
                 on_batch: Callable[[int], None] | None) -> torch.Tensor:
    from models.device import autocast, to_device
    from models.text import MAX_LENGTH

    with encoder._lock:  # the fast tokenizer is not safe to share between threads
        tokens = encoder.tokenizer(list(items), truncation=True, max_length=MAX_LENGTH)
    ids = tokens["input_ids"]
    longest = max(len(r) for r in ids)
    width = encoder.model.config.hidden_size
    out = torch.zeros(len(ids), longest, width + 1)
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            rows = range(start, min(start + batch_size, len(ids)))
            size = max(len(ids[i]) for i in rows)
            batch = {k: torch.tensor([v[i] + [encoder.tokenizer.pad_token_id if k == "input_ids"
                                               else 0] * (size - len(v[i])) for i in rows])
                     for k, v in tokens.items()}
            batch = {k: to_device(v, encoder.device) for k, v in batch.items()}
            with autocast(encoder.device, encoder.precision):
                hidden = encoder.model(**batch, output_hidden_states=True).hidden_states[-2]
            out[start : start + len(rows), :size, :width] = hidden.float().cpu()
            out[start : start + len(rows), :size, width] = batch["attention_mask"].float().cpu()
            if on_batch is not None:
                on_batch(start + len(rows))
    return out


def training_audio(encoder: Any, wave: Any) -> torch.Tensor:
    """A clip's log-mel as a finetuned audio encoder will see it: the frozen ``encoder``'s
    preprocessing of the samples that make the first AUDIO_MAX_FRAMES frames -> (64, T)."""
    from models.audio import HOP, N_FFT

    logmel = encoder.preprocess(wave[: AUDIO_MAX_FRAMES * HOP + N_FFT])
    return logmel[:, :AUDIO_MAX_FRAMES].clone()


def pack_audio(logmels: Sequence[torch.Tensor], max_frames: int = AUDIO_MAX_FRAMES
               ) -> torch.Tensor:
    """Log-mels (64, T_i) -> (N, 65, T): cut at ``max_frames``, padded, validity last."""
    lengths = [min(int(x.shape[1]), max_frames) for x in logmels]
    bands = int(logmels[0].shape[0])
    out = torch.zeros(len(logmels), bands + 1, max(lengths))
    for i, (x, n) in enumerate(zip(logmels, lengths, strict=True)):
        out[i, :bands, :n] = x[:, :n]
        out[i, bands, :n] = 1.0
    return out


def spec_augment(packed: torch.Tensor, generator: torch.Generator,
                 bands: int = SPEC_AUGMENT["bands"], frames: int = SPEC_AUGMENT["frames"]
                 ) -> torch.Tensor:
    """SpecAugment-style masking of packed log-mels (B, F + 1, T): per item, one band of up to
    ``bands`` mel channels and one span of up to ``frames`` valid frames set to the item's mean
    log-mel (zero after the CNN's input scaling would be arbitrary; the mean is neutral).
    Returns a new tensor; the validity channel is untouched."""
    b, f1, t = packed.shape
    f = f1 - 1
    out = packed.clone()
    logmel, valid = out[:, :f], out[:, f]  # (B, F, T), (B, T)
    lengths = valid.sum(dim=1).long().clamp_min(1)  # (B,)
    width_f = torch.randint(0, bands + 1, (b,), generator=generator)
    start_f = (torch.rand(b, generator=generator) * (f - width_f + 1)).long()
    width_t = torch.minimum(torch.randint(0, frames + 1, (b,), generator=generator), lengths)
    start_t = (torch.rand(b, generator=generator) * (lengths - width_t + 1)).long()
    rows = torch.arange(f)[None, :]  # (1, F)
    steps = torch.arange(t)[None, :]  # (1, T)
    band = (rows >= start_f[:, None]) & (rows < (start_f + width_f)[:, None])  # (B, F)
    span = (steps >= start_t[:, None]) & (steps < (start_t + width_t)[:, None])  # (B, T)
    masked = band[:, :, None] | span[:, None, :]  # (B, F, T)
    masked &= valid[:, None, :].bool()
    mean = (logmel * valid[:, None]).sum(dim=(1, 2)) / (lengths * f)  # (B,)
    out[:, :f] = torch.where(masked, mean[:, None, None], logmel)
    return out


def save_top(module: nn.Module) -> bytes:
    """A top's weights (and BatchNorm statistics) as safetensors bytes."""
    return save_tensors(state_tensors(module), metadata={"format": FORMAT})


def load_top(modality: str, model: nn.Module, data: bytes) -> nn.Module:
    """Load a top saved by :func:`save_top` into the encoder network ``model`` (strict: every
    tensor of the top, nothing else); the network changes in place."""
    return load_weights(top_of(modality, model), data, f"finetuned {modality} encoder")


def finetuned_spec(base: EncoderSpec, version: str | None) -> EncoderSpec:
    """The spec a finetuned encoder serves under: the pretrained one's, renamed ``version``."""
    if not version:
        raise ValueError("a finetuned encoder needs the version that names its weights")
    return EncoderSpec(base.modality, base.name, version, base.dim)


def finetune_version(base_version: str, weights_blob: str) -> str:
    """The feature-cache key of a finetuned encoder: the pretrained encoder's version and the
    hash of the top's weights."""
    return f"{base_version}-ft-{weights_blob[:16]}"
