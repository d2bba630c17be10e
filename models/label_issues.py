"""Which given labels of a training archive look wrong: out-of-fold predicted probabilities on the
cached features, ranked by confident learning (``cleanlab``).

Each item's probabilities come from a model that never saw it: a multinomial logistic regression
over every modality's standardised features (zeros and a presence flag where the item lacks one),
fitted k times, each time leaving one fold out. Folds keep labels.csv's groups apart, as the
trainer's split does, so a speaker's other clips cannot vouch for a wrong label. (A stacked
train job brings its own out-of-fold probabilities: models.stacking.)

Confident learning then says how many labels are wrong (``cleanlab.count.num_label_issues``, the
calibrated off-diagonal of the confident joint), and the list is that many items, lowest
self-confidence first, among those whose out-of-fold prediction is not their given label; it
suggests the label the model believes. This is cleanlab's own recipe for a ranking with a cutoff
(``num_label_issues``'s documentation). ``find_label_issues``'s default filter
(``prune_by_noise_rate``) picks, per (given, believed) pair, the items of largest margin instead:
with 10 % of the training labels flipped (six seeds each, a stacked train job's out-of-fold
probabilities), its list held fewer of the flips in its first N (N = the flips) than this one:
on average 0.80 against 0.85 of them on the sample, 0.74 against 0.76 and 0.75 against 0.80 on
the far sample with 24 and 48 items per group; on the sample it often stopped short of N.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from cleanlab.count import num_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler

MAX_FOLDS = 5


@dataclass(frozen=True)
class LabelIssue:
    """One item whose given label looks wrong: its row, the class the model believes, and the
    given label's quality (0 = surely wrong, 1 = surely right)."""

    row: int
    suggested: int
    quality: float


def design_matrix(features: dict[str, np.ndarray], present: np.ndarray) -> np.ndarray:
    """Every modality's features side by side, each L2-normalised (zeros where the item lacks
    that modality), followed by one presence flag per modality: (N, sum D_m + M)."""
    blocks = []
    for x in features.values():
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        blocks.append(np.divide(x, norm, out=np.zeros_like(x), where=norm > 0))
    blocks.append(present.astype(np.float32))
    return np.concatenate(blocks, axis=1)


def out_of_fold_probabilities(x: np.ndarray, labels: Sequence[int], num_classes: int,
                              groups: Sequence[str | None] | None = None, seed: int = 0
                              ) -> np.ndarray:
    """(N, C) predicted probabilities, each row from a model fitted without that row's fold."""
    y = np.asarray(labels)
    counts = np.bincount(y, minlength=num_classes)
    folds = int(min(MAX_FOLDS, max(2, counts[counts > 0].min())))
    if groups is not None and any(g is not None for g in groups):
        ids = [g if g is not None else f"\0{i}" for i, g in enumerate(groups)]  # ungrouped: alone
        folds = min(folds, len(set(ids)))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(x, y, ids)
    else:
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y)
    probs = np.zeros((len(y), num_classes))
    with warnings.catch_warnings():
        # A class rarer than the folds, a fit stopped at max_iter: expected, not the user's to see.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        for train, held in splits:
            if len(np.unique(y[train])) < 2:  # nothing to learn from: no opinion on these rows
                probs[held] = 1.0 / num_classes
                continue
            scaler = StandardScaler().fit(x[train])
            model = LogisticRegression(C=0.1, max_iter=300).fit(scaler.transform(x[train]),
                                                                y[train])
            probs[np.ix_(held, model.classes_)] = model.predict_proba(scaler.transform(x[held]))
    # A class that a fold lacked got no probability there; keep every row a distribution.
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(axis=1, keepdims=True)


def label_issues(labels: Sequence[int], probs: np.ndarray) -> list[LabelIssue]:
    """The rows whose given label confident learning counts as wrong, worst first."""
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return []
    quality = get_label_quality_scores(y, probs, method="self_confidence")
    # "calibrated": the plain off-diagonal count undercounts with few classes (cleanlab's note)
    count = num_label_issues(y, probs, estimation_method="off_diagonal_calibrated")
    suggested = probs.argmax(axis=1)
    # an item the model agrees with is not an issue, however unsure (find_label_issues' rule;
    # not find_label_issues itself: it forks a pool unless n_jobs=1, and a fork of a worker
    # that holds torch's threads hangs)
    disputed = np.nonzero(suggested != y)[0]
    worst = disputed[np.argsort(quality[disputed], kind="stable")][:count]
    return [LabelIssue(int(i), int(suggested[i]), float(quality[i])) for i in worst]
