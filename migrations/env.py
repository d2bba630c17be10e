"""Alembic environment: the URL comes from the caller's config (``mmbatch db upgrade``)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import event

from store.db import make_engine
from store.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    if engine.dialect.name == "sqlite":
        # A migration that changes a table on SQLite rebuilds it (copy, drop, rename), and with
        # foreign keys enforced, the drop first deletes every row, cascading to the rows that
        # refer to them (a job's items and results). Alembic's advice: migrate with them off.
        event.listen(engine, "connect", _foreign_keys_off)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


def _foreign_keys_off(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=OFF")  # after store.db's own pragmas, which turn it on
    cursor.close()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
