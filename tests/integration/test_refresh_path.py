"""The refresh path on real PostgreSQL, Redis and the dev OAuth server (rotation + reuse
detection): lock, re-read, provider call, fenced write, cache, audit."""

from __future__ import annotations

from sqlalchemy import select, text

from grantkeeper import repository
from grantkeeper.api import TokenReader
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import ACTIVE, REAUTH_REQUIRED, audit_events
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant


def _row(runtime: Runtime, connection_id: str) -> repository.ConnectionRecord:
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    return record


def test_refresh_rotates_and_stores_encrypted(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A forced refresh calls the provider once, stores the rotated pair encrypted (never in
    plain text), bumps the version, caches the access token and audits the step."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct-1")
    result = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert result.outcome is Outcome.REFRESHED
    assert devserver.stats()["refresh_ok"] == 1
    row = _row(runtime, connection_id)
    assert row.version == 2
    assert row.refresh_count == 1
    # The old refresh token is consumed at the provider; the stored one is the new one.
    assert not devserver.is_active(str(grant["refresh_token"]))
    with runtime.engine.connect() as conn:
        raw = conn.execute(text("SELECT * FROM connections")).mappings().one()
    assert str(grant["access_token"]) not in str(dict(raw))
    assert str(raw["refresh_token_ct"]).startswith("gk1.")
    token = TokenReader(runtime).get(connection_id)
    assert devserver.is_active(token)
    cached = runtime.cache.get(connection_id)
    assert cached is not None
    assert cached.version == 2
    with runtime.engine.connect() as conn:
        events = [r.event for r in conn.execute(select(audit_events.c.event))]
    assert "connection.imported" in events
    assert "refresh.succeeded" in events


def test_not_due_is_skipped_without_provider_call(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A scheduled refresh of a token far from expiry does nothing and says so."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct-2")
    result = RefreshService(runtime).refresh(connection_id, reason="scheduled")
    assert result.outcome is Outcome.NOT_DUE
    assert devserver.stats()["refresh_ok"] == 0


def test_stale_version_is_not_refreshed_twice(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A caller whose view of the row is older than the row refreshes nothing: someone else
    already did, and a second provider call would present a consumed refresh token."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct-3")
    service = RefreshService(runtime)
    first = service.refresh(connection_id, reason="manual", force=True, seen_version=1)
    second = service.refresh(connection_id, reason="manual", force=True, seen_version=1)
    assert first.outcome is Outcome.REFRESHED
    assert second.outcome is Outcome.REFRESHED_ELSEWHERE
    assert devserver.stats()["refresh_ok"] == 1
    assert devserver.stats()["reuse_detections"] == 0


def test_contended_lock_is_not_a_failure(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """While another holder has the lock, a non-waiting refresh reports contention, changes
    nothing and records no failure."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct-4")
    held = runtime.cache.lock(connection_id, 10, None)
    assert held.acquire(blocking=False)
    try:
        result = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    finally:
        held.release()
    assert result.outcome is Outcome.CONTENDED
    row = _row(runtime, connection_id)
    assert row.failure_count == 0
    assert row.version == 1


def test_invalid_grant_requires_reauth_and_keeps_tokens(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A dead grant marks the connection reauth_required; its ciphertexts are kept, not wiped."""
    connection_id, grant = import_grant(runtime, devserver, provider_name, "acct-5")
    devserver.state.revoke_token("gk-client", str(grant["refresh_token"]), "refresh_token")
    before = _row(runtime, connection_id)
    result = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert result.outcome is Outcome.FAILED_PERMANENT
    after = _row(runtime, connection_id)
    assert after.status == REAUTH_REQUIRED
    assert after.refresh_token_ct == before.refresh_token_ct
    assert after.access_token_ct == before.access_token_ct
    assert after.last_error_class == "permanent"
    assert before.status == ACTIVE
