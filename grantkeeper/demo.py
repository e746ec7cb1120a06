"""``grantkeeper demo``: the main job, end to end, on one machine.

Starts grantkeeper's dev OAuth server (rotation + reuse detection), registers it as a provider,
imports a few dozen short-lived grants, runs a real ``celery worker`` and ``celery beat``, shows
the refreshes as they happen, and ends with a summary checked against the provider itself.
The demo's provider, connections and Redis keys are removed at the end; its audit rows stay.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from config.logging import configure_logging
from config.settings import Settings, get_settings
from grantkeeper import repository, sealing
from grantkeeper.audit import cli_actor
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.db import upgrade
from grantkeeper.devserver import DevClient, DevOAuthServer
from grantkeeper.runtime import Runtime, set_runtime

console = Console(stderr=True)

REDIS_HELP = (
    "Redis is not reachable at {url}. grantkeeper needs it for its cache, locks and queue.\n"
    "Start one locally, for example:\n"
    "  redis-server --daemonize yes --port 6379 --save '' --appendonly no\n"
    "(Debian/Ubuntu: apt-get install redis-server), or point GRANTKEEPER_REDIS_URL at yours."
)


@dataclass
class DemoState:
    refreshed: int = 0
    failed: int = 0
    active: int = 0
    connections: int = 0


def _redis_ok(rt: Runtime) -> bool:
    try:
        return bool(rt.redis.ping())
    except redis.RedisError:
        return False


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    try:
        return subprocess.Popen(  # noqa: S603 - our own interpreter running celery
            [sys.executable, "-m", "celery", "-A", "worker", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _snapshot(rt: Runtime, provider_id: str) -> tuple[DemoState, list[repository.ConnectionRecord]]:
    with rt.engine.connect() as conn:
        rows = repository.list_connections(conn, provider_id=provider_id)
    state = DemoState(connections=len(rows))
    state.refreshed = sum(r.refresh_count for r in rows)
    state.failed = sum(1 for r in rows if r.last_error_class)
    state.active = sum(1 for r in rows if r.status == "active")
    return state, rows


def _table(state: DemoState, stats: dict[str, int], elapsed: float, seconds: int) -> Table:
    table = Table(title=f"grantkeeper demo: {elapsed:4.0f}s of {seconds}s")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("connections", str(state.connections))
    table.add_row("active", str(state.active))
    table.add_row("refreshes stored", str(state.refreshed))
    table.add_row("refreshes at the provider", str(stats.get("refresh_ok", 0)))
    table.add_row("connections with a failure", str(state.failed))
    table.add_row("reuse detections (grants killed)", str(stats.get("reuse_detections", 0)))
    return table


def run_demo(*, connections: int, seconds: int, access_ttl: int) -> int:
    """Run the demo; returns the process exit code (0 when every grant stayed valid)."""
    settings = get_settings()
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    audit_log = (settings.data_dir / "demo-audit.log").open("a", encoding="utf-8")
    try:
        return _run(
            settings, audit_log, connections=connections, seconds=seconds, access_ttl=access_ttl
        )
    finally:
        audit_log.close()


def _run(
    settings: Settings, audit_log: TextIO, *, connections: int, seconds: int, access_ttl: int
) -> int:
    # The demo's own audit lines go to a file so they do not scroll through the live table.
    configure_logging(settings.log_level, stream=audit_log)
    rt = Runtime(settings, actor=cli_actor())
    set_runtime(rt)
    if not _redis_ok(rt):
        console.print(REDIS_HELP.format(url=settings.redis_url))
        return 2
    upgrade(rt.engine)
    where = "embedded SQLite " + str(settings.sqlite_path) if settings.is_sqlite else "PostgreSQL"
    console.print(f"database: {where}")

    client = DevClient("demo-client", random_client_secret(), "client_secret_basic")
    run_id = uuid.uuid4().hex[:8]
    log_dir = settings.data_dir
    with DevOAuthServer([client], access_ttl=access_ttl) as server:
        provider_id = add_provider(
            rt,
            ProviderSpec(
                name=f"demo-{run_id}",
                token_url=server.token_url,
                revocation_url=server.revocation_url,
                client_id=client.client_id,
                client_secret=client.client_secret,
            ),
        )
        for n in range(connections):
            grant = server.mint_grant(client.client_id, access_ttl=access_ttl)
            import_connection(rt, f"demo-{run_id}", f"account-{n:03d}", json.dumps(grant).encode())
        console.print(
            f"dev OAuth server at {server.base_url}; {connections} connections imported with"
            f" {access_ttl}s access tokens"
        )
        margin = max(2, access_ttl // 2 - 1)
        env = {
            **os.environ,
            "GRANTKEEPER_REDIS_KEY_PREFIX": f"gkdemo{run_id}:",
            "GRANTKEEPER_CELERY_QUEUE": f"grantkeeper-demo-{run_id}",
            "GRANTKEEPER_SCAN_INTERVAL_SECONDS": "1",
            "GRANTKEEPER_REFRESH_MARGIN_SECONDS": str(margin),
            "GRANTKEEPER_MIN_TOKEN_VALIDITY_SECONDS": "1",
            "GRANTKEEPER_CLOCK_SKEW_SECONDS": "1",
            "GRANTKEEPER_WORKER_CONCURRENCY": "8",
        }
        worker_log = log_dir / "demo-worker.log"
        beat_log = log_dir / "demo-beat.log"
        worker = _spawn(
            ["worker", "--loglevel", "INFO", "--without-mingle", "--without-gossip"],
            env,
            worker_log,
        )
        beat = _spawn(
            ["beat", "--loglevel", "INFO", "--schedule", str(log_dir / "celerybeat-schedule")],
            env,
            beat_log,
        )
        console.print(
            f"celery worker and beat running (logs: {worker_log}, {beat_log};"
            f" the demo's own audit lines: {log_dir / 'demo-audit.log'})"
        )
        started = time.monotonic()
        try:
            with Live(console=console, refresh_per_second=2) as live:
                while (elapsed := time.monotonic() - started) < seconds:
                    if worker.poll() is not None or beat.poll() is not None:
                        console.print("[red]worker or beat exited early; see the logs above[/red]")
                        break
                    state, _ = _snapshot(rt, provider_id)
                    live.update(_table(state, server.stats(), elapsed, seconds))
                    time.sleep(0.5)
        finally:
            _stop(beat)
            _stop(worker)
        state, rows = _snapshot(rt, provider_id)
        valid = sum(1 for r in rows if r.access_token_ct and server.is_active(_open_access(rt, r)))
        stats = server.stats()
        _cleanup(rt, provider_id, f"gkdemo{run_id}:")
    console.print(_table(state, stats, seconds, seconds))
    console.print(
        f"summary: {state.refreshed} refreshed, {state.failed} failed,"
        f" {valid}/{len(rows)} still valid at the provider,"
        f" {stats.get('reuse_detections', 0)} reuse detections"
    )
    ok = (
        valid == len(rows)
        and stats.get("reuse_detections", 0) == 0
        and state.refreshed >= len(rows)
    )
    return 0 if ok else 1


def random_client_secret() -> str:
    return secrets.token_urlsafe(32)


def _open_access(rt: Runtime, record: repository.ConnectionRecord) -> str:
    assert record.access_token_ct is not None  # noqa: S101 - filtered by the caller
    return sealing.unseal(
        rt.keyring, sealing.CONNECTIONS, record.id, sealing.ACCESS_TOKEN, record.access_token_ct
    )


def _cleanup(rt: Runtime, provider_id: str, prefix: str) -> None:
    with rt.engine.begin() as conn:
        repository.delete_connections_of_provider(conn, provider_id)
        repository.delete_provider(conn, provider_id)
    from grantkeeper.cache import TokenCache  # noqa: PLC0415

    TokenCache(rt.redis, prefix).delete_all()
    rt.auditor.emit("demo.cleaned_up", "ok", provider_id=provider_id)
