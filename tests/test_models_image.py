"""EfficientNet-Lite0 image encoder on its real ImageNet weights."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.image import CROP, ImageEncoder, build_model, remap_state_dict
from models.registry import SPECS, build_encoder

skdata = pytest.importorskip("skimage.data")

TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285
COFFEE_MUG, ESPRESSO, CUP = 504, 967, 968


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    enc = build_encoder("image")
    assert isinstance(enc, ImageEncoder)
    return enc


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {
        "chelsea": Image.fromarray(skdata.chelsea()),
        "coffee": Image.fromarray(skdata.coffee()),
        "astronaut": Image.fromarray(skdata.astronaut()),
    }


def test_encoder_is_frozen(encoder: ImageEncoder) -> None:
    assert encoder.spec == SPECS["image"]
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_imagenet_predictions(encoder: ImageEncoder, images: dict[str, Image.Image]) -> None:
    batch = torch.stack(
        [encoder.preprocess(images["chelsea"]), encoder.preprocess(images["coffee"])]
    )
    probs = encoder.logits(batch).softmax(dim=1)  # (2, 1000)
    top5 = probs.topk(5, dim=1).indices.tolist()
    assert {TABBY, TIGER_CAT, EGYPTIAN_CAT} & set(top5[0])
    assert {COFFEE_MUG, ESPRESSO, CUP} & set(top5[1])
    # Stored reference outputs (tolerance covers Pillow's resampling across versions).
    assert top5[0][:3] == [TIGER_CAT, EGYPTIAN_CAT, TABBY]
    assert probs[0, TIGER_CAT].item() == pytest.approx(0.386, abs=0.03)
    assert top5[1][0] == ESPRESSO
    assert probs[1, ESPRESSO].item() == pytest.approx(0.951, abs=0.02)


def test_features_shape_and_batch_invariance(
    encoder: ImageEncoder, images: dict[str, Image.Image]
) -> None:
    items = [encoder.preprocess(img) for img in images.values()]
    batched = encoder.encode(items)
    assert batched.shape == (3, 1280) and batched.dtype == torch.float32
    assert batched.device.type == "cpu" and not batched.requires_grad
    alone = encoder.encode(items[:1])
    torch.testing.assert_close(alone[0], batched[0], atol=1e-4, rtol=0)
    # Pooled after ReLU6: non-negative, and different images differ.
    assert (batched >= 0).all() and not torch.allclose(batched[0], batched[1])
    batched[0, 0] = 0.0  # an ordinary tensor the caller may modify
    assert encoder.encode([]).shape == (0, 1280)


def test_chunked_batches_keep_order(images: dict[str, Image.Image], encoder: ImageEncoder) -> None:
    items = [encoder.preprocess(img) for img in images.values()]
    small = ImageEncoder(max_batch=2)
    torch.testing.assert_close(small.encode(items), encoder.encode(items), atol=1e-4, rtol=0)


def test_preprocess(encoder: ImageEncoder, images: dict[str, Image.Image]) -> None:
    chelsea = images["chelsea"]  # 451 x 300
    x = encoder.preprocess(chelsea)
    assert x.shape == (3, CROP, CROP) and x.dtype == torch.float32
    assert x.min() >= -127 / 128 and x.max() <= 128 / 128
    # Same as the textbook resize-shorter-side-then-center-crop, up to rounding.
    w, h = chelsea.size
    resized = chelsea.resize((round(w * 256 / h), 256), Image.Resampling.BICUBIC)
    left, top = round((resized.width - CROP) / 2), round((resized.height - CROP) / 2)
    ref = np.asarray(resized.crop((left, top, left + CROP, top + CROP)), dtype=np.float32)
    ref_t = (torch.from_numpy(ref).permute(2, 0, 1) - 127) / 128
    assert (x - ref_t).abs().max() <= 1.5 / 128
    # Grey, RGBA, palette and very elongated images all come out the same shape.
    for img in (
        chelsea.convert("L"),
        chelsea.convert("RGBA"),
        chelsea.convert("P"),
        chelsea.resize((4000, 7)),
    ):
        assert encoder.preprocess(img).shape == (3, CROP, CROP)
    with pytest.raises(TypeError):
        encoder.preprocess(np.zeros((8, 8, 3)))  # type: ignore[arg-type]


def test_preprocess_is_thread_safe(encoder: ImageEncoder, images: dict[str, Image.Image]) -> None:
    inputs = list(images.values()) * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(encoder.preprocess, inputs))
    for img, x in zip(inputs, parallel, strict=True):
        assert torch.equal(x, encoder.preprocess(img))


def test_encode_rejects_wrong_shapes(encoder: ImageEncoder) -> None:
    with pytest.raises(ValueError, match="item 1"):
        encoder.encode([torch.zeros(3, CROP, CROP), torch.zeros(3, 100, 100)])
    with pytest.raises(ValueError):
        encoder.logits(torch.zeros(3, CROP, CROP))


def test_remap_is_strict() -> None:
    model = build_model()
    source = _lukemelas_like()
    assert set(remap_state_dict(source, model)) == set(model.state_dict())
    broken = dict(source)
    broken["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(ValueError, match="shape mismatch"):
        remap_state_dict(broken, model)
    missing = {k: v for k, v in source.items() if k != "_bn1.running_var"}
    with pytest.raises(ValueError, match="cover"):
        remap_state_dict(missing, model)
    with pytest.raises(ValueError, match="unexpected"):
        remap_state_dict({**source, "_blocks.3._se_reduce.weight": torch.zeros(1)}, model)


def _lukemelas_like() -> dict[str, torch.Tensor]:
    from models.image import default_weights_path

    return torch.load(default_weights_path(), map_location="cpu", weights_only=True)
