"""The order in which a person should review predictions, in numpy: least sure first (the margin
between the two likeliest classes), or spread over the embedding space (k-centre greedy) so that a
page is not twenty near-copies of one hard case. Imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def margin(top_k: Sequence[dict[str, Any]] | None) -> float:
    """Probability of the likeliest class minus the next one's (1.0: sure; 0.0: a coin toss)."""
    probs = sorted((float(t["probability"]) for t in top_k or []), reverse=True)
    if not probs:
        return 0.0
    return probs[0] - (probs[1] if len(probs) > 1 else 0.0)


def k_centre(vectors: np.ndarray, k: int) -> list[int]:
    """``k`` rows of ``vectors`` (N, D) spread over the space: the first row, then each time the
    row farthest (cosine) from every row chosen so far. Rows come in priority order (least sure
    first), so ties and the start favour them."""
    n = len(vectors)
    if n == 0 or k <= 0:
        return []
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float64),
                     where=norms > 0)
    chosen = [0]
    distance = 1.0 - unit @ unit[0]  # (N,) cosine distance to the nearest chosen row
    distance[0] = -np.inf
    while len(chosen) < min(k, n):
        far = int(np.argmax(distance))  # the first of equals: the least sure
        chosen.append(far)
        distance = np.minimum(distance, 1.0 - unit @ unit[far])
        distance[chosen] = -np.inf
    return chosen
