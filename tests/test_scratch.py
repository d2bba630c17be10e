"""Scratch encoders (models.scratch) and their end-to-end training with the fusion
(models.adapt): shapes, preprocessing, safetensors round trip, and learning a task that
frozen features of the same inputs cannot see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.adapt import InputSet, encode_all, fit_adapted
from models.fusion import FusionConfig
from models.scratch import (
    ScratchConfig,
    ScratchFeatureEncoder,
    build_scratch,
    encoder_version,
    load_encoder,
    preprocess,
    save_encoder,
)
from models.training import Progress, TrainConfig


@pytest.mark.parametrize("modality,shape", [("image", (3, 1, 32, 32)), ("text", (3, 64)),
                                            ("audio", (3, 64, 300))])
def test_shapes_and_round_trip(modality: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    cfg = ScratchConfig(modality, dim=16, width=8)
    module = build_scratch(cfg).eval()
    x = torch.rand(shape) if modality != "text" else torch.randint(0, 257, shape)
    out = module(x)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    back = load_encoder(ScratchConfig.from_dict(cfg.to_dict()), save_encoder(module))
    torch.testing.assert_close(back(x), out)
    with pytest.raises(ValueError, match="do not match"):
        load_encoder(ScratchConfig(modality, dim=8, width=8), save_encoder(module))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="modality"):
        ScratchConfig("video")
    with pytest.raises(ValueError, match="image_size"):
        ScratchConfig("image", image_size=48)
    with pytest.raises(ValueError, match="dim"):
        ScratchConfig("text", dim=0)


def test_preprocessing() -> None:
    img = Image.new("RGB", (7, 5), (255, 255, 255))
    x = preprocess(ScratchConfig("image", image_size=16), img)
    assert x.shape == (1, 16, 16) and float(x.min()) == pytest.approx(1.0)
    assert preprocess(ScratchConfig("image", image_channels=3), img).shape == (3, 32, 32)
    tokens = preprocess(ScratchConfig("text", max_bytes=8), "ა  b")
    assert tokens.tolist() == [b + 1 for b in "ა b".encode()] + [0] * 3
    assert preprocess(ScratchConfig("text", max_bytes=4), "").tolist() == [0, 0, 0, 0]
    logmel = preprocess(ScratchConfig("audio", max_frames=50),
                        np.zeros(1600, dtype=np.float32))
    assert logmel.shape == (64, 50)
    with pytest.raises(TypeError):
        preprocess(ScratchConfig("text"), b"bytes")


def test_empty_text_encodes_to_finite_features() -> None:
    module = build_scratch(ScratchConfig("text", dim=8, width=4)).eval()
    assert torch.isfinite(module(torch.zeros(2, 16, dtype=torch.long))).all()


def test_feature_encoder_interface() -> None:
    cfg = ScratchConfig("text", dim=8, width=4)
    enc = ScratchFeatureEncoder(cfg, build_scratch(cfg), encoder_version(cfg, "ab" * 32),
                                max_batch=2)
    assert enc.spec.version == "scratch_byte_cnn-" + "ab" * 8 and enc.spec.dim == 8
    feats = enc.encode([enc.preprocess(t) for t in ["a", "ბ", "ć"]])
    assert feats.shape == (3, 8) and enc.encode([]).shape == (0, 8)


def _marked_words(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Words of random letters from several scripts; the class is which marker letter the word
    holds, anywhere in it."""
    rng = np.random.default_rng(seed)
    scripts = ["ႠႡႢႣႤႥႦ", "ሀለሐመሠረሰ", "ᎠᎡᎢᎣᎤᎥᎦ", "abcdefg"]
    markers = "ॐ৯ᚠ"
    words, labels = [], []
    for _ in range(n):
        letters = scripts[int(rng.integers(len(scripts)))]
        word = [letters[int(rng.integers(len(letters)))] for _ in range(int(rng.integers(3, 7)))]
        label = int(rng.integers(len(markers)))
        word.insert(int(rng.integers(len(word) + 1)), markers[label])
        words.append("".join(word))
        labels.append(label)
    return words, labels


def test_byte_cnn_learns_a_script_independent_marker() -> None:
    cfg = ScratchConfig("text", dim=16, width=16, max_bytes=32)

    def inputs(n: int, seed: int) -> InputSet:
        words, labels = _marked_words(n, seed)
        return InputSet({"text": torch.stack([preprocess(cfg, w) for w in words])},
                        torch.ones(n, 1, dtype=torch.bool), torch.tensor(labels))

    train, val = inputs(240, 0), inputs(90, 1)
    model, metrics = fit_adapted(train, val, FusionConfig({"text": 16}, 3),
                                 TrainConfig(epochs=40, patience=10, modality_dropout=0.0),
                                 {"text": cfg}, budget_seconds=60)
    assert metrics["val_macro_f1"] > 0.9, metrics
    assert metrics["seconds_per_epoch"] > 0 and metrics["stopped"] in ("patience", "epochs")
    feats = encode_all(model, val)
    assert feats.features["text"].shape == (90, 16)
    # Seeded: the same run again gives the same model.
    again, _ = fit_adapted(train, val, FusionConfig({"text": 16}, 3),
                           TrainConfig(epochs=3, modality_dropout=0.0), {"text": cfg})
    twice, _ = fit_adapted(train, val, FusionConfig({"text": 16}, 3),
                           TrainConfig(epochs=3, modality_dropout=0.0), {"text": cfg})
    torch.testing.assert_close(encode_all(again, val).features["text"],
                               encode_all(twice, val).features["text"])


def test_a_budget_stops_training() -> None:
    cfg = ScratchConfig("text", dim=8, width=4, max_bytes=16)
    words, labels = _marked_words(64, 0)
    data = InputSet({"text": torch.stack([preprocess(cfg, w) for w in words])},
                    torch.ones(64, 1, dtype=torch.bool), torch.tensor(labels))
    _, metrics = fit_adapted(data, data, FusionConfig({"text": 8}, 3),
                             TrainConfig(epochs=10_000, patience=10_000), {"text": cfg},
                             budget_seconds=0.0)
    assert metrics["stopped"] == "budget" and metrics["epochs"] == 1
    seen: list[Progress] = []
    _, metrics = fit_adapted(data, data, FusionConfig({"text": 8}, 3),
                             TrainConfig(epochs=3, patience=10), {"text": cfg},
                             on_epoch=seen.append)
    assert [p.epoch for p in seen] == [1, 2, 3] and metrics["stopped"] == "epochs"
    assert all(p.stops_by == 3 and p.val_macro_f1 is not None for p in seen)
