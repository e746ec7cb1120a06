"""The embedded SQLite default serves the same paths as PostgreSQL: migrate, import, refresh,
read, audit; and it is created owner-only."""

from __future__ import annotations

import stat
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from config.settings import Settings
from grantkeeper import repository
from grantkeeper.api import TokenReader
from grantkeeper.connections import ProviderSpec, add_provider
from grantkeeper.db import upgrade
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import audit_events
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime
from tests.support.dev import CLIENT, import_grant


@pytest.fixture
def sqlite_runtime(sqlite_settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(sqlite_settings, actor="test")
    upgrade(rt.engine)
    try:
        yield rt
    finally:
        rt.cache.delete_all()
        rt.close()


def test_sqlite_file_is_owner_only(sqlite_runtime: Runtime, sqlite_settings: Settings) -> None:
    """The database file is 0600 and its directory 0700: it holds ciphertexts and audit."""
    path = sqlite_settings.sqlite_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_refresh_and_read_on_sqlite(sqlite_runtime: Runtime, devserver: DevOAuthServer) -> None:
    """Import, forced refresh with rotation, a stale second refresh, a read and the audit
    trail all work on the embedded database."""
    rt = sqlite_runtime
    add_provider(
        rt,
        ProviderSpec(
            name="dev",
            token_url=devserver.token_url,
            client_id=CLIENT.client_id,
            client_secret=CLIENT.client_secret,
        ),
    )
    connection_id, _ = import_grant(rt, devserver, "dev", "acct")
    service = RefreshService(rt)
    assert service.refresh(connection_id, reason="manual", force=True, seen_version=1).outcome is (
        Outcome.REFRESHED
    )
    assert service.refresh(connection_id, reason="manual", force=True, seen_version=1).outcome is (
        Outcome.REFRESHED_ELSEWHERE
    )
    token = TokenReader(rt).get(connection_id)
    rt.read_audit.flush()
    assert devserver.is_active(token)
    with rt.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
        events = {r.event for r in conn.execute(select(audit_events.c.event))}
    assert record is not None
    assert record.version == 2
    assert record.access_expires_at is not None
    assert record.access_expires_at.tzinfo is not None
    assert {"connection.imported", "refresh.succeeded", "token.read"} <= events
    assert devserver.stats()["refresh_ok"] == 1
