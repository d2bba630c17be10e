"""Tenants and API keys. A key is shown once, at creation; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.schema import ApiKey, Tenant, utcnow

KEY_PREFIX = "mmb_"


@dataclass(frozen=True)
class NewKey:
    key: str             # the bearer token: shown once, never stored
    webhook_secret: str  # signs this key's webhooks
    key_id: int
    tenant_id: int
    tenant: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, name: str, tenant: str | None = None,
               max_priority: str = "interactive") -> NewKey:
    """A new key for ``tenant`` (created if missing), or for a new tenant named after the key."""
    if tenant is None:
        base = name
        tenant = base
        n = 1
        while session.scalar(select(Tenant.id).where(Tenant.name == tenant)) is not None:
            n += 1
            tenant = f"{base}-{n}"
    owner = get_or_create_tenant(session, tenant)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    secret = secrets.token_hex(32)
    row = ApiKey(tenant_id=owner.id, name=name, key_hash=hash_key(key), prefix=key[:12],
                 webhook_secret=secret, max_priority=max_priority)
    session.add(row)
    session.flush()
    return NewKey(key, secret, row.id, owner.id, owner.name)


def authenticate(session: Session, key: str) -> ApiKey | None:
    if not key.startswith(KEY_PREFIX):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                              ApiKey.revoked_at.is_(None)))
    return row


def touch(session: Session, key_id: int) -> None:
    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))


def count_keys(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ApiKey)) or 0)


def revoke(session: Session, key_id: int) -> bool:
    return session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                           .values(revoked_at=utcnow())).rowcount == 1


def list_keys(session: Session) -> list[tuple[ApiKey, str]]:
    rows = session.execute(select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
                           .order_by(ApiKey.id))
    return [(k, t) for k, t in rows]
