"""How encoders run: precision choice, bf16 agreement with fp32, device copies, settings."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmbatch.settings import Settings, SettingsError
from models.device import autocast, bf16_supported, resolve_precision, to_device
from models.registry import build_encoder

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not bf16_supported(CPU), reason="no native bf16 on this CPU")


def test_resolve_precision() -> None:
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("auto", CPU, preferred="fp32") == "fp32"
    assert resolve_precision("auto", CPU) == ("bf16" if bf16_supported(CPU) else "fp32")
    for bad in ("fp16", "", "BF16"):
        with pytest.raises(ValueError):
            resolve_precision(bad, CPU)
    if not bf16_supported(CPU):
        with pytest.raises(ValueError, match="no native bf16"):
            resolve_precision("bf16", CPU)


def test_autocast_and_copies_on_the_cpu() -> None:
    x = torch.ones(2, 3)
    assert to_device(x, CPU) is x  # no pinning, no copy: the GPU path only applies to CUDA
    with autocast(CPU, "fp32"):
        assert (x @ x.T).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        autocast(CPU, "auto")


def test_new_settings_are_validated() -> None:
    s = Settings.from_env({"MMBATCH_IMAGE_BATCH_SIZE": "16", "MMBATCH_DECODE_THREADS": "0",
                           "MMBATCH_PRECISION": "fp32"})
    assert (s.image_batch_size, s.decode_threads, s.precision) == (16, 0, "fp32")
    for name, value in (("TEXT_BATCH_SIZE", "0"), ("PRECISION", "fp16"),
                        ("DECODE_THREADS", "-2"), ("PREFETCH_ITEMS", "0")):
        with pytest.raises(SettingsError):
            Settings.from_env({f"MMBATCH_{name}": value})


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


@needs_bf16
def test_bf16_image_features_and_top1_agree_with_fp32() -> None:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    fp32 = build_encoder("image", precision="fp32")
    bf16 = build_encoder("image", precision="bf16", max_batch=8)
    batch = torch.stack([fp32.preprocess(Image.fromarray(f())) for f in
                         (skdata.chelsea, skdata.coffee, skdata.astronaut)])
    assert bf16.precision == "bf16"
    assert _cosine(fp32.encode(list(batch)), bf16.encode(list(batch))) > 0.99
    assert torch.equal(fp32.logits(batch).argmax(1), bf16.logits(batch).argmax(1))


@needs_bf16
def test_bf16_text_and_audio_features_agree_with_fp32() -> None:
    texts = ["a cat on a mat", "stock markets fell sharply today", ""]
    a, b = (build_encoder("text", precision=p).encode(texts) for p in ("fp32", "bf16"))
    assert b.dtype == torch.float32 and _cosine(a, b) > 0.999
    t = np.arange(16_000, dtype=np.float32) / 16_000
    enc32, enc16 = build_encoder("audio", precision="fp32"), build_encoder("audio", precision="bf16")
    mels = [enc32.preprocess(np.sin(2 * np.pi * f * t).astype(np.float32)) for f in (220, 880)]
    assert _cosine(enc32.encode(mels), enc16.encode(mels)) > 0.99


def test_image_encoder_in_nchw_matches_channels_last() -> None:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    nhwc = build_encoder("image")
    nchw = build_encoder("image", channels_last=False)
    x = [nhwc.preprocess(Image.fromarray(skdata.chelsea()))]
    assert _cosine(nhwc.encode(x), nchw.encode(x)) > 0.9999


def test_fold_batchnorm_keeps_outputs() -> None:
    from models.device import fold_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 10, 10)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model)
    model.eval()
    expected = model(x)
    assert fold_batchnorm(model) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
