"""Alembic environment: runs on a connection handed over by grantkeeper.db.upgrade, or builds
one from the process settings when invoked as plain ``alembic``."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from grantkeeper.models import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from config.settings import get_settings  # noqa: PLC0415 - only for plain `alembic` use
    from grantkeeper.db import create_db_engine  # noqa: PLC0415

    engine = create_db_engine(get_settings())
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline SQL generation is not supported; use `grantkeeper db upgrade`")
run_migrations_online()
