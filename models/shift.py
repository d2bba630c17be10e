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


@dataclass(frozen=True)
class FeatureSummary:
    """Per-feature mean and std (D,) of n items, and the leading standardised eigenvalues."""

    n: int
    mean: np.ndarray  # (D,) float32
    std: np.ndarray  # (D,) float32, constant features stored as 1
    spectrum: np.ndarray  # (k,) float32, fractions of the trace, descending

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays to store (safetensors), names prefixed ``<prefix>.``."""
        return {f"{prefix}.mean": self.mean, f"{prefix}.std": self.std,
                f"{prefix}.spectrum": self.spectrum,
                f"{prefix}.n": np.asarray([self.n], dtype=np.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], prefix: str) -> FeatureSummary:
        return cls(n=int(np.asarray(tensors[f"{prefix}.n"])[0]),
                   mean=np.asarray(tensors[f"{prefix}.mean"], dtype=np.float32),
                   std=np.asarray(tensors[f"{prefix}.std"], dtype=np.float32),
                   spectrum=np.asarray(tensors[f"{prefix}.spectrum"], dtype=np.float32))


def summarize(x: np.ndarray) -> FeatureSummary:
    """Summary of features ``x`` (N, D), N >= 1."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected (N, D) features with N >= 1, got {x.shape}")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    return FeatureSummary(x.shape[0], mean.astype(np.float32), std.astype(np.float32),
                          _spectrum((x - mean) / std).astype(np.float32))


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


def compare(reference: FeatureSummary, x: np.ndarray) -> dict[str, float | int] | None:
    """How far features ``x`` (N, D) are from ``reference``; None for fewer than MIN_ITEMS."""
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
    return {"items": n, "mean_shift": round(mean_shift, 4), "scale_shift": round(scale_shift, 4),
            "spectrum_shift": round(spectrum_shift, 4)}


def warning(modality: str, scores: dict[str, Any] | None, baseline: dict[str, Any] | None
            ) -> str | None:
    """A sentence when ``scores`` (new data) move clearly further than ``baseline`` (the
    validation split against the same training summary), else None."""
    if scores is None:
        return None
    base = float(baseline["mean_shift"]) if baseline else 0.0
    limit = max(MIN_WARN_SHIFT, WARN_FACTOR * base)
    if scores["mean_shift"] <= limit:
        return None
    return (f"{modality} features differ from the training data (mean shift "
            f"{scores['mean_shift']:.2f} against {base:.2f} on validation, warning above "
            f"{limit:.2f}): predictions may be less accurate than validation suggests")
