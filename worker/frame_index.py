"""A clip's sampled frames in a search index: each frame's cached image features through the
aligner's image side (as a picture's are), indexed as separate vectors of the ``video``
modality with the frame's time, so that a search finds the moment of a clip, not only the clip.

Both ways vectors reach an index use it: an aligner's batch (``worker.batch``, a segment) and
an index build (``worker.index_build``, from the feature cache). Frames are never decoded or
encoded here: the batch that read a clip cached its frames' features under
``models.video.frame_version`` keys. A clip whose frames are not in the cache (cached before
frames were, or under another image encoder's version) keeps its pooled ``video`` vector when
the aligner embeds ``video``, and is counted as such (``IndexVectors.missing``); the nightly
reprocess does not bring its frames back, a new upload of the clip does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from models.align import Aligner, embed_items
from models.video import FRAME_PREFIX, frame_time
from store import features as feature_cache
from worker.vector_index import Vectors

FRAME_SIDE = "image"  # the aligner's head a clip's frames go through
CLIP = "video"  # the index modality that holds them

Frames = list[tuple[float, np.ndarray]]  # (seconds, image features (D,)), in time order


@dataclass(frozen=True)
class IndexEntry:
    """One item on its way into an index: its aligned vector of each modality, and the blob of
    its clip when it has one."""

    item_id: int
    vectors: Mapping[str, np.ndarray]
    clip: str | None = None


@dataclass(frozen=True)
class IndexVectors:
    arrays: dict[str, Vectors]  # per modality (ids, vectors[, times]): a segment's contents
    frames: int  # frame vectors among them
    missing: int  # clips whose frames were not cached (indexed by their pooled vector, if any)
    clips: dict[int, np.ndarray]  # item id -> the normalised mean of its clip's frame vectors

    def item_vectors(self, item_id: int, vectors: Mapping[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
        """The item's aligned vectors for its one item vector (``models.align.item_vector``):
        its clip's frames, averaged, stand for ``video`` where the aligner has no video head,
        so that a clip alone still has an item vector ("items like this one")."""
        mean = self.clips.get(item_id)
        if mean is None or CLIP in vectors:
            return dict(vectors)
        return {**vectors, CLIP: mean}


def cached_frames(s: Session, clips: Sequence[str]) -> dict[str, Frames]:
    """Each clip's cached frame features, in time order (clips with none are left out)."""
    found = feature_cache.get_prefixed_features(s, FRAME_PREFIX, clips)
    out: dict[str, Frames] = {}
    for blob, by_key in found.items():
        timed = [(t, v) for key, v in by_key.items() if (t := frame_time(key)) is not None]
        if timed:
            out[blob] = sorted(timed, key=lambda f: f[0])
    return out


def index_vectors(aligner: Aligner, entries: Sequence[IndexEntry],
                  frames: Mapping[str, Frames]) -> IndexVectors:
    """The vectors an index holds for ``entries``: each modality's aligned vector, except that
    a clip whose frames are cached is its frames (through the aligner's image side, with their
    times) rather than its pooled ``video`` vector. ``video`` vectors always carry times (NaN
    for a pooled one); the others carry none, as before frames were indexed."""
    by_frame = FRAME_SIDE in aligner.modalities
    per: dict[str, tuple[list[int], list[np.ndarray], list[float]]] = {}
    pending: list[tuple[int, float, np.ndarray]] = []
    missing = 0
    for e in entries:
        got = frames.get(e.clip) if e.clip is not None and by_frame else None
        if e.clip is not None and by_frame and not got:
            missing += 1
        for m, v in e.vectors.items():
            if m == CLIP and got:
                continue  # its frames stand in for the pooled vector
            ids, vecs, times = per.setdefault(m, ([], [], []))
            ids.append(e.item_id)
            vecs.append(v)
            times.append(np.nan)
        pending.extend((e.item_id, t, f) for t, f in got or ())
    by_clip: dict[int, list[np.ndarray]] = {}
    if pending:
        aligned = embed_items(aligner, [{FRAME_SIDE: f} for _, _, f in pending])
        ids, vecs, times = per.setdefault(CLIP, ([], [], []))
        for (item_id, t, _), a in zip(pending, aligned, strict=True):
            ids.append(item_id)
            vecs.append(a[FRAME_SIDE])
            times.append(t)
            by_clip.setdefault(item_id, []).append(a[FRAME_SIDE])
    arrays: dict[str, Vectors] = {}
    for m, (ids, vecs, times) in per.items():
        arrays[m] = (np.array(ids, dtype=np.int64), np.stack(vecs).astype(np.float32))
        if m == CLIP:
            arrays[m] += (np.array(times, dtype=np.float32),)
    return IndexVectors(arrays, len(pending), missing,
                        {i: _unit(np.mean(np.stack(v), axis=0)) for i, v in by_clip.items()})


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / max(float(np.linalg.norm(x)), 1e-12)).astype(np.float32)


def clip_query(aligner: Aligner, frame_features: np.ndarray) -> np.ndarray | None:
    """An uploaded clip as one query vector: its sampled frames' image features (K, D) through
    the aligner's image side, averaged and normalised (a frame-by-frame search would ask K
    queries; the mean finds what the clip shows throughout). None when the aligner has no
    image side."""
    if FRAME_SIDE not in aligner.modalities or len(frame_features) == 0:
        return None
    aligned = embed_items(aligner, [{FRAME_SIDE: f} for f in frame_features])
    return _unit(np.mean(np.stack([a[FRAME_SIDE] for a in aligned]), axis=0))
