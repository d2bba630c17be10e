"""The aligner (models.align) on the paired sample's real frozen features: trained heads find a
caption's picture far above chance on a group-disjoint validation split, a tiny archive gets the
training-free anchors method, and a checkpoint reloads to the same vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.align import (
    TINY,
    Aligner,
    AlignerConfig,
    PairedFeatures,
    PartConfig,
    TrainSettings,
    embed_items,
    info_nce,
    item_vector,
    load_aligner,
    recall_report,
    save_aligner,
    train_aligner,
)
from samples.paired import write_paired
from tests.paired_features import PairedSet, paired_set

FAST = TrainSettings(epochs=60, patience=15, eval_every=5, seed=0)


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> PairedSet:
    # 11 rolls of 24: about 216 training pairs, over the tiny-archive limit, and 2 held-out rolls
    torch.manual_seed(0)
    # pictures and captions only: what the assertions are about, and half the encoding time
    return paired_set(tmp_path_factory.mktemp("paired"), n_train=264,
                      modalities=("image", "text"))


def test_the_validation_split_keeps_rolls_apart(paired: PairedSet) -> None:
    train = {paired.groups[i] for i in paired.train_idx}
    val = {paired.groups[i] for i in paired.val_idx}
    assert train and val and not train & val
    assert len(paired.train_idx) >= TINY


def test_trained_aligner_finds_captions_pictures_far_above_chance(paired: PairedSet) -> None:
    trained = train_aligner(paired.data, paired.train_idx, paired.val_idx, FAST)
    assert trained.method in ("linear", "mlp", "linear+mlp", "mlp+linear")
    assert {c["method"] for c in trained.candidates} >= {"linear", "mlp"}
    report = trained.validation
    assert report is not None
    queries = report["text->image"]["queries"]
    assert queries == len(paired.val_idx)
    chance_at_10 = 10 / queries
    # measured 0.5-0.8 R@10 on such splits; chance is about 0.2 here
    assert report["text->image"]["r@10"] >= 2.5 * chance_at_10
    assert report["image->text"]["r@10"] >= 2.5 * chance_at_10
    assert report["text->image"]["r@1"] >= 3 * (1 / queries)
    # the refit model embeds every modality it was trained on, as unit vectors
    z = trained.model.embed("text", paired.data.features["text"][:4])
    assert z.shape == (4, trained.model.dim)
    assert torch.allclose(z.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_a_tiny_archive_gets_the_training_free_method(paired: PairedSet) -> None:
    small_train = paired.train_idx[:60]
    trained = train_aligner(paired.data, small_train, paired.val_idx, FAST)
    assert trained.method == "anchors"
    assert trained.epochs == 0
    report = trained.validation
    assert report is not None
    queries = report["text->image"]["queries"]
    assert report["text->image"]["r@10"] >= 1.5 * 10 / queries


def test_checkpoint_round_trip_gives_the_same_vectors(paired: PairedSet) -> None:
    torch.manual_seed(0)
    dims = {m: int(x.shape[1]) for m, x in paired.data.features.items()}
    model = Aligner(AlignerConfig(dims, (PartConfig("linear", dim=32),
                                         PartConfig("mlp", dim=16, hidden=64))))
    data, config = save_aligner(model.eval())
    again = load_aligner(data, config)
    feats = [{"text": paired.data.features["text"][i].numpy(),
              "image": paired.data.features["image"][i].numpy()} for i in range(3)]
    a, b = embed_items(model, feats), embed_items(again, feats)
    for x, y in zip(a, b, strict=True):
        assert set(x) == {"text", "image"}
        np.testing.assert_allclose(x["text"], y["text"], atol=1e-6)
    mean = item_vector(a[0])
    assert mean is not None and abs(float(np.linalg.norm(mean)) - 1) < 1e-5
    with pytest.raises(ValueError, match="checkpoint config"):
        load_aligner(data, {**config, "format": "other"})
    with pytest.raises(ValueError, match="audio"):
        Aligner(AlignerConfig({"text": 4}, (PartConfig("linear", dim=2),))).embed(
            "audio", torch.zeros(1, 4))


def test_infonce_prefers_matched_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    za = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    assert info_nce(za, za, scale) < info_nce(za, noise, scale)
    assert info_nce(za, za, scale, hard_negatives=1.0) < info_nce(za, noise, scale, 1.0)


def test_items_missing_a_modality_are_left_out_of_that_direction() -> None:
    feats = {"text": torch.eye(4), "image": torch.eye(4)}
    mask = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    data = PairedFeatures(feats, mask)
    assert data.pairs() == [("text", "image")]
    model = Aligner(AlignerConfig({"text": 4, "image": 4}, (PartConfig("linear", dim=4),)))
    report = recall_report(model.eval(), data)
    assert report["text->image"]["queries"] == 3
    with pytest.raises(ValueError, match="nothing to align"):
        train_aligner(PairedFeatures({"text": torch.eye(4)}, torch.ones(4, 1, dtype=torch.bool)),
                      [0, 1], [2, 3])


def test_paired_sample_is_deterministic(tmp_path: Path) -> None:
    a = write_paired(tmp_path / "a", n_train=8, n_gallery=2, seed=3)
    b = write_paired(tmp_path / "b", n_train=8, n_gallery=2, seed=3)
    assert a.train.read_bytes() == b.train.read_bytes()
    assert a.captions.read_bytes() == b.captions.read_bytes()
