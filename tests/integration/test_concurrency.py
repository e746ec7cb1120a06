"""One refresh per connection at a time, across processes, against a provider whose reuse
detection kills the grant on any second use of a refresh token."""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from config.settings import Settings
from grantkeeper import repository, sealing
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.runtime import Runtime
from tests.support.concurrent_refresh import refresh_together
from tests.support.oidc_peer import ClientSpec, OidcPeer

CLIENT = ClientSpec("gk-conc", "concurrency-client-secret-value", "client_secret_post")
PROCESSES = 4
THREADS = 5


def test_twenty_simultaneous_refreshes_make_one_provider_call(
    runtime: Runtime, settings: Settings
) -> None:
    """20 refresh requests (4 processes x 5 threads, released by one barrier) for the same
    connection: exactly one token request reaches oidc-provider, the other 19 see that the
    row moved and reuse its result, and the grant is still valid."""
    with OidcPeer.start([CLIENT], access_ttl=300) as peer:
        add_provider(
            runtime,
            ProviderSpec(
                name="oidc",
                token_url=peer.token_url,
                client_id=CLIENT.client_id,
                client_secret=CLIENT.client_secret,
                auth_method="client_secret_post",
            ),
        )
        tokens = peer.obtain_tokens(CLIENT)
        connection_id = import_connection(runtime, "oidc", "acct", json.dumps(tokens).encode())
        peer.reset_stats()
        ctx = multiprocessing.get_context("spawn")
        kwargs = settings.model_dump()
        with ctx.Manager() as manager, ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
            barrier = manager.Barrier(PROCESSES * THREADS)
            futures = [
                pool.submit(refresh_together, kwargs, connection_id, THREADS, barrier)
                for _ in range(PROCESSES)
            ]
            outcomes = Counter(o for f in futures for o in f.result(timeout=120))
        stats = peer.stats()
        print(f"\nconcurrency: outcomes {dict(outcomes)}, provider {stats}")
        assert stats["token_requests"] == 1
        assert stats["refresh_grants_ok"] == 1
        assert stats["reuse_detections"] == 0
        assert outcomes == Counter({"refreshed": 1, "refreshed_elsewhere": PROCESSES * THREADS - 1})
        with runtime.engine.connect() as conn:
            record = repository.get_connection(conn, connection_id)
        assert record is not None
        assert record.version == 2
        access = sealing.unseal(
            runtime.keyring,
            sealing.CONNECTIONS,
            connection_id,
            sealing.ACCESS_TOKEN,
            record.access_token_ct or "",
        )
        refresh = sealing.unseal(
            runtime.keyring,
            sealing.CONNECTIONS,
            connection_id,
            sealing.REFRESH_TOKEN,
            record.refresh_token_ct or "",
        )
        assert peer.introspect(CLIENT, access)["active"] is True
        status, body = peer.refresh(CLIENT, refresh)
        assert status == 200, body
