"""Log-mel + seeded CNN audio encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.audio import (
    CNN_DIM,
    CNN_SEED,
    HOP,
    MAX_SECONDS,
    MIN_SAMPLES,
    N_MELS,
    SAMPLE_RATE,
    AudioEncoder,
    frame_count,
    masked_band_stats,
    seeded_cnn,
)
from models.registry import SPECS, build_encoder


def tone(freq: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    enc = build_encoder("audio")
    assert isinstance(enc, AudioEncoder)
    return enc


def test_spec_records_the_seed(encoder: AudioEncoder) -> None:
    assert encoder.spec == SPECS["audio"] and encoder.spec.dim == 256
    assert f"seed{CNN_SEED}" in encoder.spec.version
    assert f"max{int(MAX_SECONDS)}s" in encoder.spec.version
    assert encoder.spec.dim == CNN_DIM + 2 * N_MELS
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_preprocess_shapes(encoder: AudioEncoder) -> None:
    x = encoder.preprocess(tone(440, 1.0))
    assert x.shape == (N_MELS, frame_count(SAMPLE_RATE)) == (64, SAMPLE_RATE // HOP + 1)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    short = encoder.preprocess(tone(440, 0.01))  # padded to 0.1 s
    assert short.shape == (64, frame_count(MIN_SAMPLES))
    assert encoder.preprocess(tone(440, 0.5).astype(np.float64)).shape[0] == 64


@pytest.mark.parametrize(
    "wave, error",
    [
        (np.zeros((2, 100), np.float32), ValueError),
        (np.zeros(0, np.float32), ValueError),
        (np.array([0.0, np.nan] * 900, np.float32), ValueError),
        (np.zeros(2000, np.int16), ValueError),
        ([0.0] * 2000, TypeError),
    ],
)
def test_preprocess_rejects_bad_audio(
    encoder: AudioEncoder, wave: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        encoder.preprocess(wave)  # type: ignore[arg-type]


def test_padding_does_not_change_features(encoder: AudioEncoder) -> None:
    short = encoder.preprocess(tone(440, 0.35))
    tiny = encoder.preprocess(tone(1000, 0.05))
    long = encoder.preprocess(tone(220, 2.0))
    alone = torch.cat([encoder.encode([short]), encoder.encode([tiny])])
    batched = encoder.encode([long, short, tiny])
    assert batched.shape == (3, 256) and batched.dtype == torch.float32
    torch.testing.assert_close(batched[1:], alone, atol=1e-4, rtol=0)
    # Same with tight budgets, which split the batch into several length buckets.
    budget = AudioEncoder(max_batch=2, max_batch_frames=300)
    torch.testing.assert_close(budget.encode([long, short, tiny]), batched, atol=1e-4, rtol=0)
    assert encoder.encode([]).shape == (0, 256)
    with pytest.raises(ValueError, match="item 1"):
        encoder.encode([short, torch.zeros(N_MELS, 3)])


def test_different_tones_differ(encoder: AudioEncoder) -> None:
    feats = encoder.encode([encoder.preprocess(tone(f, 1.0)) for f in (300, 300, 3000)])
    same = (feats[0] - feats[1]).norm()
    diff = (feats[0] - feats[2]).norm()
    assert same < 1e-4 and diff > 1.0
    assert (feats[0, :128] - feats[2, :128]).norm() > 1.0  # the CNN part too, not only the stats


def test_band_stats_match_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logmel = torch.randn(2, 5, 9, generator=g)
    lengths = torch.tensor([9, 4])
    stats = masked_band_stats(logmel, lengths)
    second = logmel[1, :, :4]
    torch.testing.assert_close(stats[1, :5], second.mean(1))
    torch.testing.assert_close(stats[1, 5:], second.std(1, unbiased=False))


def test_seeded_and_deterministic(encoder: AudioEncoder) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    again = AudioEncoder()
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    for a, b in zip(
        encoder.model.state_dict().values(), seeded_cnn(CNN_SEED).state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    x = [encoder.preprocess(tone(440, 1.0))]
    torch.testing.assert_close(again.encode(x), encoder.encode(x), atol=0, rtol=0)
    # Stored reference: a change here changes every cached audio feature, so bump the version.
    feats = encoder.encode(x)[0]
    expected_cnn = torch.tensor([0.000000, 6.510577, 8.651867, 4.388838])
    expected_mean = torch.tensor([-13.283871, -13.278809, -13.269546, -13.259862])
    expected_std = torch.tensor([2.658973, 2.683435, 2.728220, 2.775956])
    torch.testing.assert_close(feats[:4], expected_cnn, atol=1e-3, rtol=0)
    torch.testing.assert_close(feats[128:132], expected_mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(feats[192:196], expected_std, atol=1e-3, rtol=0)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resampling_without_torch_keeps_the_features(encoder: AudioEncoder, rate: int) -> None:
    """media.decode resamples with libsoxr (the decoding side is torch-free); the audio
    features stay within cosine 0.999 of those from torchaudio's resampler, which the encoder's
    features were measured with before."""
    import torchaudio.functional

    from media.decode import resample

    rng = np.random.default_rng(rate)
    t = np.arange(int(2.5 * rate)) / rate
    # a chirp, a tone and some noise: energy across the band, up to the new Nyquist frequency
    wave = (0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.2 * np.sin(2 * np.pi * 440 * t)
            + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    ours = resample(wave, rate, 16_000)
    theirs = torchaudio.functional.resample(torch.from_numpy(wave), rate, 16_000).numpy()
    assert abs(len(ours) - len(theirs)) <= 1
    a, b = encoder.encode([encoder.preprocess(x) for x in (ours, theirs)])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert cosine >= 0.999, cosine
