"""The monthly rotation with the clock under the test's control: exactly the old refresh
tokens are rotated, through the same lock and fence; a second run does nothing; a provider
that does not rotate is reported as such and not retried within the same period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from grantkeeper import repository
from grantkeeper.devserver import DevOAuthServer, ScriptedResponse
from grantkeeper.models import audit_events, connections
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.rotation import enqueue_rotation_batch, rotation_cutoff
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant

NOW = datetime(2027, 2, 1, 3, 0, tzinfo=UTC)


def _age(runtime: Runtime, ids: list[str], days: int) -> None:
    with runtime.engine.begin() as conn:
        conn.execute(
            update(connections)
            .where(connections.c.id.in_(ids))
            .values(refresh_issued_at=NOW - timedelta(days=days))
        )


def _run_rotation(runtime: Runtime, now: datetime) -> list[tuple[str, Outcome]]:
    """One batch, with the enqueued refreshes executed at once (as the worker would)."""
    queued: list[str] = []
    enqueue_rotation_batch(runtime, now, lambda cid, _delay: queued.append(cid))
    service = RefreshService(runtime, clock=lambda: now)
    cutoff = rotation_cutoff(runtime, now)
    results = []
    for connection_id in queued:
        result = service.refresh(connection_id, reason="rotation", rotation_cutoff=cutoff)
        runtime.cache.clear_queued(connection_id)
        results.append((connection_id, result.outcome))
    return results


def test_exactly_old_refresh_tokens_are_rotated(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """Of 10 connections, the 4 with refresh tokens older than 30 days are force-refreshed
    (new refresh tokens at the provider); the others, a revoked old one included, are not;
    running again refreshes nothing."""
    ids = [import_grant(runtime, devserver, provider_name, f"a{n}")[0] for n in range(10)]
    old, young = ids[:5], ids[5:]
    _age(runtime, old, 45)
    _age(runtime, young, 10)
    with runtime.engine.begin() as conn:
        conn.execute(update(connections).where(connections.c.id == old[4]).values(status="revoked"))
    with runtime.engine.connect() as conn:
        before = {cid: repository.get_connection(conn, cid) for cid in ids}

    results = _run_rotation(runtime, NOW)
    assert sorted(results) == sorted((cid, Outcome.REFRESHED) for cid in old[:4])
    assert devserver.stats()["refresh_ok"] == 4
    with runtime.engine.connect() as conn:
        after = {cid: repository.get_connection(conn, cid) for cid in ids}
    for cid in ids:
        rotated = cid in old[:4]
        b, a = before[cid], after[cid]
        assert b is not None
        assert a is not None
        assert (a.refresh_token_ct != b.refresh_token_ct) is rotated
        assert (a.version == b.version + 1) is rotated

    assert _run_rotation(runtime, NOW) == []
    assert _run_rotation(runtime, NOW + timedelta(days=1)) == []
    assert devserver.stats()["refresh_ok"] == 4
    assert devserver.stats()["reuse_detections"] == 0


def test_provider_that_does_not_rotate_is_reported(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A provider answering without a new refresh token keeps the stored one; the audit says
    the rotation did not rotate, and the connection is not tried again this period."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "static")
    _age(runtime, [connection_id], 60)
    devserver.script(
        ScriptedResponse.json_body(
            {"access_token": "new-access-token-value", "token_type": "Bearer", "expires_in": 3600}
        )
    )
    assert _run_rotation(runtime, NOW) == [(connection_id, Outcome.REFRESHED)]
    with runtime.engine.connect() as conn:
        details = conn.execute(
            select(audit_events.c.details).where(audit_events.c.event == "refresh.succeeded")
        ).scalar_one()
    assert details["reason"] == "rotation"
    assert details["refresh_token_rotated"] is False
    assert _run_rotation(runtime, NOW + timedelta(hours=1)) == []
