"""Fault injection with real services: a database that goes away mid-refresh (through a TCP
proxy the test cuts), a test-owned redis-server that is killed and restarted, a provider that
fails for everyone (the breaker), and a rotation lost between the provider and the commit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from grantkeeper import repository, sealing
from grantkeeper.api import TokenReader
from grantkeeper.devserver import DevOAuthServer, ScriptedResponse
from grantkeeper.models import REAUTH_REQUIRED
from grantkeeper.refresh import Outcome, RefreshResult, RefreshService
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant
from tests.support.redis_server import RedisServer
from tests.support.tcp_proxy import TcpProxy


def _stored_refresh(rt: Runtime, connection_id: str) -> str:
    with rt.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    return sealing.unseal(
        rt.keyring,
        sealing.CONNECTIONS,
        connection_id,
        sealing.REFRESH_TOKEN,
        record.refresh_token_ct or "",
    )


@pytest.fixture
def proxied_runtime(
    runtime: Runtime, settings: Settings, pg_database: str
) -> Iterator[tuple[Runtime, TcpProxy]]:
    """A second runtime on the same database, reached through a proxy the test can cut."""
    host, _, rest = pg_database.partition("@")[2].partition(":")
    port, _, name = rest.partition("/")
    with TcpProxy(host, int(port)) as proxy:
        rt = Runtime(
            settings.model_copy(
                update={
                    "database_url": settings.database_url.__class__(
                        f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{name}"
                    )
                }
            ),
            actor="faulty",
        )
        try:
            yield rt, proxy
        finally:
            rt.close()


def test_database_lost_after_provider_answer_parks_and_reconciles(
    runtime: Runtime,
    proxied_runtime: tuple[Runtime, TcpProxy],
    devserver: DevOAuthServer,
    provider_name: str,
) -> None:
    """The database disappears while the provider is rotating the token: the new set is
    parked (encrypted) in Redis, the connection is never refreshed with the consumed token,
    and the next refresh commits the parked set without calling the provider."""
    rt, proxy = proxied_runtime
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct")
    devserver.set_latency(1.0)
    results: list[RefreshResult] = []
    worker = threading.Thread(
        target=lambda: results.append(
            RefreshService(rt).refresh(connection_id, reason="manual", force=True)
        )
    )
    worker.start()
    time.sleep(0.4)  # the request is at the provider now
    proxy.cut()
    worker.join(30)
    devserver.set_latency(0)
    assert results[0].outcome is Outcome.PARKED
    assert not devserver.is_active(grant["refresh_token"])  # consumed at the provider
    assert rt.crash_window.parked(connection_id) is not None
    assert _stored_refresh(runtime, connection_id) == grant["refresh_token"]  # DB still old

    # Database down: a refresh neither calls the provider nor loses the parked set.
    with pytest.raises(SQLAlchemyError):
        RefreshService(rt).refresh(connection_id, reason="manual", force=True)
    proxy.restore()
    again = RefreshService(rt).refresh(connection_id, reason="manual", force=True)
    assert again.outcome is Outcome.REFRESHED
    assert devserver.stats()["refresh_ok"] == 1
    new_refresh = _stored_refresh(runtime, connection_id)
    assert new_refresh != grant["refresh_token"]
    assert devserver.is_active(new_refresh)
    assert rt.crash_window.parked(connection_id) is None
    # And the connection goes on refreshing normally.
    assert (
        RefreshService(rt).refresh(connection_id, reason="manual", force=True).outcome
        is Outcome.REFRESHED
    )
    assert devserver.stats()["reuse_detections"] == 0


def test_reconcile_task_moves_parked_sets(
    runtime: Runtime,
    proxied_runtime: tuple[Runtime, TcpProxy],
    devserver: DevOAuthServer,
    provider_name: str,
) -> None:
    """The reconcile step commits parked sets by itself once the database is back."""
    rt, proxy = proxied_runtime
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct")
    devserver.set_latency(1.0)
    worker = threading.Thread(
        target=lambda: RefreshService(rt).refresh(connection_id, reason="manual", force=True)
    )
    worker.start()
    time.sleep(0.4)
    proxy.cut()
    worker.join(30)
    devserver.set_latency(0)
    proxy.restore()
    assert RefreshService(rt).reconcile_parked() == 1
    assert devserver.is_active(_stored_refresh(runtime, connection_id))
    assert RefreshService(rt).reconcile_parked() == 0


def test_redis_down_fails_closed_and_reads_fall_back(
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
    tmp_path: Path,
) -> None:
    """With Redis killed, no refresh happens (no lock, no provider call) while a valid token
    is still read from the database; after Redis restarts, refreshes work again unaided."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct")
    with RedisServer.start(tmp_path) as server:
        rt = Runtime(
            settings.model_copy(update={"redis_url": settings.redis_url.__class__(server.url)}),
            actor="t",
        )
        try:
            server.kill()
            with pytest.raises(Exception) as excinfo:  # noqa: PT011 - any Redis error is right
                RefreshService(rt).refresh(connection_id, reason="manual", force=True)
            assert "redis" in type(excinfo.value).__module__
            assert devserver.stats()["token_requests"] == 0
            assert TokenReader(rt).get(connection_id) == grant["access_token"]
            server.restart()
            result = RefreshService(rt).refresh(connection_id, reason="manual", force=True)
            assert result.outcome is Outcome.REFRESHED
        finally:
            rt.close()


def test_provider_outage_opens_breaker_and_resumes(
    runtime: Runtime, settings: Settings, devserver: DevOAuthServer, provider_name: str
) -> None:
    """Transient failures for many connections of one provider open its breaker: further
    refreshes are held back without calling it, and resume by themselves after the cooldown.
    Retry-After is honoured in each connection's schedule."""
    rt = Runtime(
        settings.model_copy(update={"breaker_threshold": 3, "breaker_cooldown_seconds": 1}),
        actor="t",
    )
    try:
        ids = [import_grant(runtime, devserver, provider_name, f"a{n}")[0] for n in range(5)]
        devserver.script(*[ScriptedResponse.rate_limited(retry_after=90) for _ in range(3)])
        outcomes = [
            RefreshService(rt).refresh(cid, reason="manual", force=True).outcome for cid in ids
        ]
        assert outcomes[:3] == [Outcome.FAILED_TRANSIENT] * 3
        assert outcomes[3:] == [Outcome.PROVIDER_BACKOFF] * 2
        assert devserver.stats()["token_requests"] == 3
        with runtime.engine.connect() as conn:
            first = repository.get_connection(conn, ids[0])
        assert first is not None
        assert first.next_attempt_at is not None
        assert first.last_error_class == "transient"
        time.sleep(1.2)
        assert (
            RefreshService(rt).refresh(ids[4], reason="manual", force=True).outcome
            is Outcome.REFRESHED
        )
    finally:
        rt.close()


def test_rotation_lost_in_the_window_is_reported(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """The provider rotates but the answer never arrives (as if the worker died between the
    answer and the commit): the next refresh meets reuse detection, and the connection is
    flagged with the true reason, rotation_lost, not silently and not as a plain dead grant."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct")
    devserver.script(ScriptedResponse.dropped(consume=True))
    first = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert first.outcome is Outcome.FAILED_TRANSIENT
    second = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert second.outcome is Outcome.FAILED_PERMANENT
    assert second.error is not None
    assert second.error.error_class == "rotation_lost"
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    assert record.status == REAUTH_REQUIRED
    assert record.last_error_class == "rotation_lost"
