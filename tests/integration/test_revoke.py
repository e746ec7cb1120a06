"""Revocation against oidc-provider (RFC 7009) and locally; provider outages; the bulk
compromise runbook through a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from config.settings import Settings
from grantkeeper import repository, sealing
from grantkeeper.api import TokenReader
from grantkeeper.compromise import revoke_many
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.crypto import Keyring, generate_key_entry
from grantkeeper.errors import ConnectionUnavailable
from grantkeeper.models import REVOKED, audit_events, pending_revocations, providers
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.revoke import RevokeService
from grantkeeper.runtime import Runtime
from tests.support.oidc_peer import ClientSpec, OidcPeer, free_port
from tests.support.processes import settings_env, start_celery, stop

CLIENT = ClientSpec("gk-revoke", "revoke-client-secret-" + uuid.uuid4().hex, "client_secret_basic")
GRANTKEEPER = str(Path(sys.executable).parent / "grantkeeper")


@pytest.fixture(scope="module")
def peer() -> Iterator[OidcPeer]:
    with OidcPeer.start([CLIENT], access_ttl=600) as running:
        yield running


def _provider(runtime: Runtime, peer: OidcPeer, revocation_url: str | None = None) -> str:
    add_provider(
        runtime,
        ProviderSpec(
            name="oidc",
            token_url=peer.token_url,
            revocation_url=revocation_url or peer.revocation_url,
            client_id=CLIENT.client_id,
            client_secret=CLIENT.client_secret,
        ),
    )
    return "oidc"


def _connect(runtime: Runtime, peer: OidcPeer, account: str) -> tuple[str, dict[str, str]]:
    tokens = peer.obtain_tokens(CLIENT, account=account)
    return import_connection(runtime, "oidc", account, json.dumps(tokens).encode()), tokens


def _redis_keys_for(runtime: Runtime, connection_id: str) -> list[bytes]:
    return [
        k
        for k in runtime.redis.scan_iter(match=f"{runtime.settings.redis_key_prefix}*")
        if connection_id.encode() in k
    ]


def test_revoke_at_provider_and_locally(runtime: Runtime, peer: OidcPeer) -> None:
    """After a revocation the provider reports both tokens inactive, the row holds no
    ciphertext, Redis holds nothing for it, no token or refresh is possible, the audit records
    the provider's answer, and revoking again is harmless."""
    _provider(runtime, peer)
    connection_id, _ = _connect(runtime, peer, "alice")
    token = TokenReader(runtime).get(connection_id)  # fills the cache
    refreshed = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert refreshed.outcome is Outcome.REFRESHED
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    current_refresh = sealing.unseal(
        runtime.keyring,
        sealing.CONNECTIONS,
        connection_id,
        sealing.REFRESH_TOKEN,
        record.refresh_token_ct or "",
    )
    current_access = TokenReader(runtime).get(connection_id)
    assert token != current_access
    assert _redis_keys_for(runtime, connection_id)

    result = RevokeService(runtime).revoke(connection_id, reason="test")
    assert result.provider_outcome == "revoked"
    assert peer.introspect(CLIENT, current_access)["active"] is False
    assert peer.introspect(CLIENT, current_refresh)["active"] is False
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
        events = conn.execute(
            select(audit_events.c.details).where(audit_events.c.event == "connection.revoked")
        ).all()
    assert record is not None
    assert record.status == REVOKED
    assert record.access_token_ct is None
    assert record.refresh_token_ct is None
    assert _redis_keys_for(runtime, connection_id) == []
    assert "refresh_token" in events[0].details["provider_answers"]
    assert events[0].details["provider_answers"]["refresh_token"].startswith("HTTP 200")
    with pytest.raises(ConnectionUnavailable):
        TokenReader(runtime).get(connection_id)
    assert RefreshService(runtime).refresh(connection_id, reason="manual", force=True).outcome is (
        Outcome.UNAVAILABLE
    )
    again = RevokeService(runtime).revoke(connection_id, reason="test")
    assert again.provider_outcome == "already_revoked"


def test_provider_down_revokes_locally_and_retries(runtime: Runtime, peer: OidcPeer) -> None:
    """With the provider's revocation endpoint unreachable, the local revocation completes at
    once; the tokens are parked encrypted and the background retry revokes them at the
    provider when it answers again, then forgets them."""
    dead = f"http://127.0.0.1:{free_port()}/token/revocation"
    _provider(runtime, peer, revocation_url=dead)
    connection_id, tokens = _connect(runtime, peer, "bob")
    result = RevokeService(runtime).revoke(connection_id, reason="test")
    assert result.provider_outcome == "failed_will_retry"
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
        parked = conn.execute(select(pending_revocations)).mappings().all()
    assert record is not None
    assert record.status == REVOKED
    assert record.refresh_token_ct is None
    assert {p["token_type_hint"] for p in parked} == {"refresh_token", "access_token"}
    assert all(p["token_ct"].startswith("gk1.") for p in parked)
    assert peer.introspect(CLIENT, tokens["refresh_token"])["active"] is True

    # Still down: the retry postpones, keeps the parked tokens.
    later = datetime.now(UTC) + timedelta(hours=2)
    assert RevokeService(runtime, clock=lambda: later).retry_pending() == (0, 2)
    # The provider is back.
    with runtime.engine.begin() as conn:
        conn.execute(update(providers).values(revocation_url=peer.revocation_url))
    much_later = later + timedelta(hours=2)
    done, still = RevokeService(runtime, clock=lambda: much_later).retry_pending()
    assert (done, still) == (2, 0)
    assert peer.introspect(CLIENT, tokens["refresh_token"])["active"] is False
    assert peer.introspect(CLIENT, tokens["access_token"])["active"] is False
    with runtime.engine.connect() as conn:
        assert repository.count_pending_revocations(conn) == 0


def test_local_only_and_no_endpoint(runtime: Runtime, peer: OidcPeer) -> None:
    """--local-only forgets the tokens without calling the provider; a provider without a
    revocation endpoint is revoked locally and the result says access must be withdrawn there."""
    add_provider(
        runtime,
        ProviderSpec(
            name="oidc",
            token_url=peer.token_url,
            client_id=CLIENT.client_id,
            client_secret=CLIENT.client_secret,
        ),
    )
    first, first_tokens = _connect(runtime, peer, "carol")
    second, _ = _connect(runtime, peer, "dave")
    peer.reset_stats()
    local = RevokeService(runtime).revoke(first, reason="test", local_only=True)
    assert local.provider_outcome == "local_only"
    assert peer.stats()["revocations"] == 0
    assert peer.introspect(CLIENT, first_tokens["refresh_token"])["active"] is True
    no_endpoint = RevokeService(runtime).revoke(second, reason="test")
    assert no_endpoint.provider_outcome == "no_endpoint"
    assert no_endpoint.provider_note is not None
    assert "no revocation endpoint" in no_endpoint.provider_note
    with runtime.engine.connect() as conn:
        assert repository.count_by_status(conn) == {"revoked": 2}


def test_revoke_all_through_worker(
    runtime: Runtime, settings: Settings, peer: OidcPeer, tmp_path: Path
) -> None:
    """`grantkeeper revoke --all --yes` fans out through a real worker, revokes every
    connection at the provider, removes every key under grantkeeper's prefix (and nothing
    else in the Redis database), and prints what remains for a person to do."""
    _provider(runtime, peer)
    ids_tokens = [_connect(runtime, peer, f"user{n}") for n in range(20)]
    for connection_id, _ in ids_tokens:
        TokenReader(runtime).get(connection_id)
    foreign = f"not-grantkeeper-{uuid.uuid4().hex}"
    runtime.redis.set(foreign, "keep me")
    env = settings_env(settings, GRANTKEEPER_CELERY_QUEUE=f"gk-revoke-{uuid.uuid4().hex[:8]}")
    worker = start_celery(
        "worker", env, tmp_path / "worker.log", "--without-mingle", "--without-gossip"
    )
    try:
        time.sleep(3)
        done = subprocess.run(
            [GRANTKEEPER, "revoke", "--all", "--yes", "--since", "2026-12-01T00:00:00Z"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        stop(worker)
    print(done.stderr[-600:])
    assert done.returncode == 0, done.stderr
    assert "through the worker" in done.stderr
    assert "20/20 revoked" in done.stderr
    assert "Rotate the encryption key" in done.stdout
    assert "grantkeeper audit --since 2026-12-01T00:00:00Z" in done.stdout
    for _, tokens in ids_tokens:
        assert peer.introspect(CLIENT, tokens["refresh_token"])["active"] is False
    assert list(runtime.redis.scan_iter(match=f"{runtime.settings.redis_key_prefix}*")) == []
    assert runtime.redis.get(foreign) == b"keep me"
    runtime.redis.delete(foreign)
    with runtime.engine.connect() as conn:
        assert repository.count_by_status(conn) == {"revoked": 20}


def test_unreadable_client_secret_still_revokes_locally(runtime: Runtime, peer: OidcPeer) -> None:
    """A provider whose client secret this process cannot open (sealed under a key it does
    not have) cannot be asked to revoke now. The local revocation completes all the same, the
    failure is audited, and the tokens wait for the retry, which revokes them at the provider
    once the secret opens again."""
    _provider(runtime, peer)
    connection_id, tokens = _connect(runtime, peer, "erin")
    with runtime.engine.connect() as conn:
        provider = repository.get_provider_by_name(conn, "oidc")
    assert provider is not None
    foreign = Keyring.parse(generate_key_entry())
    unreadable = sealing.seal(
        foreign, sealing.PROVIDERS, provider.id, sealing.CLIENT_SECRET, CLIENT.client_secret
    )
    with runtime.engine.begin() as conn:
        conn.execute(update(providers).values(client_secret_ct=unreadable))

    result = RevokeService(runtime).revoke(connection_id, reason="test")
    assert result.provider_outcome == "failed_will_retry"
    assert all("client secret unreadable" in a for a in result.answers.values())
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
        events = [r.event for r in conn.execute(select(audit_events.c.event))]
        assert repository.count_pending_revocations(conn) == 2
    assert record is not None
    assert record.status == REVOKED
    assert record.refresh_token_ct is None
    assert record.access_token_ct is None
    assert "token.decryption_failed" in events
    assert peer.introspect(CLIENT, tokens["refresh_token"])["active"] is True

    # Still unreadable: the retry postpones instead of failing the whole retry run.
    later = datetime.now(UTC) + timedelta(hours=2)
    assert RevokeService(runtime, clock=lambda: later).retry_pending() == (0, 2)
    with runtime.engine.begin() as conn:
        conn.execute(update(providers).values(client_secret_ct=provider.client_secret_ct))
    much_later = later + timedelta(hours=2)
    assert RevokeService(runtime, clock=lambda: much_later).retry_pending() == (2, 0)
    assert peer.introspect(CLIENT, tokens["refresh_token"])["active"] is False


def test_bulk_revoke_finishes_itself_when_the_worker_stalls(
    runtime: Runtime, peer: OidcPeer
) -> None:
    """The compromise runbook must not hang on a broken worker: when no connection is revoked
    for the stall interval (here every task is lost), the command revokes the rest itself."""
    _provider(runtime, peer)
    ids = [_connect(runtime, peer, f"stall-{i}")[0] for i in range(3)]
    sent: list[str] = []
    seen: list[tuple[int, int]] = []
    report = revoke_many(
        runtime,
        ids,
        reason="test",
        dispatch=sent.append,
        progress=lambda done, total: seen.append((done, total)),
        flush_all_keys=False,
        stall_seconds=1.0,
    )
    assert sorted(sent) == sorted(ids)
    assert report.via_worker
    assert (report.targeted, report.revoked, report.revoked_here) == (3, 3, 3)
    assert seen[-1] == (3, 3)
    with runtime.engine.connect() as conn:
        assert repository.count_by_status(conn) == {"revoked": 3}
