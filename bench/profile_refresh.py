"""Where a refresh's CPU goes: ``RefreshService.refresh`` on one thread under cProfile.

No Celery, no beat: the service call a worker thread makes, against a dev OAuth server that
answers at once (its own process, so its CPU is not counted), on a throwaway PostgreSQL
database holding real grants. Prints the CPU per refresh and the functions that take it.

    .venv/bin/python -m bench.profile_refresh [--connections 2000] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from bench.common import (
    bench_database,
    bench_settings,
    delete_prefix,
    key_entry,
    load_connections,
    log,
    migrate,
    new_prefix,
)
from bench.refresh_throughput import CLIENT_ID, CLIENT_SECRET, _devserver, _mint, _stop
from grantkeeper.connections import ProviderSpec, add_provider
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--dump", help="also write the raw stats here (for pstats callees)")
    args = parser.parse_args()
    keys = key_entry("kprof")
    process, server = _devserver(0.0)
    try:
        tokens = _mint(server["admin_url"], args.connections)
        with bench_database("profile") as url:
            prefix = new_prefix("profile")
            settings = bench_settings(url, keys, prefix, log_level="WARNING")
            migrate(settings)
            rt = Runtime(settings, actor="profile")
            provider_id = add_provider(
                rt, ProviderSpec("dev", server["token_url"], CLIENT_ID, CLIENT_SECRET)
            )
            loaded = load_connections(
                url, keys=keys, primary=None, provider_id=provider_id,
                count=len(tokens), due=len(tokens), tokens=tokens,
            )  # fmt: skip
            service = RefreshService(rt)
            ids = loaded.due_ids
            warm = ids[:50]
            for cid in warm:
                service.refresh(cid, reason="scheduled")
            profiler = cProfile.Profile(time.process_time)  # CPU, not waiting
            cpu0, wall0 = time.process_time(), time.perf_counter()
            profiler.enable()
            outcomes = [service.refresh(cid, reason="scheduled").outcome for cid in ids[50:]]
            profiler.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            n = len(outcomes)
            ok = sum(o is Outcome.REFRESHED for o in outcomes)
            log(f"{ok}/{n} refreshed; CPU {cpu * 1000 / n:.2f} ms, wall {wall * 1000 / n:.2f} ms")
            if args.dump:
                profiler.dump_stats(args.dump)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
            print(out.getvalue())
            import redis  # noqa: PLC0415

            delete_prefix(redis.Redis.from_url(settings.redis_url.get_secret_value()), prefix)
            rt.close()
    finally:
        _stop(process)


if __name__ == "__main__":
    main()
