"""Bearer API keys: every /api route needs one; each key belongs to one tenant.

The tenant is the boundary: a tenant sees only its own jobs, items, results and models, and
another tenant's id answers 404, exactly like an id that does not exist.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request

from store import keys
from web.errors import ApiError


@dataclass(frozen=True)
class Principal:
    key_id: int
    tenant_id: int
    webhook_secret: str
    max_priority: str = "interactive"  # the highest priority this key's jobs may ask for


def current() -> Principal:
    return g.principal  # type: ignore[no-any-return]


def tenant_id() -> int:
    return current().tenant_id


def authenticate() -> None:
    """``before_request`` for the API blueprint."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized",
                       "send an API key as 'Authorization: Bearer <key>' "
                       "(create one with: mmbatch keys create --name NAME)",
                       headers={"WWW-Authenticate": 'Bearer realm="mmbatch"'})
    svc = current_app.extensions["mmbatch"]
    with svc.db.session() as s:
        row = keys.authenticate(s, token.strip())
        if row is None:
            raise ApiError(401, "unauthorized", "unknown or revoked API key",
                           headers={"WWW-Authenticate": 'Bearer realm="mmbatch"'})
        g.principal = Principal(row.id, row.tenant_id, row.webhook_secret,
                                row.max_priority)
    svc.limiter.check(g.principal.key_id)


class RateLimiter:
    """Requests per key per minute, in fixed windows.

    With a Redis broker the counts live in Redis, so every web process shares them; otherwise
    (the embedded default, one web process) they live in this process.
    """

    def __init__(self, per_minute: int, redis_url: str | None = None, prefix: str = "") -> None:
        self.per_minute = per_minute
        self.prefix = prefix
        self._redis: Any = None
        if redis_url and redis_url.startswith(("redis://", "rediss://")):
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2)
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int], int] = {}

    def check(self, key_id: int) -> None:
        if self.per_minute <= 0:
            return
        now = time.time()
        window = int(now // 60)
        count = self._incr(key_id, window)
        if count > self.per_minute:
            retry = max(1, int(60 - (now % 60)) + 1)
            raise ApiError(429, "rate_limited",
                           f"more than {self.per_minute} requests a minute with this key",
                           headers={"Retry-After": str(retry)})

    def _incr(self, key_id: int, window: int) -> int:
        if self._redis is not None:
            try:
                name = f"{self.prefix}mmbatch:rate:{key_id}:{window}"
                pipe = self._redis.pipeline()
                pipe.incr(name)
                pipe.expire(name, 120)
                return int(pipe.execute()[0])
            except Exception:  # the limiter must not take the API down with Redis
                pass
        with self._lock:
            for stale in [k for k in self._counts if k[1] < window]:
                del self._counts[stale]
            self._counts[(key_id, window)] = self._counts.get((key_id, window), 0) + 1
            return self._counts[(key_id, window)]
