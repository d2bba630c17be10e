"""Model versions: register, look up, and choose the default."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.schema import ModelVersion


class ModelNotFound(LookupError):
    pass


def get_model(session: Session, model_id: int) -> ModelVersion:
    model = session.get(ModelVersion, model_id)
    if model is None:
        raise ModelNotFound(model_id)
    return model


def default_model(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.is_default.is_(True))
                           .order_by(ModelVersion.id.desc()).limit(1)).first()


def list_models(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def register_model(session: Session, *, name: str, fusion: str, classes: list[str],
                   encoders: dict[str, Any], metrics: dict[str, Any], config: dict[str, Any],
                   checkpoint_blob: str, job_id: str | None) -> ModelVersion:
    """Add the next version of ``name``; it becomes the default when there is none yet."""
    latest = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == name))
    model = ModelVersion(name=name, version=(latest or 0) + 1, fusion=fusion, classes=classes,
                         encoders=encoders, metrics=metrics, config=config,
                         checkpoint_blob=checkpoint_blob, job_id=job_id,
                         is_default=default_model(session) is None)
    session.add(model)
    session.flush()
    return model


def promote(session: Session, model_id: int) -> ModelVersion:
    model = get_model(session, model_id)
    session.execute(update(ModelVersion).where(ModelVersion.id != model_id)
                    .values(is_default=False))
    model.is_default = True
    return model
