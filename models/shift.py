"""Cheap summaries of a modality's feature distribution, and how far new data has moved.

A model version stores, per modality, the mean and standard deviation of every feature over its
training items and the leading eigenvalues of their standardised covariance (a few kilobytes).
Data to classify is compared with them through two numbers, both zero when nothing moved:

- ``mean_shift``: the root mean square over features of the standardised mean difference
  ``(mean_new - mean_train) / std_train``, corrected for the sampling noise of a mean over n
  items (``1/n`` per feature in squared units), so that a small sample of the training
  distribution scores about 0, not ``1/sqrt(n)``. It reads like Cohen's d: 0.2 small, 0.5
  medium, 0.8 large.
- ``scale_shift``: the root mean square over features of ``log(std_new / std_train)``; 0.69 is a
  spread doubled or halved on average.

``spectrum`` (the standardised covariance's leading eigenvalues, as fractions of its trace) is
stored with the summary, and compared as the total variation distance between the two
spectra (``spectrum_shift``, 0 … 1): a shift that rotates the features without moving the mean
or the per-feature spreads shows there.

Moments and spectrum miss data that sits where the training data never was while matching
them (the midpoint between two training clusters, features recombined across items). So the
summary also keeps a seeded random sample of at most KNN_SAMPLE training items' standardised
features, and the typical distance from one of them to its nearest neighbour among the others
(the median, leave-one-out, exact duplicates skipped; ``train_knn``). Both distances are divided by sqrt(D), i.e. in
per-feature root mean square units of the training standard deviation:

- ``knn_distance``: the median over the new items of the distance to the nearest sampled
  training item;
- ``knn_ratio``: ``knn_distance / train_knn_distance``: about 1 for a sample of the training
  distribution (0 for the training items themselves), well above 1 for data off it. High
  dimensions compress it: isotropic data moved by a mean shift m scores about sqrt(1 + m²/2).

Summaries stored before the sample existed load and compare as before, the three kNN scores
None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SPECTRUM_SIZE = 8
MIN_ITEMS = 5  # fewer items than this and the scores are all noise: no comparison
# A job warns when its mean shift exceeds the validation split's by this factor and is at least
# MIN_WARN_SHIFT (a validation split drawn from the training distribution scores near 0).
WARN_FACTOR = 2.0
MIN_WARN_SHIFT = 0.3
# The kNN ratio warns with the same logic on its excess over 1 (what a sample of the training
# distribution scores): above 1 + max(MIN_WARN_KNN_EXCESS, WARN_FACTOR * (validation ratio - 1)).
# A validation split of new groups that already sits further from the training items raises the
# bar. The floor 0.5: data half again as far from any training item as training items are from
# each other. Seeded Gaussian trials put 20 samples of 5 in-distribution items at most at 1.44
# with D = 8 and 1.10 with D = 32 (medians of neighbour distances concentrate as D grows; every
# encoder here has 64+ features), 40 items within 0.9 … 1.1; below D = 8 five items can cross it.
MIN_WARN_KNN_EXCESS = 0.5
KNN_SAMPLE = 1024  # training items kept for the nearest-neighbour distance
KNN_SEED = 0
# Rows of new items against the whole sample at once: a (KNN_CHUNK, KNN_SAMPLE) float32 block of
# squared distances (2 MiB), whatever the number of items or D.
KNN_CHUNK = 512
# Standardised features beyond this are clipped, in the sample and in new data alike: the sample
# is stored as float16 (largest finite value 65504), and one wild value would otherwise decide
# every distance.
Z_CLIP = 1000.0
# Sampled training items closer than this (per-feature RMS units) count as one: the training
# items' own distance skips them. Frozen MiniLM maps most made-up words to one vector, and their
# nearest-neighbour distance would otherwise be 0 and the ratio undefined. Far above float32's
# rounding of a zero distance (about 1e-4), far below any real neighbour distance (0.2 … 1).
DUPLICATE = 1e-3


@dataclass(frozen=True)
class FeatureSummary:
    """Per-feature mean and std (D,) of n items, the leading standardised eigenvalues, and a
    sample of standardised training items with its nearest-neighbour distance (None in
    summaries stored before they existed, under MIN_ITEMS training items, or all alike)."""

    n: int
    mean: np.ndarray  # (D,) float32
    std: np.ndarray  # (D,) float32, constant features stored as 1
    spectrum: np.ndarray  # (k,) float32, fractions of the trace, descending
    # (S, D) float16, S = min(n, KNN_SAMPLE): half the bytes of float32 (2.5 MiB at D = 1280),
    # and its rounding (2^-11 relative) is far below any neighbour distance that matters.
    sample: np.ndarray | None = None
    # Median leave-one-out distance to the nearest distinct sampled item / sqrt(D).
    train_knn: float | None = None

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays to store (safetensors), names prefixed ``<prefix>.``."""
        out = {f"{prefix}.mean": self.mean, f"{prefix}.std": self.std,
               f"{prefix}.spectrum": self.spectrum,
               f"{prefix}.n": np.asarray([self.n], dtype=np.float32)}
        if self.sample is not None and self.train_knn is not None:
            out[f"{prefix}.sample"] = np.ascontiguousarray(self.sample, dtype=np.float16)
            out[f"{prefix}.sample_knn"] = np.asarray([self.train_knn], dtype=np.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], prefix: str) -> FeatureSummary:
        sample = tensors.get(f"{prefix}.sample")
        knn = tensors.get(f"{prefix}.sample_knn")
        return cls(n=int(np.asarray(tensors[f"{prefix}.n"])[0]),
                   mean=np.asarray(tensors[f"{prefix}.mean"], dtype=np.float32),
                   std=np.asarray(tensors[f"{prefix}.std"], dtype=np.float32),
                   spectrum=np.asarray(tensors[f"{prefix}.spectrum"], dtype=np.float32),
                   sample=None if sample is None else np.asarray(sample, dtype=np.float16),
                   train_knn=None if knn is None else float(np.asarray(knn)[0]))


def summarize(x: np.ndarray, seed: int = KNN_SEED) -> FeatureSummary:
    """Summary of features ``x`` (N, D), N >= 1; ``seed`` picks the kNN sample."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected (N, D) features with N >= 1, got {x.shape}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    sample, train_knn = _knn_sample(x, mean, std, seed)
    return FeatureSummary(x.shape[0], mean.astype(np.float32), std.astype(np.float32),
                          _spectrum((x - mean) / std).astype(np.float32), sample, train_knn)


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std, clipped to ±Z_CLIP, float32 (N, D)."""
    return np.clip((x - mean) / std, -Z_CLIP, Z_CLIP).astype(np.float32)


def _knn_sample(x: np.ndarray, mean: np.ndarray, std: np.ndarray, seed: int
                ) -> tuple[np.ndarray | None, float | None]:
    """At most KNN_SAMPLE rows of x (N, D), drawn without replacement by ``seed``, standardised
    (S, D) float16, and their median distance to the nearest other distinct row / sqrt(D);
    (None, None) under MIN_ITEMS rows or when all sampled rows are one."""
    n = x.shape[0]
    if n < MIN_ITEMS:
        return None, None
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, KNN_SAMPLE),
                                                      replace=False))
    sample = _standardise(x[rows], mean, std).astype(np.float16)
    # Distances from the stored (float16) values, exactly what new data will be measured against.
    scale = float(np.sqrt(x.shape[1]))
    nearest = _nearest(sample.astype(np.float32), sample.astype(np.float32),
                       skip_within=DUPLICATE * scale)
    nearest = nearest[np.isfinite(nearest)]  # rows whose every other row is a duplicate: none
    if len(nearest) == 0:
        return None, None
    return sample, float(np.median(nearest)) / scale


def _nearest(z: np.ndarray, sample: np.ndarray, skip_within: float | None = None
             ) -> np.ndarray:
    """Euclidean distance from each row of z (N, D) to its nearest row of sample (S, D), (N,).

    With ``skip_within`` (z is the sample itself: leave-one-out) rows of sample at most that far
    away, the row itself and its exact duplicates, do not count; inf where none is left.

    ``|a - b|² = |a|² + |b|² - 2 a·b`` as one matrix product per KNN_CHUNK rows of z, in float32:
    the sample is float16 already, so float64 would only add digits its rounding took away.
    """
    sq_sample = np.einsum("sd,sd->s", sample, sample)  # (S,)
    out = np.empty(z.shape[0], dtype=np.float32)
    for start in range(0, z.shape[0], KNN_CHUNK):
        chunk = z[start:start + KNN_CHUNK]  # (C, D)
        d2 = np.einsum("cd,cd->c", chunk, chunk)[:, None] + sq_sample[None, :]  # (C, S)
        d2 -= 2.0 * (chunk @ sample.T)
        if skip_within is not None:
            d2[d2 <= skip_within**2] = np.inf
            rows = np.arange(chunk.shape[0])
            d2[rows, start + rows] = np.inf  # itself, whatever the rounding
        out[start:start + chunk.shape[0]] = d2.min(axis=1)
    return np.sqrt(np.clip(out, 0.0, None))  # inf stays inf


def _spectrum(z: np.ndarray) -> np.ndarray:
    """The leading eigenvalues of z's covariance as fractions of its trace (SPECTRUM_SIZE,).

    Through the (N, N) Gram matrix when N < D: the same non-zero eigenvalues, cheaper.
    """
    n = z.shape[0]
    if n < 2:
        return np.zeros(SPECTRUM_SIZE)
    zc = z - z.mean(axis=0)
    gram = zc @ zc.T if n < z.shape[1] else zc.T @ zc
    values = np.sort(np.clip(np.linalg.eigvalsh(gram), 0.0, None))[::-1]
    total = values.sum()
    out = np.zeros(SPECTRUM_SIZE)
    if total > 0:
        top = values[:SPECTRUM_SIZE] / total
        out[: len(top)] = top
    return out


def compare(reference: FeatureSummary, x: np.ndarray) -> dict[str, Any] | None:
    """How far features ``x`` (N, D) are from ``reference``; None for fewer than MIN_ITEMS.
    A JSON object: ``items`` an int, the scores floats (rounded to 4 places) or None.

    The kNN scores are None when ``reference`` has no sample (stored before it existed, or
    too few distinct training items).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != reference.mean.shape[0]:
        raise ValueError(f"expected (N, {reference.mean.shape[0]}) features, got {x.shape}")
    n = x.shape[0]
    if n < MIN_ITEMS:
        return None
    mu = reference.mean.astype(np.float64)
    sd = reference.std.astype(np.float64)
    z = (x - mu) / sd  # (N, D)
    zbar = z.mean(axis=0)  # (D,)
    mean_shift = float(np.sqrt(max(0.0, float(np.mean(zbar**2)) - 1.0 / n)))
    spread = np.maximum(z.std(axis=0), 1e-6)  # (D,) std_new / std_train
    scale_shift = float(np.sqrt(np.mean(np.log(spread) ** 2)))
    spectrum = _spectrum(z)
    spectrum_shift = 0.5 * float(np.abs(spectrum - reference.spectrum.astype(np.float64)).sum())
    knn_distance: float | None = None
    knn_ratio: float | None = None
    train_knn: float | None = None
    if reference.sample is not None and reference.train_knn is not None:
        nearest = _nearest(_standardise(x, mu, sd), reference.sample.astype(np.float32))
        knn_distance = float(np.median(nearest)) / float(np.sqrt(x.shape[1]))
        knn_ratio = round(knn_distance / reference.train_knn, 4)  # train_knn > DUPLICATE
        knn_distance, train_knn = round(knn_distance, 4), round(reference.train_knn, 4)
    return {"items": n, "mean_shift": round(mean_shift, 4), "scale_shift": round(scale_shift, 4),
            "spectrum_shift": round(spectrum_shift, 4), "knn_distance": knn_distance,
            "train_knn_distance": train_knn, "knn_ratio": knn_ratio}


def warning(modality: str, scores: dict[str, Any] | None, baseline: dict[str, Any] | None
            ) -> str | None:
    """A sentence when ``scores`` (new data) move clearly further than ``baseline`` (the
    validation split against the same training summary) in mean shift or kNN ratio, else
    None."""
    if scores is None:
        return None
    reasons: list[str] = []
    base = float(baseline["mean_shift"]) if baseline else 0.0
    limit = max(MIN_WARN_SHIFT, WARN_FACTOR * base)
    if scores["mean_shift"] > limit:
        reasons.append(f"mean shift {scores['mean_shift']:.2f} against {base:.2f} on "
                       f"validation, warning above {limit:.2f}")
    ratio = scores.get("knn_ratio")
    if ratio is not None:
        # No validation ratio (no validation split, or one stored before kNN): 1, what a sample
        # of the training distribution scores, as the mean shift's 0.
        base_ratio = (baseline or {}).get("knn_ratio")
        base_ratio = 1.0 if base_ratio is None else float(base_ratio)
        limit_ratio = 1.0 + max(MIN_WARN_KNN_EXCESS, WARN_FACTOR * (base_ratio - 1.0))
        if ratio > limit_ratio:
            reasons.append(f"nearest training item {ratio:.2f} times as far as training items "
                           f"are from each other, against {base_ratio:.2f} on validation, "
                           f"warning above {limit_ratio:.2f}")
    if not reasons:
        return None
    return (f"{modality} features differ from the training data ({'; '.join(reasons)}): "
            "predictions may be less accurate than validation suggests")
