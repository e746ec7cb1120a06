"""End to end: a real ``celery worker`` and ``celery beat`` keep grants at oidc-provider (refresh
token rotation, reuse detection on) alive through several refresh cycles, on PostgreSQL and
Redis, checked by the provider's own introspection endpoint."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from config.settings import Settings
from grantkeeper import repository, sealing
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.runtime import Runtime
from tests.support.oidc_peer import ClientSpec, OidcPeer
from tests.support.processes import settings_env, start_celery, stop

ACCESS_TTL = 15  # seconds: short enough for three cycles in under a minute
CONNECTIONS = 12
CYCLES = 3
CLIENT = ClientSpec("gk-e2e", "e2e-client-secret-" + uuid.uuid4().hex, "client_secret_basic")

pytestmark = pytest.mark.e2e


def _access_tokens(rt: Runtime, provider_id: str) -> dict[str, tuple[int, str]]:
    with rt.engine.connect() as conn:
        rows = repository.list_connections(conn, provider_id=provider_id)
    return {
        r.id: (
            r.refresh_count,
            sealing.unseal(
                rt.keyring, sealing.CONNECTIONS, r.id, sealing.ACCESS_TOKEN, r.access_token_ct or ""
            ),
        )
        for r in rows
    }


def test_worker_and_beat_keep_grants_alive(
    runtime: Runtime, settings: Settings, tmp_path: Path
) -> None:
    """12 connections with 15 s access tokens stay valid at the provider through 3 refresh
    cycles driven only by beat and the worker, with zero reuse detections."""
    with OidcPeer.start([CLIENT], access_ttl=ACCESS_TTL) as peer:
        provider_id = add_provider(
            runtime,
            ProviderSpec(
                name="oidc",
                token_url=peer.token_url,
                revocation_url=peer.revocation_url,
                client_id=CLIENT.client_id,
                client_secret=CLIENT.client_secret,
            ),
        )
        for n in range(CONNECTIONS):
            tokens = peer.obtain_tokens(CLIENT, account=f"user{n}")
            import_connection(runtime, "oidc", f"user{n}", json.dumps(tokens).encode())
        peer.reset_stats()
        env = settings_env(
            settings,
            GRANTKEEPER_CELERY_QUEUE=f"gk-e2e-{uuid.uuid4().hex[:8]}",
            GRANTKEEPER_SCAN_INTERVAL_SECONDS="1",
            GRANTKEEPER_REFRESH_MARGIN_SECONDS="6",
            GRANTKEEPER_MIN_TOKEN_VALIDITY_SECONDS="1",
            GRANTKEEPER_CLOCK_SKEW_SECONDS="1",
            GRANTKEEPER_WORKER_CONCURRENCY="8",
        )
        worker = start_celery(
            "worker", env, tmp_path / "worker.log", "--without-mingle", "--without-gossip"
        )
        beat = start_celery(
            "beat", env, tmp_path / "beat.log", "--schedule", str(tmp_path / "beat-schedule")
        )
        checks = inactive = 0
        started = time.monotonic()
        try:
            deadline = started + ACCESS_TTL * (CYCLES + 2)
            while time.monotonic() < deadline:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                assert beat.poll() is None, (tmp_path / "beat.log").read_text()[-3000:]
                current = _access_tokens(runtime, provider_id)
                for _, token in current.values():
                    checks += 1
                    if not peer.introspect(CLIENT, token).get("active"):
                        inactive += 1
                if min(count for count, _ in current.values()) >= CYCLES:
                    break
                time.sleep(2)
        finally:
            stop(beat)
            stop(worker)
        elapsed = time.monotonic() - started
        final = _access_tokens(runtime, provider_id)
        stats = peer.stats()
        print(
            f"\ne2e: {CONNECTIONS} connections, {ACCESS_TTL}s tokens, {elapsed:.1f}s,"
            f" refreshes per connection {sorted(c for c, _ in final.values())},"
            f" provider stats {stats}, introspection checks {checks}, inactive {inactive}"
        )
        assert min(count for count, _ in final.values()) >= CYCLES
        assert stats["reuse_detections"] == 0
        assert stats["refresh_grants_failed"] == 0
        assert inactive == 0
        for _, token in final.values():
            assert peer.introspect(CLIENT, token)["active"] is True
        with runtime.engine.connect() as conn:
            statuses = repository.count_by_status(conn)
        assert statuses == {"active": CONNECTIONS}
