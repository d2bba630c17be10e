"""models.label_issues: out-of-fold probabilities and confident learning find planted label flips."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from models.label_issues import design_matrix, label_issues, out_of_fold_probabilities
from samples.noise import flip_labels, read_labels


def _clusters(seed: int, n: int = 400, classes: int = 4) -> tuple[dict[str, np.ndarray],
                                                                   np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = {m: rng.normal(size=(classes, d)) for m, d in (("image", 48), ("text", 24))}
    feats = {m: (c[y] + 0.9 * rng.normal(size=(n, c.shape[1]))).astype(np.float32)
             for m, c in centres.items()}
    present = np.ones((n, 2), dtype=bool)
    present[rng.random(n) < 0.2, 1] = False  # a fifth without text
    feats["text"][~present[:, 1]] = 0
    return feats, present, y


def _flip(y: np.ndarray, share: float, classes: int, seed: int) -> tuple[np.ndarray, set[int]]:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(y), int(share * len(y)), replace=False)
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, classes, len(rows))) % classes
    return noisy, set(rows.tolist())


def test_planted_flips_are_found_worst_first_with_the_true_label_suggested() -> None:
    feats, present, y = _clusters(0)
    noisy, flipped = _flip(y, 0.1, 4, 1)
    x = design_matrix(feats, present)
    probs = out_of_fold_probabilities(x, noisy.tolist(), 4, seed=0)
    assert probs.shape == (400, 4) and np.allclose(probs.sum(axis=1), 1)
    issues = label_issues(noisy.tolist(), probs)
    top = [i.row for i in issues[:len(flipped)]]
    recall = len(set(top) & flipped) / len(flipped)
    precision = len(set(top) & flipped) / max(1, len(top))
    assert recall >= 0.7 and precision >= 0.6, (recall, precision)
    qualities = [i.quality for i in issues]
    assert qualities == sorted(qualities)  # worst first
    right = [i for i in issues if i.row in flipped]
    assert sum(i.suggested == y[i.row] for i in right) >= 0.8 * len(right)


def test_clean_labels_give_few_issues() -> None:
    feats, present, y = _clusters(2)
    probs = out_of_fold_probabilities(design_matrix(feats, present), y.tolist(), 4, seed=0)
    assert len(label_issues(y.tolist(), probs)) <= 0.05 * len(y)


def test_groups_stay_in_one_fold_and_a_missing_class_in_a_fold_is_not_an_error() -> None:
    feats, present, y = _clusters(3, n=60, classes=3)
    y[:2] = 2  # keep the rare class
    groups = [f"g{i // 6}" for i in range(60)]  # ten groups of six
    probs = out_of_fold_probabilities(design_matrix(feats, present), y.tolist(), 3,
                                      groups=groups, seed=0)
    assert probs.shape == (60, 3) and np.isfinite(probs).all()
    assert np.allclose(probs.sum(axis=1), 1)


def test_one_class_has_no_issues() -> None:
    assert label_issues([0, 0, 0], np.full((3, 2), 0.5)) == []


def test_a_class_with_one_item_gets_probabilities_not_an_error() -> None:
    feats, present, y = _clusters(4, n=30, classes=2)
    y[0] = 2  # a third class, once
    probs = out_of_fold_probabilities(design_matrix(feats, present), y.tolist(), 3, seed=0)
    assert probs.shape == (30, 3) and np.allclose(probs.sum(axis=1), 1)


def test_an_item_the_model_agrees_with_is_never_listed() -> None:
    feats, present, y = _clusters(5)
    noisy, _ = _flip(y, 0.1, 4, 6)
    probs = out_of_fold_probabilities(design_matrix(feats, present), noisy.tolist(), 4, seed=0)
    issues = label_issues(noisy.tolist(), probs)
    assert issues and all(i.suggested != noisy[i.row] for i in issues)


def test_flips_spare_the_validation_items_named(tmp_path: Path) -> None:
    source = tmp_path / "a.tar.gz"
    rows = "key,label,group\n" + "".join(f"k{i},{'ab'[i % 2]},g{i // 4}\n" for i in range(40))
    with tarfile.open(source, "w:gz") as tf:
        info = tarfile.TarInfo("labels.csv")
        info.size = len(rows)
        tf.addfile(info, io.BytesIO(rows.encode()))
    val = {f"k{i}" for i in range(8)}
    flipped = flip_labels(source, tmp_path / "b.tar.gz", 0.5, seed=1, val=val)
    written = read_labels(tmp_path / "b.tar.gz")
    assert len(flipped) == 16 and not set(flipped) & val  # half of the 32 training items
    assert {r["key"] for r in written if r["split"] == "val"} == val
