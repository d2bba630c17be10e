"""The embedded default's first API key: made on first start, kept in ``$DATA_DIR/api-key``."""

from __future__ import annotations

import os
from pathlib import Path

from mmbatch.settings import Settings
from store import keys
from store.db import Database

KEY_FILE = "api-key"


def key_path(settings: Settings) -> Path:
    return settings.data_dir / KEY_FILE


def ensure_first_key(settings: Settings) -> str | None:
    """Create a tenant and key when the database has no key at all; returns the new key."""
    db = Database(settings.db_url)
    try:
        with db.session() as s:
            if keys.count_keys(s):
                return None
            new = keys.create_key(s, "first", tenant="default")
    finally:
        db.dispose()
    path = key_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new.key + "\n")
    return new.key


def client_key(settings: Settings) -> str | None:
    """The key the command line sends: MMBATCH_API_KEY, else the embedded default's key file."""
    key = os.environ.get("MMBATCH_API_KEY", "").strip()
    if key:
        return key
    try:
        return key_path(settings).read_text().strip() or None
    except OSError:
        return None
