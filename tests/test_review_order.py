"""mmbatch.review: margins and the k-centre spread of a review page."""

from __future__ import annotations

import numpy as np

from mmbatch.review import k_centre, margin


def test_margin_is_the_gap_between_the_two_likeliest() -> None:
    assert margin([{"label": "a", "probability": 0.5}, {"label": "b", "probability": 0.3}]) \
        == 0.5 - 0.3
    assert margin([{"label": "b", "probability": 0.2}, {"label": "a", "probability": 0.7}]) \
        == 0.7 - 0.2
    assert margin([{"label": "a", "probability": 0.9}]) == 0.9
    assert margin([]) == 0.0 and margin(None) == 0.0


def test_k_centre_takes_one_of_each_cluster_before_a_second_of_any() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 10
    rows = np.concatenate([c + rng.normal(scale=0.1, size=(5, 4)) for c in centres])
    order = rng.permutation(len(rows))
    picked = k_centre(rows[order], 4)
    assert picked[0] == 0
    assert len({int(order[i]) // 5 for i in picked}) == 4


def test_k_centre_copes_with_copies_few_rows_and_zeros() -> None:
    same = np.ones((3, 2))
    assert sorted(k_centre(same, 3)) == [0, 1, 2]
    assert k_centre(np.zeros((2, 3)), 5) == [0, 1]
    assert k_centre(np.zeros((0, 3)), 2) == []
