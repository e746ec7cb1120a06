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
from urllib.parse import urlsplit

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from config.logging import configure_logging
from config.settings import Settings, get_settings
from grantkeeper import repository, sealing
from grantkeeper.audit import cli_actor
from grantkeeper.cache import TokenCache
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.db import upgrade
from grantkeeper.devserver import DevClient, DevOAuthServer
from grantkeeper.runtime import Runtime, set_runtime

console = Console(stderr=True, soft_wrap=True)

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


def _redis_address(settings: Settings) -> str:
    """host:port of the Redis URL, without the password."""
    parts = urlsplit(settings.redis_url.get_secret_value())
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"


def _redis_ok(rt: Runtime) -> bool:
    try:
        return bool(rt.redis.ping())
    except redis.RedisError:
        return False


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
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
    audit_path = settings.data_dir / "demo-audit.log"
    audit_log = os.fdopen(os.open(audit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a")
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
        console.print(REDIS_HELP.format(url=_redis_address(settings)))
        return 2
    upgrade(rt.engine)
    where = "embedded SQLite " + str(settings.sqlite_path) if settings.is_sqlite else "PostgreSQL"
    console.print(f"database: {where}")

    client = DevClient("demo-client", random_client_secret(), "client_secret_basic")
    run_id = uuid.uuid4().hex[:8]
    prefix = f"gkdemo{run_id}:"
    queue = f"grantkeeper-demo-{run_id}"
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
        # Whatever happens from here (Ctrl-C, SIGTERM, a crash), the demo's provider,
        # connections and Redis keys are removed and its processes stopped.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            for n in range(connections):
                grant = server.mint_grant(client.client_id, access_ttl=access_ttl)
                import_connection(
                    rt, f"demo-{run_id}", f"account-{n:03d}", json.dumps(grant).encode()
                )
            console.print(
                f"dev OAuth server at {server.base_url}; {connections} connections imported with"
                f" {access_ttl}s access tokens"
            )
            state, stats, valid, total = _drive(
                rt,
                server,
                settings,
                provider_id,
                prefix,
                queue,
                seconds=seconds,
                access_ttl=access_ttl,
            )
        finally:
            signal.signal(signal.SIGTERM, previous)
            _cleanup(rt, provider_id, prefix, queue)
    console.print(_table(state, stats, seconds, seconds))
    # Progress and the table go to stderr; the one-line verdict also to stdout, for scripts
    # (`./dev demo > result.txt`).
    summary = (
        f"summary: {state.refreshed} refreshed, {state.failed} failed,"
        f" {valid}/{total} still valid at the provider,"
        f" {stats.get('reuse_detections', 0)} reuse detections"
    )
    console.print(summary)
    if not sys.stdout.isatty() or not sys.stderr.isatty():
        print(summary, flush=True)
    ok = valid == total and stats.get("reuse_detections", 0) == 0 and state.refreshed >= total
    return 0 if ok else 1


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _drive(
    rt: Runtime,
    server: DevOAuthServer,
    settings: Settings,
    provider_id: str,
    prefix: str,
    queue: str,
    *,
    seconds: int,
    access_ttl: int,
) -> tuple[DemoState, dict[str, int], int, int]:
    """Run worker and beat for ``seconds``, showing progress; returns the final figures."""
    log_dir = settings.data_dir
    env = {
        **os.environ,
        "GRANTKEEPER_REDIS_KEY_PREFIX": prefix,
        "GRANTKEEPER_CELERY_QUEUE": queue,
        "GRANTKEEPER_SCAN_INTERVAL_SECONDS": "1",
        "GRANTKEEPER_REFRESH_MARGIN_SECONDS": str(max(2, access_ttl // 2 - 1)),
        "GRANTKEEPER_MIN_TOKEN_VALIDITY_SECONDS": "1",
        "GRANTKEEPER_CLOCK_SKEW_SECONDS": "1",
        "GRANTKEEPER_WORKER_CONCURRENCY": "8",
    }
    worker_log = log_dir / "demo-worker.log"
    beat_log = log_dir / "demo-beat.log"
    worker = _spawn(
        ["worker", "--loglevel", "INFO", "--without-mingle", "--without-gossip"], env, worker_log
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
        _watch(rt, server, provider_id, worker, beat, started, seconds)
    finally:
        _stop(beat)
        _stop(worker)
    state, rows = _snapshot(rt, provider_id)
    valid = sum(1 for r in rows if r.access_token_ct and server.is_active(_open_access(rt, r)))
    return state, server.stats(), valid, len(rows)


def _watch(
    rt: Runtime,
    server: DevOAuthServer,
    provider_id: str,
    worker: subprocess.Popen[bytes],
    beat: subprocess.Popen[bytes],
    started: float,
    seconds: int,
) -> None:
    """A live table on a terminal; a progress line every 5 s elsewhere (logs, CI)."""
    last_line = 0.0
    with (
        Live(console=console, refresh_per_second=2, transient=False)
        if console.is_terminal
        else _NoLive() as live
    ):
        while (elapsed := time.monotonic() - started) < seconds:
            if worker.poll() is not None or beat.poll() is not None:
                console.print("[red]worker or beat exited early; see their logs[/red]")
                return
            state, _ = _snapshot(rt, provider_id)
            if live is not None:
                live.update(_table(state, server.stats(), elapsed, seconds))
            elif elapsed - last_line >= 5:
                last_line = elapsed
                console.print(
                    f"{elapsed:4.0f}s: {state.refreshed} refreshes stored,"
                    f" {state.failed} with a failure, {state.active} active"
                )
            time.sleep(0.5)


class _NoLive:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def random_client_secret() -> str:
    return secrets.token_urlsafe(32)


def _open_access(rt: Runtime, record: repository.ConnectionRecord) -> str:
    assert record.access_token_ct is not None  # noqa: S101 - filtered by the caller
    return sealing.unseal(
        rt.keyring, sealing.CONNECTIONS, record.id, sealing.ACCESS_TOKEN, record.access_token_ct
    )


def _cleanup(rt: Runtime, provider_id: str, prefix: str, queue: str) -> None:
    with rt.engine.begin() as conn:
        repository.delete_connections_of_provider(conn, provider_id)
        repository.delete_provider(conn, provider_id)
    TokenCache(rt.redis, prefix).delete_all()
    # Celery's own keys for the demo's queue live outside grantkeeper's prefix.
    rt.redis.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    rt.auditor.emit("demo.cleaned_up", "ok", provider_id=provider_id)
