"""Database engines and schema migration.

PostgreSQL is the production store. Without ``GRANTKEEPER_DATABASE_URL`` an embedded SQLite
file is used so a demo or single-box install needs only Redis; it is created owner-only
(directory 0700, file 0600) because it holds ciphertexts and the audit trail.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolProxiedConnection

from config.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _prepare_sqlite_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    os.chmod(path, 0o600)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers proceed during a write; busy_timeout makes concurrent writers from
    # several worker threads and processes wait for each other instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# A pooled connection that sat idle this long is pinged before use; one in steady use is not.
IDLE_PING_SECONDS = 5.0


def _note_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(
    dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
) -> None:
    """``pool_pre_ping`` costs a round trip on *every* checkout, and a refresh checks out a
    connection three or four times: on a busy worker that is a third of its statements.
    A connection used moments ago is alive as far as a ping could tell, so only one that sat
    idle is pinged. A dead one raises ``DisconnectionError``, and the pool then replaces it
    (and every connection older than it) with a fresh one, as pre-ping would. A database that
    dies under busy connections is met by SQLAlchemy's disconnect handling instead: the
    statement fails, the pool is invalidated, and the caller's retry gets new connections."""
    idle_since = record.info.get("checked_in_at")
    if idle_since is None or time.monotonic() - idle_since < IDLE_PING_SECONDS:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        dbapi_connection.rollback()
    except Exception as error:
        raise exc.DisconnectionError(type(error).__name__) from error


def create_db_engine(settings: Settings) -> Engine:
    """One engine per process. Pool sized for the worker's in-flight refreshes."""
    url = settings.effective_database_url
    if settings.is_sqlite:
        _prepare_sqlite_file(settings.sqlite_path)
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    engine = create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_recycle=1800,
    )
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", _ping_if_idle)
    return engine


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the schema to ``revision`` on this engine."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
