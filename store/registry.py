"""Model versions: register, look up, and choose the default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.schema import MAX_ID, ModelVersion


class ModelNotFound(LookupError):
    pass


ANY_TENANT = -1  # for worker code, which acts on ids it was given


@dataclass(frozen=True)
class ModelRow:
    """A model version as the worker uses it: what to load and what it was trained on."""

    id: int
    tenant_id: int | None
    name: str
    version: int
    classes: list[str]
    encoders: dict[str, Any]  # modality -> {"name", "version", "dim", "mode", ...}
    config: dict[str, Any]  # the checkpoint's config, own encoders, temperature, shift
    checkpoint_blob: str
    kind: str = "classifier"  # mmbatch.contract.MODEL_KINDS

    @classmethod
    def of(cls, m: ModelVersion) -> ModelRow:
        return cls(m.id, m.tenant_id, m.name, m.version, list(m.classes), dict(m.encoders or {}),
                   dict(m.config or {}), m.checkpoint_blob, m.kind)


def _owned(tenant_id: int | None):  # type: ignore[no-untyped-def]
    """Models are per tenant; tenant None is the unauthenticated (pre-keys) scope."""
    if tenant_id is None:
        return ModelVersion.tenant_id.is_(None)
    return ModelVersion.tenant_id == tenant_id


def get_model(session: Session, model_id: int, tenant_id: int | None = ANY_TENANT
              ) -> ModelVersion:
    model = session.get(ModelVersion, model_id) if 0 < model_id <= MAX_ID else None
    if model is None or (tenant_id != ANY_TENANT and model.tenant_id != tenant_id):
        raise ModelNotFound(model_id)
    return model


def default_model(session: Session, tenant_id: int | None = None, kind: str = "classifier"
                  ) -> ModelVersion | None:
    """The tenant's default model of ``kind`` (defaults are per tenant and kind)."""
    return session.scalars(select(ModelVersion)
                           .where(ModelVersion.is_default.is_(True), _owned(tenant_id),
                                  ModelVersion.kind == kind)
                           .order_by(ModelVersion.id.desc()).limit(1)).first()


def list_models(session: Session, tenant_id: int | None = None) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).where(_owned(tenant_id))
                                .order_by(ModelVersion.id)))


def register_model(session: Session, *, name: str, fusion: str, classes: list[str],
                   encoders: dict[str, Any], metrics: dict[str, Any], config: dict[str, Any],
                   checkpoint_blob: str, job_id: str | None,
                   tenant_id: int | None = None, kind: str = "classifier") -> ModelVersion:
    """Add the next version of ``name``; it becomes the tenant's default of its kind when the
    tenant has none of that kind."""
    latest = session.scalar(select(func.max(ModelVersion.version))
                            .where(ModelVersion.name == name, _owned(tenant_id)))
    model = ModelVersion(name=name, version=(latest or 0) + 1, fusion=fusion, classes=classes,
                         encoders=encoders, metrics=metrics, config=config,
                         checkpoint_blob=checkpoint_blob, job_id=job_id, tenant_id=tenant_id,
                         kind=kind, is_default=default_model(session, tenant_id, kind) is None)
    session.add(model)
    session.flush()
    return model


def promote(session: Session, model_id: int, tenant_id: int | None = ANY_TENANT
            ) -> ModelVersion:
    """Make the model its tenant's default of its kind: the defaults of other kinds stay."""
    model = get_model(session, model_id, tenant_id)
    session.execute(update(ModelVersion).where(ModelVersion.id != model_id,
                                               _owned(model.tenant_id),
                                               ModelVersion.kind == model.kind)
                    .values(is_default=False))
    model.is_default = True
    return model
