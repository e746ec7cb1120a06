"""Each anomaly rule triggered, and not triggered, by scenarios on real PostgreSQL, Redis and
the dev OAuth server; the optional webhook is received and its signature verified."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from config.settings import Settings
from grantkeeper.api import TokenReader
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import audit_events, connections
from grantkeeper.notify import SIGNATURE_HEADER, verify
from grantkeeper.refresh import RefreshService
from grantkeeper.runtime import Runtime
from tests.support.dev import CLIENT, import_grant
from tests.support.webhook import WebhookReceiver

SECRET = "webhook-signing-secret-for-tests"


@pytest.fixture
def hook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def watched(runtime: Runtime, settings: Settings, hook: WebhookReceiver) -> Iterator[Runtime]:
    """A runtime with a webhook and small thresholds, on the same database and Redis."""
    rt = Runtime(
        settings.model_copy(
            update={
                "webhook_url": hook.url,
                "webhook_secret": settings.redis_url.__class__(SECRET),
                "anomaly_failure_connections": 4,
                "anomaly_new_reader": True,
            }
        ),
        actor="worker:host-a:100",
    )
    try:
        yield rt
    finally:
        rt.close()


def _anomalies(rt: Runtime) -> list[tuple[str, str | None]]:
    with rt.engine.connect() as conn:
        rows = conn.execute(
            select(audit_events.c.event, audit_events.c.connection_id).where(
                audit_events.c.event.like("anomaly.%")
            )
        ).all()
    return [(r.event, r.connection_id) for r in rows]


def test_refresh_storm(
    watched: Runtime,
    runtime: Runtime,
    devserver: DevOAuthServer,
    provider_name: str,
    hook: WebhookReceiver,
) -> None:
    """A one-hour token refreshed 7 times in the hour is a storm (threshold 6, fired once);
    another refreshed 3 times is not. The webhook arrives signed."""
    noisy, _ = import_grant(runtime, devserver, provider_name, "noisy")
    calm, _ = import_grant(runtime, devserver, provider_name, "calm")
    service = RefreshService(watched)
    for _ in range(6):
        service.refresh(noisy, reason="manual", force=True)
    for _ in range(3):
        service.refresh(calm, reason="manual", force=True)
    assert _anomalies(watched) == []
    service.refresh(noisy, reason="manual", force=True)
    service.refresh(noisy, reason="manual", force=True)
    assert _anomalies(watched) == [("anomaly.refresh_storm", noisy)]
    assert len(hook.received) == 1
    headers, body = hook.received[0]
    assert verify(SECRET.encode(), headers[SIGNATURE_HEADER], body, now=time.time())
    assert not verify(b"wrong secret", headers[SIGNATURE_HEADER], body, now=time.time())
    assert json.loads(body)["event"] == "anomaly.refresh_storm"


def test_provider_failures(
    watched: Runtime, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """Failed refreshes of 4 distinct connections of one provider within the window raise one
    anomaly; 3 do not."""
    ids = []
    for n in range(5):
        connection_id, grant = import_grant(runtime, devserver, provider_name, f"a{n}")
        devserver.state.revoke_token(CLIENT.client_id, str(grant["refresh_token"]), "refresh_token")
        ids.append(connection_id)
    service = RefreshService(watched)
    for connection_id in ids[:3]:
        service.refresh(connection_id, reason="manual", force=True)
    assert _anomalies(watched) == []
    for connection_id in ids[3:]:
        service.refresh(connection_id, reason="manual", force=True)
    assert [event for event, _ in _anomalies(watched)] == ["anomaly.provider_failures"]


def test_tampering(
    watched: Runtime, runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A ciphertext that fails authentication raises an anomaly (once per hour per
    connection); an untouched connection raises none."""
    bad, _ = import_grant(runtime, devserver, provider_name, "bad")
    good, _ = import_grant(runtime, devserver, provider_name, "good")
    with runtime.engine.begin() as conn:
        other = conn.execute(
            select(connections.c.access_token_ct).where(connections.c.id == good)
        ).scalar_one()
        conn.execute(
            update(connections).where(connections.c.id == bad).values(refresh_token_ct=other)
        )
    RefreshService(watched).refresh(good, reason="manual", force=True)
    assert _anomalies(watched) == []
    RefreshService(watched).refresh(bad, reason="manual", force=True)
    RefreshService(watched).refresh(bad, reason="manual", force=True)
    assert _anomalies(watched) == [("anomaly.tampering", bad)]


def test_new_reader(
    watched: Runtime,
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
) -> None:
    """The same reader in a restarted process is not new; another actor is."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "acct")
    TokenReader(watched).get(connection_id)
    watched.read_audit.flush()
    restarted = Runtime(watched.settings, actor="worker:host-a:200")
    stranger = Runtime(watched.settings, actor="cli:mallory@host-z")
    try:
        TokenReader(restarted).get(connection_id)
        restarted.read_audit.flush()
        assert _anomalies(watched) == []
        TokenReader(stranger).get(connection_id)
        stranger.read_audit.flush()
        assert _anomalies(watched) == [("anomaly.new_reader", connection_id)]
    finally:
        restarted.close()
        stranger.close()
    assert settings.anomaly_new_reader is False  # off by default
