"""Audio features: log-mel statistics plus a small frozen CNN over the log-mel spectrogram.

No pretrained audio weights are available offline, so the CNN is initialised deterministically
from a fixed seed and kept frozen: its random features are weak on their own, which is why the
per-band log-mel mean and standard deviation are returned alongside them. The seed is part of
the spec's version; a trained checkpoint would get a new version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from models.device import autocast, to_device
from models.spec import EncoderSpec, EncoderTop, PretrainedEncoder

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160  # 10 ms frames
N_MELS = 64
LOG_EPS = 1e-6
MIN_SAMPLES = SAMPLE_RATE // 10  # shorter clips are zero-padded to 0.1 s
MAX_SECONDS = 600.0  # longer clips are truncated: bounds memory per item
CNN_SEED = 1234
CNN_CHANNELS = (16, 32, 64, 128)
# Fixed input scaling of log-mel values (roughly their range for speech and everyday sounds),
# so the randomly initialised convolutions see inputs of order one.
LOGMEL_CENTER = -6.0
LOGMEL_SCALE = 4.0
CNN_DIM = CNN_CHANNELS[-1]

MIN_FRAMES = MIN_SAMPLES // HOP + 1  # frames of the shortest (padded) clip

# 64-band log-mel (n_fft 400, hop 160), CNN seeded with 1234 (128) + per-band mean and std
# (2 x 64); clips padded to 0.1 s, cut at 600 s. The version records CNN_SEED and MAX_SECONDS:
# bump it with them.
SPEC = EncoderSpec("audio", "logmel_cnn", "logmel64-cnn128-seed1234-stats-max600s-v1", 256)
# A finetuned audio encoder (models.finetune) reads the first 10 s of a clip, in training and at
# inference alike, and its CNN trains with SpecAugment masks of up to these sizes.
TOP_MAX_FRAMES = 1000
SPEC_AUGMENT = {"bands": 8, "frames": 40}
# What precision="auto" picks where bf16 is native: bf16 for the CNN (the band statistics stay
# fp32). bench/precision.py measured feature cosine >= 0.99999 against fp32, 4.1 ms a clip
# against 6.7.
PREFERRED_PRECISION = "bf16"


def frame_count(num_samples: int) -> int:
    """Frames the (centered) STFT makes from ``num_samples`` samples."""
    return num_samples // HOP + 1


def masked_band_stats(logmel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-band mean and (population) std over each item's valid frames.

    logmel: (B, F, T) padded along T; lengths: (B,) valid frames -> (B, 2F)
    """
    steps = torch.arange(logmel.shape[-1], device=logmel.device)  # (T,)
    valid = (steps[None, :] < lengths[:, None]).to(logmel.dtype)[:, None, :]  # (B, 1, T)
    count = lengths.to(logmel.dtype)[:, None]  # (B, 1)
    mean = (logmel * valid).sum(-1) / count  # (B, F)
    var = (((logmel - mean[..., None]) * valid) ** 2).sum(-1) / count  # (B, F)
    return torch.cat([mean, var.clamp_min(0).sqrt()], dim=1)  # (B, 2F)


class ConvBlock(nn.Module):
    """Conv 3x3 -> BN -> ReLU -> max pool, keeping padded frames out of valid ones."""

    def __init__(self, in_ch: int, out_ch: int, pool_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)
        # With the seeded init the running statistics are the identity; the layer is here so
        # that a trained checkpoint of this architecture drops in unchanged.
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()
        self.pool_time = pool_time
        self.pool = nn.MaxPool2d(kernel_size=(2, 2) if pool_time else (2, 1))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, C, F, T); lengths: (B,) valid frames
        steps = torch.arange(x.shape[-1], device=x.device)  # (T,)
        valid = (steps[None, :] < lengths[:, None]).to(x.dtype)[:, None, None, :]  # (B, 1, 1, T)
        # Zeroing padded frames makes the convolution see exactly the zero padding it would see
        # at the end of the item alone.
        x = self.act(self.bn(self.conv(x * valid)))  # (B, C', F, T)
        x = self.pool(x)  # (B, C', F/2, T/2 or T)
        # Pooling floors, so a window never mixes a valid frame with a padded one.
        return x, (lengths // 2 if self.pool_time else lengths)


class AudioCNN(nn.Module):
    """Four conv blocks over a log-mel spectrogram, then masked mean + max over time.

    Time is pooled only in the first two blocks so the shortest clip (0.1 s, 11 frames) keeps
    at least two frames.
    """

    def __init__(self, n_mels: int = N_MELS, channels: Sequence[int] = CNN_CHANNELS) -> None:
        super().__init__()
        if n_mels < 2 ** len(channels):
            raise ValueError(f"n_mels must be >= {2 ** len(channels)}, got {n_mels}")
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be positive, got {tuple(channels)}")
        widths = (1, *channels)
        self.blocks = nn.ModuleList(
            ConvBlock(widths[i], widths[i + 1], pool_time=i < 2) for i in range(len(channels))
        )
        self.out_dim = widths[-1]

    def forward(self, logmel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # logmel: (B, F, T) padded along T; lengths: (B,) valid frames
        x = ((logmel - LOGMEL_CENTER) / LOGMEL_SCALE).unsqueeze(1)  # (B, 1, F, T)
        for block in self.blocks:
            x, lengths = block(x, lengths)  # (B, C, F', T')
        x = x.mean(dim=2)  # (B, C, T')
        steps = torch.arange(x.shape[-1], device=x.device)  # (T',)
        valid = steps[None, None, :] < lengths[:, None, None]  # (B, 1, T')
        mean = (x * valid).sum(-1) / lengths[:, None].to(x.dtype)  # (B, C)
        peak = x.masked_fill(~valid, float("-inf")).amax(-1)  # (B, C)
        return mean + peak  # (B, C)


def seeded_cnn(seed: int = CNN_SEED) -> AudioCNN:
    """The CNN with weights drawn from ``seed`` only, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):  # module construction draws from the global RNG
        model = AudioCNN()
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(
                module.weight, mode="fan_in", nonlinearity="relu", generator=gen
            )
    return model


class AudioTop(EncoderTop):
    """The whole log-mel CNN, plus the fixed band statistics: packed (B, 65, T) -> (B, 256),
    the frozen audio encoder's layout (the last channel 1 where a frame is real)."""

    def __init__(self, cnn: nn.Module) -> None:
        super().__init__()
        self.cnn = cnn
        # While training: SpecAugment of the CNN's input, drawn from this generator (the
        # training loop's, so runs stay seeded). The band statistics always see the clean
        # log-mel: a masked band would have no spread, which inference never shows.
        self.augment: torch.Generator | None = None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
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


def pretrained_top() -> AudioTop:
    """A fresh top (the seeded CNN), ready to train."""
    return AudioTop(seeded_cnn()).trainable()


def pack_audio(logmels: Sequence[torch.Tensor], max_frames: int = TOP_MAX_FRAMES
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


class AudioEncoder(PretrainedEncoder):
    """16 kHz mono waveforms -> 256-d features: CNN (128) + band means (64) + band stds (64).

    ``finetuned``: the CNN weights of a train job (models.finetune), instead of the seeded
    ones; the encoder then reports ``version``, which names them, and keeps the first
    TOP_MAX_FRAMES frames of a clip (10 s), as training did."""

    spec: EncoderSpec = SPEC

    def __init__(
        self,
        device: torch.device | str = "cpu",
        max_batch: int = 32,
        max_batch_frames: int = 32 * 3000,
        precision: str = "fp32",
        finetuned: bytes | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__(device, max_batch, precision, PREFERRED_PRECISION)
        if max_batch_frames < 1:
            raise ValueError(f"max_batch_frames must be >= 1, got {max_batch_frames}")
        self.max_batch_frames = max_batch_frames
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS
        )  # stays on the CPU: preprocessing runs in worker threads
        cnn = seeded_cnn()
        self.max_frames: int | None = None  # frames kept of a clip (None: MAX_SECONDS)
        if finetuned is not None:  # a train job's CNN (models.finetune)
            self.load_top(AudioTop(cnn), finetuned, version)
            self.max_frames = TOP_MAX_FRAMES  # what the CNN and the fusion trained on
        self.model = cnn.eval().requires_grad_(False).to(self.device)

    def preprocess(self, wave: np.ndarray) -> torch.Tensor:
        """1-D float waveform at 16 kHz -> log-mel (64, T)."""
        if not isinstance(wave, np.ndarray):
            raise TypeError(f"expected a numpy array, got {type(wave).__name__}")
        if wave.ndim != 1:
            raise ValueError(f"expected a 1-D mono waveform, got shape {wave.shape}")
        if wave.size == 0:
            raise ValueError("audio is empty")
        if not np.issubdtype(wave.dtype, np.floating):
            raise ValueError(f"expected float samples, got {wave.dtype}")
        limit = int(MAX_SECONDS * SAMPLE_RATE)
        if self.max_frames is not None:  # enough samples for max_frames full frames
            limit = min(limit, self.max_frames * HOP + N_FFT)
        samples = torch.from_numpy(np.ascontiguousarray(wave[:limit], dtype=np.float32))
        if not torch.isfinite(samples).all():
            raise ValueError("audio contains NaN or infinite samples")
        if samples.numel() < MIN_SAMPLES:
            samples = torch.nn.functional.pad(samples, (0, MIN_SAMPLES - samples.numel()))
        with torch.no_grad():
            logmel = torch.log(self.mel(samples) + LOG_EPS)  # (64, T)
        if self.max_frames is not None:
            logmel = logmel[:, : self.max_frames].clone()  # its own storage, not a view
        return logmel

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped by similar length, each group within the batch and frame budgets."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        chunks: list[list[int]] = []
        current: list[int] = []
        for i in order:
            # Sorted ascending, so item i is the longest of the group if added.
            if current and (
                len(current) >= self.max_batch
                or (len(current) + 1) * lengths[i] > self.max_batch_frames
            ):
                chunks.append(current)
                current = []
            current.append(i)
        if current:
            chunks.append(current)
        return chunks

    def encode(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(items) == 0:
            return torch.zeros(0, self.spec.dim)  # (0, D)
        for i, item in enumerate(items):
            if (
                not isinstance(item, torch.Tensor)
                or item.ndim != 2
                or item.shape[0] != N_MELS
                or item.shape[1] < MIN_FRAMES
            ):
                shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise ValueError(
                    f"item {i}: expected a ({N_MELS}, T >= {MIN_FRAMES}) log-mel tensor "
                    f"from preprocess(), got {shape}"
                )
        lengths = [int(item.shape[1]) for item in items]
        out = torch.empty(len(items), self.spec.dim, dtype=torch.float32)  # (B, 256)
        with torch.inference_mode():
            for chunk in self._chunks(lengths):
                longest = max(lengths[i] for i in chunk)
                batch = to_device(torch.stack(
                    [torch.nn.functional.pad(items[i], (0, longest - lengths[i])) for i in chunk]
                ), self.device)  # (b, 64, T)
                valid = torch.tensor([lengths[i] for i in chunk], device=self.device)  # (b,)
                with autocast(self.device, self.precision):
                    deep = self.model(batch, valid).float()  # (b, 128)
                # The band statistics stay in fp32: they are the features that carry the signal.
                features = torch.cat([deep, masked_band_stats(batch, valid)], dim=1)  # (b, 256)
                out[torch.tensor(chunk)] = features.float().cpu()
        return out  # allocated outside inference mode: an ordinary tensor

    def training_input(self, wave: np.ndarray) -> torch.Tensor:
        """A clip's log-mel as a finetuned audio encoder will see it: this encoder's
        preprocessing of the samples that make the first TOP_MAX_FRAMES frames -> (64, T)."""
        logmel = self.preprocess(wave[: TOP_MAX_FRAMES * HOP + N_FFT])
        return logmel[:, :TOP_MAX_FRAMES].clone()

    def bottom(self, items: Sequence[torch.Tensor], batch_size: int = 32,
               on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """The whole CNN trains, so below it is the log-mel itself: packed (N, 65, T)."""
        return pack_audio(items)
