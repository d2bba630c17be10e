"""Video features: a clip's sampled frames (media.video) through the frozen image encoder,
pooled over time.

A clip has no network of its own: each sampled frame is an image to ``models.image``'s encoder
(batched with the archive's images by the worker), and the clip's ``video`` features are the
frames' features pooled over time, their mean and their standard deviation side by side
(2 x 1280). The mean says what the clip shows; the spread says how much that changes (a static
shot has none). Both are cheap, order-free and defined for any number of frames, so a clip whose
black or duplicate frames were skipped still pools to the same size.
"""

from __future__ import annotations

import numpy as np

from models import image
from models.spec import EncoderSpec

SPEC = EncoderSpec("video", "frames_meanstd", f"frames-meanstd-v1+{image.SPEC.version}",
                   2 * image.SPEC.dim)


def pool_frames(frames: np.ndarray) -> np.ndarray:
    """Frame features (K, D), K >= 1, in time order -> the clip's features (2D,): mean over
    time, then standard deviation over time (zeros for one frame)."""
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != image.SPEC.dim:
        raise ValueError(f"expected (K >= 1, {image.SPEC.dim}) frame features, got {x.shape}")
    return np.concatenate([x.mean(axis=0), x.std(axis=0)]).astype("<f4")  # (2D,)


FRAME_PREFIX = f"{image.SPEC.version}@t="  # what every frame's cache key starts with


def frame_version(seconds: float) -> str:
    """The feature cache's encoder key of one frame at ``seconds`` in its clip (the blob is the
    clip's): the image encoder's version and the frame's time, to the millisecond."""
    return f"{FRAME_PREFIX}{seconds:.3f}"


def frame_time(version: str) -> float | None:
    """The time in seconds a frame's cache key names (``frame_version``'s inverse); None for a
    key that is not a frame's of the current image encoder."""
    if not version.startswith(FRAME_PREFIX):
        return None
    try:
        return float(version[len(FRAME_PREFIX):])
    except ValueError:
        return None
