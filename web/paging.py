"""Query arguments and opaque cursors, as every paginated route of the API reads them."""

from __future__ import annotations

import base64

from flask import request

from store.schema import MAX_ID
from web.errors import ApiError


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"invalid_{name}", f"{name} must be an integer")
    if not low <= value <= high:
        raise ApiError(400, f"invalid_{name}", f"{name} must be between {low} and {high}")
    return value


def encode_cursor(prefix: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{prefix}:{value}".encode()).decode().rstrip("=")


def decode_cursor(raw: str, prefix: str) -> str:
    """The value of a cursor made by encode_cursor with ``prefix``; ValueError otherwise."""
    try:
        decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(raw) from exc
    got, _, value = decoded.partition(":")
    if got != prefix or not value:
        raise ValueError(raw)
    return value


def int_cursor(raw: str | None, prefix: str = "i") -> int:
    """The integer in a cursor made by encode_cursor with ``prefix`` (0 without one); 400
    otherwise."""
    if not raw:
        return 0
    try:
        after = int(decode_cursor(raw, prefix))
        if not 0 <= after <= MAX_ID:  # an id (or rank) this API returned
            raise ValueError(raw)
        return after
    except ValueError:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")
