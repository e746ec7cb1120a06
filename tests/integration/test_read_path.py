"""The read path: the process-local cache kept fresh by Redis client tracking, read audits
tallied off the hot path, and concurrent slow reads in one process sharing one attempt."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from config.settings import Settings
from grantkeeper.api import TokenReader
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.errors import ConnectionUnavailable
from grantkeeper.models import audit_events, connections
from grantkeeper.refresh import RefreshService
from grantkeeper.revoke import RevokeService
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant


@pytest.fixture
def local(runtime: Runtime, settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings.model_copy(update={"local_cache": True}), actor="reader")
    try:
        assert rt.local_cache is not None
        assert rt.local_cache.wait_ready(5)
        yield rt
    finally:
        rt.close()


def _seen_within(reader: TokenReader, connection_id: str, old: str, limit: float) -> float:
    start = time.perf_counter()
    while reader.get(connection_id) == old:
        assert time.perf_counter() - start < limit, "the local cache kept serving the old token"
    return time.perf_counter() - start


def test_refresh_elsewhere_invalidates_the_local_cache(
    local: Runtime, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A token served from process memory is replaced within milliseconds when another
    runtime refreshes the connection (Redis tracking), never served stale for long."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct")
    reader = TokenReader(local)
    assert reader.get(connection_id) == grant["access_token"]
    assert reader.get(connection_id) == grant["access_token"]
    assert local.local_cache is not None
    assert local.local_cache.get(connection_id) is not None  # now served from memory
    RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert _seen_within(reader, connection_id, grant["access_token"], 1.0) < 0.1


def test_revocation_elsewhere_reaches_the_local_cache(
    local: Runtime, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """After a revocation by another process, the next read fails instead of serving the token
    remembered in memory."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct")
    reader = TokenReader(local)
    reader.get(connection_id)
    reader.get(connection_id)
    RevokeService(runtime).revoke(connection_id, reason="test", local_only=True)
    time.sleep(0.05)
    with pytest.raises(ConnectionUnavailable):
        reader.get(connection_id)


def test_reads_are_tallied_into_one_audit_event(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A hundred reads become one token.read event carrying the count and the sources."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct")
    reader = TokenReader(runtime)
    for _ in range(100):
        reader.get(connection_id)
    runtime.read_audit.flush()
    with runtime.engine.connect() as conn:
        rows = conn.execute(
            select(audit_events.c.details).where(audit_events.c.event == "token.read")
        ).all()
    assert len(rows) == 1
    assert rows[0].details["reads"] == 100
    assert sum(rows[0].details["sources"].values()) == 100


def test_concurrent_reads_of_an_expired_token_share_one_refresh(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """50 threads reading one expired connection cause one provider call and all get the same
    new token."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct")
    with runtime.engine.begin() as conn:
        conn.execute(
            update(connections)
            .where(connections.c.id == connection_id)
            .values(access_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    runtime.cache.drop(connection_id)
    devserver.set_latency(0.2)
    barrier = threading.Barrier(50)
    tokens: list[str] = []

    def read() -> None:
        barrier.wait()
        tokens.append(TokenReader(runtime).get(connection_id))

    threads = [threading.Thread(target=read) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tokens) == 50
    assert len(set(tokens)) == 1
    assert tokens[0] != grant["access_token"]
    assert devserver.stats()["refresh_ok"] == 1
