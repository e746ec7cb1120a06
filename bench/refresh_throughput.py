"""Benchmarks 2 and 3: sustained refresh throughput through the whole loop (beat's scan, the
broker, real worker processes, the lock, PostgreSQL, the cache and the audit trail).

2. Against a provider that answers after 200 ms: target at least 300 refreshes/s on 2 cores.
3. Against a provider that answers at once, compared with a floor: one process doing only the
   HTTP call, the UPDATE and the cache SET per connection (same thread count), no queue, no
   lock. Target: at least 0.6x the floor.

Method: a standalone dev OAuth server process mints 20,000 real grants; they are bulk-loaded
(COPY, real row-bound ciphertexts) into a throwaway PostgreSQL database, all due; beat and
WORKERS worker processes (threads pool) start; the dev server's refresh counter is sampled
every 0.5 s. Sustained rate: refreshes between 10 % and 90 % of the total, over the time that
took. CPU per refresh: user+system time of the worker and beat process groups over the run.

Run: .venv/bin/python -m bench.refresh_throughput [--latency 0.2] [--workers 2] [--threads 64]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import text

from bench.common import (
    ROOT,
    PostgresCpu,
    bench_database,
    bench_settings,
    delete_celery_queue,
    delete_prefix,
    key_entry,
    load_connections,
    log,
    machine,
    machine_line,
    migrate,
    new_prefix,
    process_cpu_seconds,
    process_group,
    save_result,
)
from config.settings import settings_env
from grantkeeper import sealing
from grantkeeper.connections import ProviderSpec, add_provider
from grantkeeper.oauth import ProviderEndpoint
from grantkeeper.runtime import Runtime

CONNECTIONS = 20_000
CLIENT_ID, CLIENT_SECRET = "bench", "bench-client-secret-value"


def _devserver(latency: float) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "grantkeeper.devserver", "--port", "0",
            "--client", f"{CLIENT_ID}:{CLIENT_SECRET}:basic", "--latency", str(latency),
        ],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    return process, {**json.loads(process.stdout.readline()), "pid": process.pid}


def _mint(admin_url: str, count: int) -> list[tuple[str, str]]:
    response = httpx.post(
        f"{admin_url}/grants", json={"client_id": CLIENT_ID, "count": count}, timeout=120
    )
    response.raise_for_status()
    return [(g["access_token"], g["refresh_token"]) for g in response.json()]


def _refreshed(admin_url: str) -> int:
    return int(httpx.get(f"{admin_url}/stats", timeout=10).json()["refresh_ok"])


def _cpu_seconds(pgids: list[int]) -> float:
    """CPU seconds of every process in these process groups."""
    return sum(process_cpu_seconds(pid) or 0.0 for pgid in pgids for pid in process_group(pgid))


def _redis_server_cpu() -> float:
    """CPU seconds of every redis-server on this machine (the one the benchmark uses)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "redis-server":
                continue
        except OSError:
            continue
        total += process_cpu_seconds(int(entry.name)) or 0.0
    return total


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _sustained(samples: list[tuple[float, int]], total: int) -> float:
    low = next(t for t, n in samples if n >= total * 0.1)
    high = next(t for t, n in samples if n >= total * 0.9)
    return (0.8 * total) / max(high - low, 1e-9)


def _grantkeeper_run(
    url: str, keys: str, server: dict[str, Any], tokens: list[tuple[str, str]], args: Any
) -> dict[str, Any]:
    prefix = new_prefix("refresh")
    queue = f"gk-bench-refresh-{prefix.strip(':')}"
    settings = bench_settings(
        url, keys, prefix,
        celery_queue=queue, scan_interval_seconds=1.0, refresh_margin_seconds=60,
        scan_batch_limit=20000, refresh_batch_size=args.batch_size,
        worker_concurrency=args.threads,
        database_pool_size=max(5, args.threads // 2), http_max_connections=args.threads * 2,
        log_level="WARNING",
    )  # fmt: skip
    migrate(settings)
    rt = Runtime(settings, actor="bench")
    provider_id = add_provider(
        rt, ProviderSpec("dev", server["token_url"], CLIENT_ID, CLIENT_SECRET)
    )
    load_connections(
        url, keys=keys, primary=None, provider_id=provider_id, count=len(tokens),
        due=len(tokens), tokens=tokens,
    )  # fmt: skip
    env = settings_env(settings)
    logs = Path(tempfile.gettempdir())
    workers = [
        _spawn(["worker", "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
                "-n", f"bench{n}@%h"], env, logs / f"gk-bench-worker{n}.log")
        for n in range(args.workers)
    ]  # fmt: skip
    time.sleep(3)
    admin = server["admin_url"]
    base = _refreshed(admin)
    beat = _spawn(["beat", "--loglevel", "WARNING"], env, logs / "gk-bench-beat.log")
    started = time.monotonic()
    cpu_before = _cpu_seconds([p.pid for p in [*workers, beat]])
    provider_before, redis_before = (process_cpu_seconds(server["pid"]) or 0.0), _redis_server_cpu()
    samples: list[tuple[float, int]] = []
    try:
        with PostgresCpu(url) as postgres:
            while time.monotonic() - started < args.timeout:
                done = _refreshed(admin) - base
                samples.append((time.monotonic() - started, done))
                if done >= len(tokens):
                    break
                time.sleep(0.5)
            cpu = _cpu_seconds([p.pid for p in [*workers, beat]]) - cpu_before
            provider_cpu = (process_cpu_seconds(server["pid"]) or 0.0) - provider_before
            redis_cpu = _redis_server_cpu() - redis_before
    finally:
        for process in (beat, *workers):
            _stop(process)
    done = samples[-1][1]
    with rt.engine.connect() as conn:
        stored = conn.execute(text("SELECT sum(refresh_count) FROM connections")).scalar_one()
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    delete_prefix(client, prefix)
    delete_celery_queue(client, queue)
    rt.close()
    return {
        "refreshed_at_provider": done,
        "refreshes_stored": int(stored or 0),
        "elapsed_s": samples[-1][0],
        "sustained_per_s": _sustained(samples, done) if done >= 10 else 0.0,
        "cpu_ms_per_refresh": cpu * 1000 / max(done, 1),
        # Everything else on the box, per refresh, over the same interval.
        "cpu_ms_per_refresh_elsewhere": {
            "postgresql": postgres.seconds * 1000 / max(done, 1),
            "redis": redis_cpu * 1000 / max(done, 1),
            "provider (dev server)": provider_cpu * 1000 / max(done, 1),
        },
        "in_flight_estimate": None,
    }


def _floor_run(
    url: str, keys: str, server: dict[str, Any], tokens: list[tuple[str, str]], args: Any
) -> dict[str, Any]:
    """One process, same thread count: HTTP refresh, fenced UPDATE, cache SET. Nothing else."""
    prefix = new_prefix("floor")
    settings = bench_settings(
        url, keys, prefix, database_pool_size=args.threads, http_max_connections=args.threads * 2
    )
    rt = Runtime(settings, actor="floor")
    endpoint = ProviderEndpoint(
        server["token_url"], "client_secret_basic", CLIENT_ID, CLIENT_SECRET, timedelta(hours=1)
    )
    with rt.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM connections ORDER BY id"))]
    pairs = list(zip(ids, tokens, strict=False))
    counter = [0]
    lock = threading.Lock()

    def one(item: tuple[str, tuple[str, str]]) -> None:
        cid, (_, refresh_token) = item
        tokens_ = rt.oauth.refresh(endpoint, refresh_token)
        access_ct = sealing.seal(
            rt.keyring, sealing.CONNECTIONS, cid, sealing.ACCESS_TOKEN, tokens_.access_token
        )
        with rt.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE connections SET access_token_ct = :a, version = version + 1"
                    " WHERE id = :id"
                ),
                {"a": access_ct, "id": cid},
            )
        rt.cache.put(cid, 2, tokens_.expires_at, access_ct, 3000)
        with lock:
            counter[0] += 1

    cpu0 = time.process_time()
    start = time.monotonic()
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(one, pairs))
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
    delete_prefix(redis.Redis.from_url(settings.redis_url.get_secret_value()), prefix)
    rt.close()
    return {
        "refreshed": counter[0],
        "elapsed_s": elapsed,
        "per_s": counter[0] / elapsed,
        "cpu_ms_per_refresh": cpu * 1000 / counter[0],
    }


def _one_floor(keys: str, server: dict[str, Any], args: Any) -> dict[str, Any]:
    fresh = _mint(server["admin_url"], args.connections)
    with bench_database("refresh_floor") as floor_url:
        settings = bench_settings(floor_url, keys, new_prefix("floorload"))
        migrate(settings)
        rt = Runtime(settings, actor="floor")
        provider_id = add_provider(
            rt, ProviderSpec("dev", server["token_url"], CLIENT_ID, CLIENT_SECRET)
        )
        rt.close()
        load_connections(
            floor_url, keys=keys, primary=None, provider_id=provider_id, count=len(fresh),
            due=len(fresh), tokens=fresh,
        )  # fmt: skip
        return _floor_run(floor_url, keys, server, fresh, args)


def _median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: float(r[key]))
    return {**ordered[(len(ordered) - 1) // 2], f"{key}_runs": [round(r[key], 1) for r in runs]}


def run(args: Any) -> dict[str, Any]:
    """``args.runs`` runs of grantkeeper (and of the floor), alternating, each on fresh grants
    and a fresh database; the median run of each is reported, with every run's figure."""
    keys = key_entry("kbench")
    process, server = _devserver(args.latency)
    runs: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    try:
        for i in range(args.runs):
            log(f"run {i + 1} of {args.runs}")
            tokens = _mint(server["admin_url"], args.connections)
            with bench_database("refresh") as url:
                runs.append(_grantkeeper_run(url, keys, server, tokens, args))
                info = machine(url)
            if args.floor:
                floors.append(_one_floor(keys, server, args))
    finally:
        _stop(process)
    result = _median_run(runs, "sustained_per_s")
    floor = _median_run(floors, "per_s") if floors else None
    result["in_flight_estimate"] = round(result["sustained_per_s"] * max(args.latency, 0.001), 1)
    out = {
        "machine": info, "latency_s": args.latency, "connections": args.connections,
        "workers": args.workers, "threads_per_worker": args.threads, "runs": args.runs,
        "refresh_batch_size": args.batch_size, "grantkeeper": result, "floor": floor,
        "vs_floor": (result["sustained_per_s"] / floor["per_s"]) if floor else None,
        "at": datetime.now(UTC).isoformat(),
    }  # fmt: skip
    name = "refresh_realistic" if args.latency > 0 else "refresh_instant"
    save_result(name, out, _markdown(out))
    return out


def _markdown(r: dict[str, Any]) -> str:
    g = r["grantkeeper"]
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| provider latency | {r['latency_s'] * 1000:.0f} ms |",
        f"| workers x threads | {r['workers']} x {r['threads_per_worker']} |",
        f"| connections per refresh task | {r.get('refresh_batch_size', 1)} |",
        "| refreshes (provider / stored) | "
        f"{g['refreshed_at_provider']} / {g['refreshes_stored']} |",
        f"| sustained refreshes/s (10 %-90 %), median of {r.get('runs', 1)} runs | "
        f"**{g['sustained_per_s']:.0f}** (runs: {g.get('sustained_per_s_runs')}) |",
        f"| refreshes in flight (Little's law) | {g['in_flight_estimate']} |",
        f"| CPU per refresh (worker + beat) | {g['cpu_ms_per_refresh']:.2f} ms |",
    ]
    for where, ms in (g.get("cpu_ms_per_refresh_elsewhere") or {}).items():
        lines.append(f"| CPU per refresh, {where} | {ms:.2f} ms |")
    if r["floor"]:
        f = r["floor"]
        lines.append(
            "| floor: HTTP + UPDATE + SET, same threads, refreshes/s, median | "
            f"{f['per_s']:.0f} (runs: {f.get('per_s_runs')}; CPU {f['cpu_ms_per_refresh']:.2f} ms"
            " each) |"
        )
        lines.append(f"| grantkeeper / floor | {r['vs_floor']:.2f}x |")
    return "\n".join([*lines, "", machine_line(r["machine"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20, help="GRANTKEEPER_REFRESH_BATCH_SIZE")
    parser.add_argument("--floor", action="store_true", help="also run the floor (benchmark 3)")
    result = run(parser.parse_args())
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str))


if __name__ == "__main__":
    main()
