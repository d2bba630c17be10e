"""Per-item explanations: weights where a strategy has them, leave-one-out for all."""

from __future__ import annotations

import json

import pytest
import torch

from mmbatch.contract import STRATEGIES
from models import TrainConfig, explain, fit, predict
from tests.test_fusion import ALL_MASKS
from tests.test_models import random_inputs, synthetic, tiny_cfg


@pytest.fixture(scope="module")
def trained() -> dict[str, object]:
    data, _ = synthetic(n_per_class=10)
    return {s: fit(data, None, tiny_cfg(strategy=s), TrainConfig(epochs=15, seed=0))[0]
            for s in STRATEGIES}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_explanations_cover_the_present_modalities(strategy: str, trained: dict) -> None:
    model = trained[strategy]
    feats, _ = random_inputs(model.cfg, len(ALL_MASKS), seed=3)
    notes = explain(model, feats, ALL_MASKS, temperature=1.5)
    assert len(notes) == len(ALL_MASKS)
    assert json.loads(json.dumps(notes)) == notes
    probs, _ = predict(model, feats, ALL_MASKS, temperature=1.5)
    for row, note in zip(ALL_MASKS.tolist(), notes, strict=True):
        present = [m for m, on in zip(model.modalities, row, strict=True) if on]
        assert note["strategy"] == strategy
        assert list(note["leave_one_out"]) == present
        if strategy == "concat":
            assert note["weights"] is None
        else:
            assert list(note["weights"]) == present
            assert sum(note["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    # Leave-one-out is the drop in the predicted class's probability: recompute one by hand.
    row = 0
    predicted = int(probs[row].argmax())
    reduced = ALL_MASKS.clone()
    reduced[:, 0] = False
    without_image, _ = predict(model, feats, reduced, temperature=1.5)
    expected = float(probs[row, predicted] - without_image[row, predicted])
    assert notes[row]["leave_one_out"]["image"] == pytest.approx(expected, abs=1e-5)


def test_the_modality_that_decides_has_the_largest_effect() -> None:
    """Only the image carries the label here: leaving it out must hurt most."""
    g = torch.Generator().manual_seed(0)
    n = 90
    labels = torch.arange(3).repeat_interleave(n // 3)
    centroids = 3.0 * torch.randn(3, 12, generator=g)
    feats = {"image": centroids[labels] + 0.3 * torch.randn(n, 12, generator=g),
             "text": torch.randn(n, 8, generator=g), "audio": torch.randn(n, 6, generator=g)}
    from models import FeatureSet

    data = FeatureSet(feats, torch.ones(n, 3, dtype=torch.bool), labels)
    for strategy in ("concat", "gated", "attention"):
        model, _ = fit(data, None, tiny_cfg(strategy=strategy), TrainConfig(epochs=40, seed=0))
        notes = explain(model, feats, data.mask)
        mean = {m: sum(nt["leave_one_out"][m] for nt in notes) / n for m in ("image", "text",
                                                                            "audio")}
        assert mean["image"] > 0.05 and mean["image"] > 3 * max(mean["text"], mean["audio"]), \
            (strategy, mean)


def test_explain_validates_and_restores_mode(trained: dict) -> None:
    model = trained["gated"].train()
    feats, mask = random_inputs(model.cfg, 2)
    explain(model, feats, mask)
    assert model.training
    with pytest.raises(ValueError, match="temperature"):
        explain(model, feats, mask, temperature=0.0)
