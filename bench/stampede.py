"""Benchmark 7: the stampede. 100 simultaneous reads of one connection whose access token has
expired, against a provider that answers after 200 ms: exactly one provider call, and every
caller holds the new token within 2x the time of a single refresh.

Method: a standalone-thread dev OAuth server with 200 ms latency; a throwaway PostgreSQL
database; the floor is one read of an expired connection (one refresh, nobody waiting), the
subject 100 threads released together by a barrier, each reading the same expired connection
through the library API. Time = from the barrier to the last caller returning. Repeated
ROUNDS times on fresh connections; medians reported.

Run: .venv/bin/python -m bench.stampede
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import update

from bench.common import (
    bench_database,
    bench_settings,
    delete_prefix,
    key_entry,
    log,
    machine,
    machine_line,
    migrate,
    new_prefix,
    save_result,
)
from grantkeeper.api import TokenReader
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.devserver import DevClient, DevOAuthServer
from grantkeeper.models import connections
from grantkeeper.runtime import Runtime

READERS = 100
ROUNDS = 7
LATENCY = 0.2
CLIENT = DevClient("bench", "bench-client-secret-value", "client_secret_basic")


def _expired_connection(rt: Runtime, server: DevOAuthServer, account: str) -> str:
    grant = server.mint_grant(CLIENT.client_id)
    connection_id = import_connection(rt, "dev", account, json.dumps(grant).encode())
    with rt.engine.begin() as conn:
        conn.execute(
            update(connections)
            .where(connections.c.id == connection_id)
            .values(access_expires_at=datetime.now(UTC) - timedelta(seconds=5))
        )
    rt.cache.drop(connection_id)
    return connection_id


def _single(rt: Runtime, server: DevOAuthServer, n: int) -> float:
    connection_id = _expired_connection(rt, server, f"single-{n}")
    start = time.perf_counter()
    TokenReader(rt).get(connection_id)
    return time.perf_counter() - start


def _stampede(rt: Runtime, server: DevOAuthServer, n: int) -> tuple[float, int, int]:
    connection_id = _expired_connection(rt, server, f"stampede-{n}")
    before = server.stats()["refresh_ok"]
    barrier = threading.Barrier(READERS + 1)
    tokens: list[str] = []
    finished: list[float] = []
    lock = threading.Lock()

    def read() -> None:
        barrier.wait()
        token = TokenReader(rt).get(connection_id)
        with lock:
            tokens.append(token)
            finished.append(time.perf_counter())

    threads = [threading.Thread(target=read) for _ in range(READERS)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    calls = server.stats()["refresh_ok"] - before
    return max(finished) - start, calls, len(set(tokens))


def run() -> dict[str, Any]:
    keys = key_entry("kbench")
    with bench_database("stampede") as url, DevOAuthServer([CLIENT], latency=LATENCY) as server:
        prefix = new_prefix("stampede")
        settings = bench_settings(url, keys, prefix, database_pool_size=20)
        migrate(settings)
        rt = Runtime(settings, actor="bench")
        add_provider(
            rt, ProviderSpec("dev", server.token_url, CLIENT.client_id, CLIENT.client_secret)
        )
        _single(rt, server, -1)  # warm the pools
        singles, waves = [], []
        for n in range(ROUNDS):
            singles.append(_single(rt, server, n))
            elapsed, calls, distinct = _stampede(rt, server, n)
            waves.append({"seconds": elapsed, "provider_calls": calls, "distinct_tokens": distinct})
            log(
                f"round {n}: single {singles[-1] * 1000:.0f} ms,"
                f" {READERS} readers {elapsed * 1000:.0f} ms, {calls} call(s)"
            )
        info = machine(url)
        rt.close()
        delete_prefix(redis.Redis.from_url(settings.redis_url.get_secret_value()), prefix)
    single = statistics.median(singles)
    wave = statistics.median(w["seconds"] for w in waves)
    result = {
        "machine": info,
        "readers": READERS,
        "provider_latency_s": LATENCY,
        "single_refresh_ms_median": single * 1000,
        "stampede_ms_median": wave * 1000,
        "ratio": wave / single,
        "provider_calls_per_stampede": [w["provider_calls"] for w in waves],
        "distinct_tokens_per_stampede": [w["distinct_tokens"] for w in waves],
    }
    save_result("stampede", result, _markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    calls = r["provider_calls_per_stampede"]
    tokens = r["distinct_tokens_per_stampede"]
    latency_ms = r["provider_latency_s"] * 1000
    return "\n".join(
        [
            "| measure | value | target |",
            "|---|---|---|",
            f"| provider calls per stampede ({r['readers']} readers, {len(calls)} rounds)"
            f" | {calls} | exactly 1 |",
            f"| distinct tokens handed out per stampede | {tokens} | 1 |",
            f"| single refresh (one reader), median | {r['single_refresh_ms_median']:.0f} ms"
            " | floor |",
            f"| all {r['readers']} readers served, median | {r['stampede_ms_median']:.0f} ms | |",
            f"| ratio | {r['ratio']:.2f}x | ≤ 2x |",
            "",
            f"Provider latency {latency_ms:.0f} ms (dev OAuth server, in-process threads).",
            "",
            machine_line(r["machine"]),
        ]
    )


if __name__ == "__main__":
    outcome = run()
    print(json.dumps({k: v for k, v in outcome.items() if k != "machine"}, indent=2))
