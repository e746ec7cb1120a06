"""Item 6: worker resident memory at idle and after 20,000 refreshes.

A real ``celery -A worker worker`` (threads pool, ``GRANTKEEPER_WORKER_CONCURRENCY`` threads,
settings from the environment, log level INFO as in production, its output to a file) refreshes
real grants at a standalone dev OAuth server (``python -m grantkeeper.devserver``, latency 0,
refresh-token rotation and reuse detection on). The database holds warm-up + 20,000 connections,
all due, sealed with real tokens minted by that server. Each refresh is the real task
``grantkeeper.refresh_connection`` sent to the worker's own (throwaway) queue.

Memory is the resident set (``VmRSS``) summed over the worker's process group, sampled at idle:
after the warm-up refreshes (the floor), and again once all 20,000 have been answered by the
provider and the worker is idle again. The median of several samples each; growth is the ratio.

    .venv/bin/python -m bench.worker_memory [--refreshes 20000] [--warmup 200]
    .venv/bin/python -m bench.worker_memory --tracemalloc   # debug: where did memory go?

With ``--tracemalloc`` the worker runs under ``bench.memprobe`` (the same app, plus tracemalloc
and a SIGUSR2 handler that writes a snapshot), and the biggest differences between the idle and
the final snapshot are printed. Slower; its RSS figures are not the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import common
from config.logging import configure_logging
from config.settings import Settings, settings_env
from grantkeeper.runtime import Runtime

TARGET_GROWTH = 0.10
SAMPLES = 7


def _start_devserver(workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    log = (workdir / "devserver.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grantkeeper.devserver",
            "--port",
            "0",
            "--client",
            f"{common.BENCH_CLIENT_ID}:{common.BENCH_CLIENT_SECRET}",
            "--latency",
            "0",
            "--access-ttl",
            "3600",
        ],
        cwd=common.ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError("the dev server did not start; see devserver.log")
    return process, json.loads(line)


def _stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start_worker(
    settings: Settings, workdir: Path, app: str, hostname: str, extra_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = settings_env(settings, PYTHONPATH=str(common.ROOT), **extra_env)
    log = (workdir / "worker.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "--loglevel",
            "INFO",
            "--hostname",
            f"{hostname}@%h",
        ],
        cwd=workdir,  # no developer .env there
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _refreshed(admin_url: str) -> int:
    return int(httpx.get(f"{admin_url}/stats", timeout=10).json()["refresh_ok"])


def _wait_for(
    admin_url: str, count: int, worker: subprocess.Popen[bytes], timeout: float, label: str
) -> float:
    started = time.monotonic()
    last_report = started
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}); see worker.log")
        done = _refreshed(admin_url)
        if done >= count:
            return time.monotonic() - started
        now = time.monotonic()
        if now - started > timeout:
            raise RuntimeError(f"{label}: only {done:,} of {count:,} refreshes after {timeout} s")
        if now - last_report >= 15:
            common.log(f"{label}: {done:,} / {count:,} refreshed")
            last_report = now
        time.sleep(0.5)


def _rss(pgid: int) -> dict[str, Any]:
    """Median over SAMPLES samples, one second apart, of the group's RSS (MiB), plus the main
    process's anonymous RSS, high-water mark and thread count at the last sample."""
    values = []
    for _ in range(SAMPLES):
        values.append(common.group_rss_kib(pgid) / 1024)
        time.sleep(1)
    status = common.proc_status(pgid)
    return {
        "rss_mib": common.median(values),
        "samples_mib": values,
        "rss_anon_mib": status.get("RssAnon", 0) / 1024,
        "hwm_mib": status.get("VmHWM", 0) / 1024,
        "threads": status.get("Threads", 0),
        "processes": len(common.process_group(pgid)),
    }


def _snapshot(worker: subprocess.Popen[bytes], path: Path) -> None:
    os.kill(worker.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no tracemalloc snapshot from the worker")
        time.sleep(0.5)


def _prepare(
    settings: Settings, rt: Runtime, keys: str, urls: dict[str, Any], total: int
) -> list[str]:
    """Schema, the provider, ``total`` grants minted by the dev server and as many due
    connections sealed with their tokens; returns the connection ids."""
    url = settings.effective_database_url
    common.migrate(settings)
    provider_id = common.add_bench_provider(rt, urls["token_url"])
    grants = httpx.post(
        f"{urls['admin_url']}/grants",
        json={"client_id": common.BENCH_CLIENT_ID, "count": total},
        timeout=120,
    ).json()
    tokens = [(str(g["access_token"]), str(g["refresh_token"])) for g in grants]
    load = common.load_connections(
        url,
        keys=keys,
        primary=None,
        provider_id=provider_id,
        count=total,
        due=total,
        tokens=tokens,
    )
    common.log(f"{total:,} due connections loaded in {load.seconds:.1f} s")
    common.vacuum_analyze(url)
    return load.due_ids


def _send(app: Any, ids: list[str]) -> None:
    for cid in ids:
        app.send_task("grantkeeper.refresh_connection", args=[cid, "scheduled"])


def _measure(
    app: Any,
    worker: subprocess.Popen[bytes],
    admin_url: str,
    ids: list[str],
    warmup: int,
    trace: bool,
    snapshots: Path,
) -> dict[str, Any]:
    """Warm up, measure idle, refresh the rest, measure idle again."""
    started = time.monotonic()
    _send(app, ids[:warmup])
    _wait_for(admin_url, warmup, worker, 300, "warm-up")
    common.log(f"worker up, {warmup} warm-up refreshes in {time.monotonic() - started:.1f} s")
    time.sleep(5)
    idle = _rss(worker.pid)
    common.log(f"idle: {idle['rss_mib']:.1f} MiB")
    if trace:
        _snapshot(worker, snapshots / "idle.snap")
    started = time.monotonic()
    _send(app, ids[warmup:])
    _wait_for(admin_url, len(ids), worker, 1800, "refreshes")
    elapsed = time.monotonic() - started
    rate = (len(ids) - warmup) / elapsed
    common.log(f"{len(ids) - warmup:,} refreshes in {elapsed:.1f} s ({rate:,.0f}/s)")
    time.sleep(5)
    after = _rss(worker.pid)
    common.log(f"after: {after['rss_mib']:.1f} MiB")
    diff: list[str] = []
    if trace:
        _snapshot(worker, snapshots / "after.snap")
        diff = _diff(snapshots / "idle.snap", snapshots / "after.snap")
    stats = httpx.get(f"{admin_url}/stats", timeout=10).json()
    return {"idle": idle, "after": after, "rate": rate, "diff": diff, "stats": stats}


def run(refreshes: int, warmup: int, trace: bool) -> tuple[dict[str, Any], str, bool]:
    info = common.machine()
    keys = common.key_entry("bench")
    prefix = common.new_prefix("memory")
    queue = f"gkbench.memory.{uuid.uuid4().hex[:8]}"
    hostname = f"gkbench-{uuid.uuid4().hex[:6]}"
    total = warmup + refreshes
    with common.bench_database("memory") as url, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        devserver, urls = _start_devserver(workdir)
        worker: subprocess.Popen[bytes] | None = None
        settings = common.bench_settings(url, keys, prefix, celery_queue=queue)
        rt = Runtime(settings, actor="bench:worker_memory")
        try:
            ids = _prepare(settings, rt, keys, urls, total)

            from worker.app import create_app  # noqa: PLC0415 - built from these settings

            app = create_app(settings)
            snapshots = workdir / "snapshots"
            extra = {}
            if trace:
                snapshots.mkdir()
                extra = {"GK_BENCH_SNAPSHOT_DIR": str(snapshots)}
            worker = _start_worker(
                settings, workdir, "bench.memprobe" if trace else "worker", hostname, extra
            )
            measured = _measure(app, worker, urls["admin_url"], ids, warmup, trace, snapshots)
            app.close()
        finally:
            if worker is not None:
                _stop(worker)
                common.log("worker log tail:\n" + _tail(workdir / "worker.log"))
            _stop(devserver)
            common.delete_prefix(rt.redis, prefix)
            _forget_worker(rt, queue, hostname)
            rt.close()
    idle, after, stats = measured["idle"], measured["after"], measured["stats"]
    growth = after["rss_mib"] / idle["rss_mib"] - 1
    passed = growth <= TARGET_GROWTH and stats["refresh_failed"] == 0
    data = {
        "machine": info,
        "warmup": warmup,
        "refreshes": refreshes,
        "refreshes_per_second": measured["rate"],
        "idle": idle,
        "after": after,
        "growth": growth,
        "target_growth": TARGET_GROWTH,
        "provider_stats": stats,
        "tracemalloc_top": measured["diff"],
        "passed": passed,
    }
    return data, _markdown(data), passed


def _diff(before: Path, after: Path, top: int = 25) -> list[str]:
    old = tracemalloc.Snapshot.load(str(before))
    new = tracemalloc.Snapshot.load(str(after))
    stats = new.compare_to(old, "traceback")
    lines = []
    for stat in stats[:top]:
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks")
        lines.extend(f"    {line}" for line in stat.traceback.format()[-6:])
    for line in lines:
        print(line)
    return lines


def _forget_worker(rt: Runtime, queue: str, hostname: str) -> None:
    """Remove what the worker left in the broker's Redis database: our queue, and our members
    of kombu's binding sets (pidbox, events) and the keys named after our worker."""
    client = rt.redis
    common.delete_celery_queue(client, queue)
    for key in client.scan_iter(match="_kombu.binding.*", count=1000):
        ours = [m for m in client.smembers(key) if hostname.encode() in m or queue.encode() in m]
        if ours:
            client.srem(key, *ours)
    common.delete_prefix(client, hostname)


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _markdown(data: dict[str, Any]) -> str:
    idle, after = data["idle"], data["after"]
    growth = data["growth"]
    verdict = "met" if data["passed"] else "MISSED"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with"
        " `.venv/bin/python -m bench.worker_memory`.",
        f"Machine: {common.machine_line(data['machine'])}.",
        "",
        "One `celery -A worker worker --loglevel INFO` (threads pool, concurrency 32) against a"
        " standalone dev OAuth server with no latency; every connection due; each refresh is the"
        f" real task sent to the worker's own queue. {data['refreshes']:,} refreshes took"
        f" {data['refreshes'] / data['refreshes_per_second']:.0f} s"
        f" ({data['refreshes_per_second']:,.0f}/s); provider counters"
        f" {data['provider_stats']}.",
        "",
        f"| worker (median of {SAMPLES} samples, 1 s apart) | RSS | anonymous | peak (VmHWM)"
        " | threads |",
        "|---|---:|---:|---:|---:|",
        f"| idle, after {data['warmup']} warm-up refreshes (the floor) | {idle['rss_mib']:.1f} MiB"
        f" | {idle['rss_anon_mib']:.1f} MiB | {idle['hwm_mib']:.1f} MiB | {idle['threads']} |",
        f"| idle again, after {data['refreshes']:,} more refreshes | {after['rss_mib']:.1f} MiB"
        f" | {after['rss_anon_mib']:.1f} MiB | {after['hwm_mib']:.1f} MiB | {after['threads']} |",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| growth <= {data['target_growth']:.0%} | **{growth:+.1%}**"
        f" ({after['rss_mib'] - idle['rss_mib']:+.1f} MiB) | {verdict} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_memory", description=__doc__)
    parser.add_argument("--refreshes", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    data, markdown, passed = run(args.refreshes, args.warmup, args.tracemalloc)
    if args.tracemalloc:
        common.save_result("worker_memory_tracemalloc", data, markdown)
    else:
        common.save_result("worker_memory", data, markdown)
    print(markdown)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
