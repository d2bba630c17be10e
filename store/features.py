"""The feature cache: encoder outputs keyed by (content hash, encoder version).

The same file uploaded twice, or reprocessed with a new classifier head, is never encoded again.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from store.schema import Feature, utcnow
from store.upsert import insert_new

LOOKUP_CHUNK = 500


def get_features(session: Session, encoder: str, blobs: Iterable[str]) -> dict[str, np.ndarray]:
    wanted = sorted(set(blobs))
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(wanted), LOOKUP_CHUNK):
        chunk = wanted[start:start + LOOKUP_CHUNK]
        stmt = select(Feature.blob, Feature.vector).where(Feature.encoder == encoder,
                                                          Feature.blob.in_(chunk))
        for blob, vector in session.execute(stmt):
            found[blob] = np.frombuffer(vector, dtype="<f4")
    return found


def get_prefixed_features(session: Session, prefix: str, blobs: Iterable[str]
                          ) -> dict[str, dict[str, np.ndarray]]:
    """Per blob, every cached feature whose encoder key starts with ``prefix``, by that key (a
    clip's frames: one key per frame time, models.video.frame_version)."""
    wanted = sorted(set(blobs))
    found: dict[str, dict[str, np.ndarray]] = {}
    for start in range(0, len(wanted), LOOKUP_CHUNK):
        chunk = wanted[start:start + LOOKUP_CHUNK]
        stmt = select(Feature.blob, Feature.encoder, Feature.vector).where(
            Feature.blob.in_(chunk), Feature.encoder.startswith(prefix, autoescape=True))
        for blob, encoder, vector in session.execute(stmt):
            found.setdefault(blob, {})[encoder] = np.frombuffer(vector, dtype="<f4")
    return found


def put_features(session: Session, encoder: str, vectors: Mapping[str, np.ndarray]) -> int:
    rows = [{"blob": blob, "encoder": encoder, "dim": int(vec.shape[-1]),
             "vector": np.asarray(vec, dtype="<f4").tobytes(), "created_at": utcnow()}
            for blob, vec in vectors.items()]
    inserted = 0
    for start in range(0, len(rows), LOOKUP_CHUNK):
        inserted += len(insert_new(session, Feature.__table__, rows[start:start + LOOKUP_CHUNK],
                                   ("blob", "encoder"), ("id",)))
    return inserted
