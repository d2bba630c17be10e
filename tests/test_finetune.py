"""models.finetune: a pretrained encoder cut in two gives the encoder's own features; a trained
top, saved and loaded over the pretrained network, gives what it gave in training; SpecAugment
masks only real frames; and the finetune mode trains end to end with the fusion."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from models import finetune
from models.adapt import InputSet, fit_adapted
from models.audio import TOP_MAX_FRAMES, pack_audio, spec_augment
from models.fusion import FusionConfig
from models.training import TrainConfig


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    from models.image import preprocess_image

    rng = np.random.default_rng(0)
    return [preprocess_image(Image.fromarray(rng.integers(0, 255, (64 + 8 * i, 80, 3),
                                                          dtype=np.uint8)))
            for i in range(5)]


@pytest.fixture(scope="module")
def image_encoder() -> object:
    from models.image import ImageEncoder

    return ImageEncoder(precision="fp32")


def test_image_bottom_and_top_give_the_encoders_features(image_encoder: object,
                                                         images: list[torch.Tensor]) -> None:
    acts = finetune.bottom_inputs("image", image_encoder, images, batch_size=2)
    assert acts.shape == (5, 192, 7, 7)
    top = finetune.pretrained_top("image")
    with torch.no_grad():
        ours = top(acts)
    want = image_encoder.encode(images)  # type: ignore[attr-defined]
    # The encoder folds BatchNorm into the convolutions; the top keeps it: equal to rounding.
    assert torch.allclose(ours, want, atol=1e-3, rtol=1e-3), (ours - want).abs().max()


def test_a_trained_image_top_loads_over_the_pretrained_network(image_encoder: object,
                                                               images: list[torch.Tensor]) -> None:
    from models.image import ImageEncoder

    acts = finetune.bottom_inputs("image", image_encoder, images)
    top = finetune.pretrained_top("image")
    with torch.no_grad():
        for p in top.parameters():
            p.add_(0.01 * torch.randn_like(p))
        trained = top(acts)
    enc = ImageEncoder(precision="fp32", finetuned=finetune.save_top(top), version="img-ft-x")
    assert enc.spec.version == "img-ft-x" and enc.spec.dim == 1280
    got = enc.encode(images)
    assert torch.allclose(got, trained, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(got, image_encoder.encode(images), atol=1e-2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="version"):
        ImageEncoder(precision="fp32", finetuned=finetune.save_top(top))
    with pytest.raises(ValueError, match="finetuned image encoder"):
        ImageEncoder(precision="fp32", finetuned=finetune.save_top(finetune.pretrained_top("audio")),
                     version="v")


def test_text_bottom_and_top_give_the_encoders_features() -> None:
    from models.text import TextEncoder

    texts = ["a cat", "", "a much longer sentence about the weather in the mountains today"]
    enc = TextEncoder(precision="fp32")
    packed = finetune.bottom_inputs("text", enc, texts, batch_size=2)
    assert packed.shape[0] == 3 and packed.shape[2] == 385
    assert packed[1, :, -1].sum() == 2  # an empty text is [CLS] [SEP]
    _check_top("text", packed, enc.encode(texts), 0.02, 1e-5,
               lambda weights: TextEncoder(precision="fp32", finetuned=weights,
                                           version="t-ft").encode(texts))


def test_audio_top_gives_the_encoders_features() -> None:
    from models.audio import AudioEncoder

    rng = np.random.default_rng(1)
    enc = AudioEncoder(precision="fp32")
    logmels = [enc.preprocess(rng.standard_normal(n).astype(np.float32) * 0.1)
               for n in (3000, 16000, 8000)]
    packed = finetune.bottom_inputs("audio", enc, logmels)
    assert packed.shape == (3, 65, logmels[1].shape[1])
    _check_top("audio", packed, enc.encode(logmels), 0.05, 1e-4,
               lambda weights: AudioEncoder(precision="fp32", finetuned=weights,
                                            version="a-ft").encode(logmels))


def _check_top(modality: str, bottoms: torch.Tensor, frozen: torch.Tensor, noise: float,
               atol: float, tuned_features: Callable[[bytes], torch.Tensor]) -> None:
    """The pretrained top over ``bottoms`` gives the frozen encoder's features; a changed top,
    saved and loaded over the pretrained network (``tuned_features(weights)``), gives what the
    changed top gives."""
    top = finetune.pretrained_top(modality)
    with torch.no_grad():
        assert torch.allclose(top(bottoms), frozen, atol=atol)
        for p in top.parameters():
            p.add_(noise * torch.randn_like(p))
        trained = top(bottoms)
    assert not torch.allclose(trained, frozen, atol=atol)
    assert torch.allclose(tuned_features(finetune.save_top(top)), trained, atol=atol)


def test_batchnorm_keeps_its_statistics_while_the_top_trains() -> None:
    top = finetune.pretrained_top("image").train()
    bns = [m for m in top.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    top(torch.randn(4, 192, 7, 7)).sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
    assert all(p.grad is not None for p in top.parameters())


def test_spec_augment_masks_only_real_frames() -> None:
    logmel = torch.randn(6, 64, 50)
    lengths = [50, 30, 12, 50, 5, 40]
    packed = pack_audio([logmel[i, :, :n] for i, n in enumerate(lengths)])
    out = spec_augment(packed, torch.Generator().manual_seed(3), bands=8, frames=10)
    assert torch.equal(out[:, 64], packed[:, 64])  # validity untouched
    changed = (out[:, :64] != packed[:, :64])  # (B, 64, T)
    assert changed.any()
    for i, n in enumerate(lengths):
        assert not changed[i, :, n:].any()  # padding never masked
    again = spec_augment(packed, torch.Generator().manual_seed(3), bands=8, frames=10)
    assert torch.equal(out, again)
    assert torch.equal(packed, pack_audio([logmel[i, :, :n] for i, n in
                                                    enumerate(lengths)]))  # input not modified


def _tiny_text_task() -> tuple[InputSet, InputSet, FusionConfig]:
    """Packed hidden states where the class is the sign of a direction the pooled features
    barely show: the top has to move to separate them."""
    gen = torch.Generator().manual_seed(0)
    n, length = 48, 6
    labels = torch.arange(n) % 2
    hidden = torch.randn(n, length, 384, generator=gen)
    hidden[:, :, 0] += (labels[:, None].float() * 2 - 1) * 0.5
    packed = torch.cat([hidden, torch.ones(n, length, 1)], dim=2)
    mask = torch.ones(n, 1, dtype=torch.bool)
    data = InputSet({"text": packed}, mask, labels)
    return data.subset(range(32)), data.subset(range(32, n)), FusionConfig({"text": 384}, 2)


def test_finetune_trains_the_top_and_is_reproducible() -> None:
    train, val, cfg = _tiny_text_task()
    tcfg = TrainConfig(epochs=3, seed=4, patience=5, batch_size=16)
    runs = []
    for _ in range(2):
        model, metrics = fit_adapted(train, val, cfg, tcfg, {},
                                     finetune={"text": finetune.pretrained_top("text")})
        runs.append((model, metrics))
    (a, ma), (b, mb) = runs
    assert ma["val_macro_f1"] == mb["val_macro_f1"] and ma["epochs"] == mb["epochs"]
    fresh = finetune.pretrained_top("text").state_dict()
    moved = [k for k, v in a.encoders["text"].state_dict().items()
             if v.dtype.is_floating_point and not torch.equal(v, fresh[k])]
    assert moved, "the top did not train"
    for k, v in a.encoders["text"].state_dict().items():
        assert torch.equal(v, b.encoders["text"].state_dict()[k])


@pytest.mark.parametrize("modality,shape", [("image", (2, 192, 7, 7)), ("text", (2, 5, 385)),
                                            ("audio", (2, 65, 4))])
def test_an_item_without_the_modality_gets_finite_features(modality: str,
                                                           shape: tuple[int, ...]) -> None:
    """Zeros stand for a missing modality in a batch; NaN there would leak through the mask."""
    with torch.no_grad():
        out = finetune.pretrained_top(modality)(torch.zeros(shape))
    assert torch.isfinite(out).all()


def test_a_finetuned_audio_encoder_reads_what_training_read() -> None:
    """Training keeps the first 10 s of a clip; the served encoder must not read more."""
    from models.audio import AudioEncoder

    rng = np.random.default_rng(2)
    wave = (rng.standard_normal(16_000 * 25) * 0.1).astype(np.float32)  # 25 s
    frozen = AudioEncoder(precision="fp32")
    logmel = frozen.training_input(wave)
    assert logmel.shape == (64, TOP_MAX_FRAMES)
    top = finetune.pretrained_top("audio")
    with torch.no_grad():
        for p in top.parameters():
            p.add_(0.05 * torch.randn_like(p))
        trained = top(pack_audio([logmel]))
    tuned = AudioEncoder(precision="fp32", finetuned=finetune.save_top(top), version="a-ft")
    served = tuned.encode([tuned.preprocess(wave)])
    assert torch.allclose(served, trained, atol=1e-4)


def test_spec_augment_reaches_the_cnn_but_not_the_band_statistics() -> None:
    logmel = torch.randn(4, 64, 80) - 6.0
    packed = pack_audio(list(logmel))
    top = finetune.pretrained_top("audio")
    with torch.no_grad():
        clean = top(packed)
        top.train()
        top.augment = torch.Generator().manual_seed(0)
        heard = top(packed)
    assert torch.equal(heard[:, 128:], clean[:, 128:])  # band means and spreads: clean
    assert not torch.allclose(heard[:, :128], clean[:, :128])  # the CNN heard masked input
