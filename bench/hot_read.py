"""Benchmark 1: the hot read. A valid, cached access token read through grantkeeper's library
API, against a bare redis-py GET of a value of the same size on the same connection.

Targets: median at most 1.25x the bare GET and p99 under 1 ms; with the process-local cache
(Redis client tracking) median at most 0.3x the bare GET, and invalidation seen within ms.

Method: one connection imported from the dev OAuth server into a throwaway PostgreSQL database;
the cache filled by one read; then rounds that alternate the floor and the measured read
(N calls each, timed one by one with perf_counter_ns), so drift hits both alike. Medians and
p99 over all calls; the ratio is per round, and the median ratio is reported.

Run: .venv/bin/python -m bench.hot_read
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis

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
from grantkeeper.refresh import RefreshService
from grantkeeper.runtime import Runtime

ROUNDS = 7
CALLS = 5000
CLIENT = DevClient("bench", "bench-client-secret-value", "client_secret_basic")


def _timings(fn: Callable[[], Any], calls: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        fn()
        out.append(clock() - start)
    return out


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000.0


def _measure(floor: Callable[[], Any], subject: Callable[[], Any]) -> dict[str, float]:
    floor_all: list[int] = []
    subject_all: list[int] = []
    ratios = []
    for _ in range(ROUNDS):
        f = _timings(floor, CALLS)
        s = _timings(subject, CALLS)
        floor_all += f
        subject_all += s
        ratios.append(statistics.median(s) / statistics.median(f))
    return {
        "floor_median_us": _pct(floor_all, 0.5),
        "floor_p99_us": _pct(floor_all, 0.99),
        "median_us": _pct(subject_all, 0.5),
        "p99_us": _pct(subject_all, 0.99),
        "ratio_median": statistics.median(ratios),
    }


def _invalidation_ms(reader: TokenReader, writer: Runtime, connection_id: str) -> list[float]:
    """Refresh through another runtime; time until the local cache serves the new token."""
    samples = []
    for _ in range(20):
        before = reader.get(connection_id)
        RefreshService(writer).refresh(connection_id, reason="bench", force=True)
        start = time.perf_counter()
        while reader.get(connection_id) == before:
            if time.perf_counter() - start > 2:
                raise RuntimeError("the local cache did not see the refresh within 2 s")
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def run() -> dict[str, Any]:
    keys = key_entry("kbench")
    with bench_database("hot_read") as url, DevOAuthServer([CLIENT]) as server:
        prefix = new_prefix("hot")
        plain = bench_settings(url, keys, prefix)
        migrate(plain)
        rt = Runtime(plain, actor="bench")
        add_provider(
            rt,
            ProviderSpec("dev", server.token_url, CLIENT.client_id, CLIENT.client_secret),
        )
        grant = server.mint_grant(CLIENT.client_id)
        connection_id = import_connection(rt, "dev", "acct", json.dumps(grant).encode())
        reader = TokenReader(rt)
        reader.get(connection_id)  # fill the Redis cache
        cached = rt.redis.get(rt.cache.access_key(connection_id))
        assert cached is not None
        floor_key = f"{prefix}floor"
        rt.redis.set(floor_key, b"x" * len(cached))
        client: redis.Redis = rt.redis

        log("redis-cached read vs bare GET")
        redis_path = _measure(lambda: client.get(floor_key), lambda: reader.get(connection_id))

        local_rt = Runtime(bench_settings(url, keys, prefix, local_cache=True), actor="bench-local")
        local_reader = TokenReader(local_rt)
        local_reader.get(connection_id)
        local_reader.get(connection_id)
        log("process-local read vs bare GET")
        local_path = _measure(
            lambda: local_rt.redis.get(floor_key), lambda: local_reader.get(connection_id)
        )
        writer = Runtime(bench_settings(url, keys, prefix), actor="bench-writer")
        invalidation = _invalidation_ms(local_reader, writer, connection_id)
        info = machine(url)
        for r in (rt, local_rt, writer):
            r.close()
        delete_prefix(redis.Redis.from_url(plain.redis_url.get_secret_value()), prefix)
    result = {
        "machine": info,
        "value_bytes": len(cached),
        "rounds": ROUNDS,
        "calls_per_round": CALLS,
        "redis_cached": redis_path,
        "local_cache": local_path,
        "invalidation_ms_median": statistics.median(invalidation),
        "invalidation_ms_max": max(invalidation),
    }
    save_result("hot_read", result, _markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    rc, lc = r["redis_cached"], r["local_cache"]
    return "\n".join(
        [
            "| read | median µs | p99 µs | bare GET median µs | ratio (median of rounds)"
            " | target |",
            "|---|---|---|---|---|---|",
            f"| Redis-cached, library API | {rc['median_us']:.1f} | {rc['p99_us']:.1f} |"
            f" {rc['floor_median_us']:.1f} | {rc['ratio_median']:.2f}x |"
            " ≤ 1.25x, p99 < 1000 µs |",
            f"| process-local cache | {lc['median_us']:.1f} | {lc['p99_us']:.1f} |"
            f" {lc['floor_median_us']:.1f} | {lc['ratio_median']:.2f}x | ≤ 0.3x |",
            "",
            f"Invalidation (refresh in another runtime, seen by the local cache):"
            f" median {r['invalidation_ms_median']:.2f} ms, max {r['invalidation_ms_max']:.2f} ms"
            f" over 20 refreshes. Cached value {r['value_bytes']} bytes;"
            f" {r['rounds']} rounds x {r['calls_per_round']} calls.",
            "",
            machine_line(r["machine"]),
        ]
    )


if __name__ == "__main__":
    outcome = run()
    print(json.dumps({k: v for k, v in outcome.items() if k != "machine"}, indent=2))
