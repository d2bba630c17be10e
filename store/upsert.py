"""INSERT … ON CONFLICT DO NOTHING for SQLite and PostgreSQL, returning what was new."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_new(session: Session, table: Table, rows: Sequence[dict[str, Any]],
               conflict: Sequence[str], returning: Sequence[str] = (),
               replace_where: Any = None) -> list[tuple[Any, ...]]:
    """Insert ``rows``, skipping those whose ``conflict`` columns already exist.

    With ``replace_where`` (a condition on the existing row, e.g. ``status = 'failed'``), an
    existing row that meets it is overwritten instead. Returns the ``returning`` columns of the
    rows that were actually written, which is how counters move only for new rows.
    """
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:  # pragma: no cover - only the two supported databases
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    stmt = stmt.values(list(rows))
    if replace_where is None:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict))
    else:
        updated = {c: stmt.excluded[c] for c in rows[0] if c not in conflict}
        stmt = stmt.on_conflict_do_update(index_elements=list(conflict), set_=updated,
                                          where=replace_where)
    if returning:
        stmt = stmt.returning(*(table.c[name] for name in returning))
        return [tuple(r) for r in session.execute(stmt)]
    session.execute(stmt)
    return []
