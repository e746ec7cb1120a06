"""Redis over TLS, for real: a test-owned ``redis-server`` that listens only on TLS (with a
password and a generated CA) carries grantkeeper's cache and locks, the Celery broker and
RedBeat, all configured from one ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=...`` URL;
and a URL that trusts the wrong CA fails loudly, classified, before any refresh happens.

PostgreSQL (the ``runtime`` fixture's database) and the ``devserver`` OAuth server are the
usual test ones; only Redis changes.
"""

from __future__ import annotations

import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from redbeat.schedulers import REDBEAT_REDIS_KEY, get_redis
from sqlalchemy import func, select, update

from config.settings import Settings
from grantkeeper import repository
from grantkeeper.api import TokenReader
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import audit_events, connections
from grantkeeper.redisconn import VerifiedSSLConnection
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant
from tests.support.processes import settings_env, start_celery, stop
from tests.support.redis_server import RedisServer, redis_server_has_tls
from tests.support.tls import TlsMaterial, make_tls_material
from worker.app import create_app

pytestmark = pytest.mark.e2e

GRANTKEEPER = Path(sys.executable).parent / "grantkeeper"
PASSWORD = "tls-redis-pw-" + secrets.token_hex(12)  # 37 characters
CONNECTIONS = 6
DEADLINE = 45.0  # seconds for worker and beat to refresh everything
EX_CONFIG = 78
VERIFY_FAILED = re.compile(r"TLS certificate verification failed for Redis at 127\.0\.0\.1:\d+")


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_redis(tmp_path: Path, tls_material: TlsMaterial) -> Iterator[RedisServer]:
    """A redis-server on TLS only (``--port 0 --tls-port P``), password required."""
    if not redis_server_has_tls():
        pytest.skip("redis-server was built without TLS")
    with RedisServer.start(tmp_path / "redis", password=PASSWORD, tls=tls_material) as server:
        yield server


def _with_redis(settings: Settings, redis_url: str) -> Settings:
    """The test settings (database, keyring, prefix, timings) with another Redis URL, built
    through validation like any other settings."""
    values: dict[str, Any] = {**settings.model_dump(), "redis_url": redis_url}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def _raw_client(server: RedisServer) -> redis.Redis:
    """A plain redis-py client on the TLS server (not grantkeeper's code), for inspection."""
    return redis.Redis.from_url(server.tls_url())


def _commands(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _make_due(runtime: Runtime, ids: list[str]) -> None:
    """Expiry inside the 60 s margin, issued an hour ago (so the margin is not capped)."""
    now = datetime.now(UTC)
    with runtime.engine.begin() as conn:
        conn.execute(
            update(connections)
            .where(connections.c.id.in_(ids))
            .values(
                access_expires_at=now + timedelta(seconds=30),
                access_issued_at=now - timedelta(hours=1),
            )
        )


def _versions(runtime: Runtime, ids: list[str]) -> dict[str, int]:
    with runtime.engine.connect() as conn:
        return {i: repository.get_connection(conn, i).version for i in ids}  # type: ignore[union-attr]


def test_refresh_path_uses_the_tls_redis(
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
    tls_redis: RedisServer,
) -> None:
    """In process: a forced refresh takes its lock and writes its cache entry in the TLS Redis
    (seen there with a plain redis-py client), the dev server sees one successful refresh, and
    the next read is served from that cache. Prints the cost of TLS per cache read."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "tls-inproc")
    devserver.reset_stats()
    tls_settings = _with_redis(settings, tls_redis.tls_url())
    tls_rt = Runtime(tls_settings, actor="test")
    raw = _raw_client(tls_redis)
    try:
        assert tls_rt.redis.connection_pool.connection_class is VerifiedSSLConnection
        before = _commands(raw)
        result = RefreshService(tls_rt).refresh(connection_id, reason="on_demand", force=True)
        assert result.outcome is Outcome.REFRESHED, result
        assert devserver.stats()["refresh_ok"] == 1

        after = _commands(raw)
        # The lock: SET NX PX to take it, a Lua script (EVALSHA) to release it.
        assert after.get("set", 0) > before.get("set", 0)
        assert after.get("evalsha", 0) + after.get("eval", 0) > before.get(
            "evalsha", 0
        ) + before.get("eval", 0)
        cache_key = tls_rt.cache.access_key(connection_id)
        assert raw.exists(cache_key) == 1
        assert raw.exists(tls_rt.cache.lock_key(connection_id)) == 0  # released
        cached = tls_rt.cache.get(connection_id)
        assert cached is not None
        assert cached.version == result.version

        reader = TokenReader(tls_rt)
        assert reader.get(connection_id, audit=False) == TokenReader(runtime).get(
            connection_id, audit=False
        )
        assert devserver.stats()["refresh_ok"] == 1  # the reads refreshed nothing

        _print_tls_overhead(tls_rt, runtime, connection_id)
    finally:
        tls_rt.cache.delete_all()
        tls_rt.close()
        raw.close()


def _print_tls_overhead(tls_rt: Runtime, plain_rt: Runtime, connection_id: str) -> None:
    """Median GET latency on an open connection (TLS vs plain), and the cost of a new TLS
    connection (TCP + handshake + AUTH) - informational only."""

    def median_get(rt: Runtime) -> float:
        key = rt.cache.access_key(connection_id)
        rt.redis.get(key)  # warm: connection open
        samples = []
        for _ in range(300):
            began = time.perf_counter()
            rt.redis.get(key)
            samples.append(time.perf_counter() - began)
        return sorted(samples)[len(samples) // 2]

    def median_connect(url: str) -> float:
        samples = []
        for _ in range(20):
            client = redis.Redis.from_url(url)
            began = time.perf_counter()
            client.ping()
            samples.append(time.perf_counter() - began)
            client.close()
        return sorted(samples)[len(samples) // 2]

    tls_get, plain_get = median_get(tls_rt), median_get(plain_rt)
    tls_connect = median_connect(tls_rt.settings.redis_url.get_secret_value())
    plain_connect = median_connect(plain_rt.settings.redis_url.get_secret_value())
    print(
        f"\nredis GET median: TLS {tls_get * 1e6:.0f} us, plain {plain_get * 1e6:.0f} us;"
        f" connect+PING median: TLS {tls_connect * 1e3:.2f} ms, plain {plain_connect * 1e3:.2f} ms"
    )


def test_worker_and_beat_refresh_over_tls(
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
    tls_redis: RedisServer,
    tmp_path: Path,
) -> None:
    """A real worker and beat whose broker (kombu) and RedBeat both use the TLS Redis refresh
    every due connection: the dev server counts each refresh once, ``scan.completed`` audit
    events exist, and the TLS Redis (not the shared one) holds the queue's bindings and
    RedBeat's keys. Neither process logs kombu's "insecure SSL" fallback."""
    ids = [
        import_grant(runtime, devserver, provider_name, f"tls{n}", access_ttl=3600)[0]
        for n in range(CONNECTIONS)
    ]
    _make_due(runtime, ids)
    versions = _versions(runtime, ids)
    devserver.reset_stats()
    tls_settings = _with_redis(settings, tls_redis.tls_url())
    queue = f"gk-tls-{uuid.uuid4().hex[:8]}"
    env = settings_env(
        tls_settings,
        GRANTKEEPER_CELERY_QUEUE=queue,
        GRANTKEEPER_SCAN_INTERVAL_SECONDS="1",
        GRANTKEEPER_REFRESH_MARGIN_SECONDS="60",
        GRANTKEEPER_WORKER_CONCURRENCY="4",
    )
    assert env["GRANTKEEPER_REDIS_URL"].startswith("rediss://")
    assert "GRANTKEEPER_BROKER_URL" not in env  # the broker is the same TLS Redis
    worker_log, beat_log = tmp_path / "worker.log", tmp_path / "beat.log"
    worker = start_celery("worker", env, worker_log, "--without-mingle", "--without-gossip")
    beat = start_celery("beat", env, beat_log, "--schedule", str(tmp_path / "beat-schedule"))
    started = time.monotonic()
    raw = _raw_client(tls_redis)
    try:
        while time.monotonic() - started < DEADLINE:
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            assert beat.poll() is None, beat_log.read_text()[-3000:]
            if devserver.stats()["refresh_ok"] >= CONNECTIONS:
                break
            time.sleep(0.5)
        prefix = settings.redis_key_prefix
        bindings = raw.exists(f"_kombu.binding.{queue}")
        redbeat_keys = list(raw.scan_iter(match=f"{prefix}redbeat:*"))
    finally:
        stop(beat)
        stop(worker)
        raw.close()
    elapsed = time.monotonic() - started
    stats = devserver.stats()
    with runtime.engine.connect() as conn:
        scans = conn.execute(
            select(func.count()).where(audit_events.c.event == "scan.completed")
        ).scalar_one()
    print(f"\nTLS worker+beat: {CONNECTIONS} refreshed in {elapsed:.1f}s, {scans} scans, {stats}")
    logs = worker_log.read_text() + beat_log.read_text()
    assert stats["refresh_ok"] == CONNECTIONS, logs[-4000:]
    assert stats["reuse_detections"] == 0
    assert scans >= 1
    after = _versions(runtime, ids)
    assert all(after[i] > versions[i] for i in ids), (versions, after)
    assert bindings == 1, "the broker did not declare its queue on the TLS Redis"
    assert redbeat_keys, "RedBeat wrote nothing to the TLS Redis"
    assert runtime.redis.exists(f"_kombu.binding.{queue}") == 0  # not the shared Redis
    assert "insecure SSL" not in logs
    assert "CERTIFICATE_VERIFY_FAILED" not in logs


def test_wrong_ca_fails_classified_and_refreshes_nothing(
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
    tls_redis: RedisServer,
    tls_material: TlsMaterial,
    tmp_path: Path,
) -> None:
    """Trusting an unrelated CA: ``grantkeeper token`` and ``grantkeeper refresh`` exit 1 with
    one classified line (``redis_tls``: TLS certificate verification failed for Redis at
    host:port), a worker and a beat exit 78 at start-up saying the same, and the provider sees
    no request at all."""
    connection_id, _ = import_grant(runtime, devserver, provider_name, "tls-wrong-ca")
    _make_due(runtime, [connection_id])
    versions = _versions(runtime, [connection_id])
    devserver.reset_stats()
    bad_settings = _with_redis(settings, tls_redis.tls_url(tls_material.other_ca_cert))
    env = settings_env(bad_settings, GRANTKEEPER_CELERY_QUEUE=f"gk-badca-{uuid.uuid4().hex[:8]}")

    for command in (("token", connection_id), ("refresh", connection_id)):
        result = subprocess.run(
            [str(GRANTKEEPER), *command],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, result.stderr
        assert result.stdout == ""
        assert lines, result.stderr
        assert lines[-1].startswith("error (redis_tls): "), result.stderr
        assert VERIFY_FAILED.search(lines[-1]), result.stderr
        assert "Traceback" not in result.stderr
        assert PASSWORD not in result.stderr

    for role, extra in (
        ("worker", ("--without-mingle", "--without-gossip")),
        ("beat", ("--schedule", str(tmp_path / "beat-schedule"))),
    ):
        log = tmp_path / f"{role}.log"
        process = start_celery(role, env, log, *extra)
        try:
            code = process.wait(timeout=60)
        finally:
            stop(process)
        text = log.read_text()
        assert code == EX_CONFIG, text[-3000:]
        assert re.search(f"grantkeeper {role} cannot start: {VERIFY_FAILED.pattern}", text), text
        assert "Traceback" not in text, text[-3000:]
        assert PASSWORD not in text

    stats = devserver.stats()
    assert stats["token_requests"] == 0, stats
    assert _versions(runtime, [connection_id]) == versions


@pytest.mark.parametrize("trust", ["test CA", "unrelated CA", "system store only"])
def test_broker_and_redbeat_clients_verify_with_the_url_ca(
    settings: Settings, tls_redis: RedisServer, tls_material: TlsMaterial, trust: str
) -> None:
    """The Celery app's own clients, as configured from the URL: kombu's broker connection and
    RedBeat's client connect when the URL's CA signed the server certificate, and refuse the
    handshake with an unrelated CA or with no ``ssl_ca_certs`` at all (the system store) -
    kombu alone would not verify a ``rediss://`` URL without ``ssl_cert_reqs``."""
    url = {
        "test CA": tls_redis.tls_url(),
        "unrelated CA": tls_redis.tls_url(tls_material.other_ca_cert),
        "system store only": tls_redis.url,  # rediss://:pw@127.0.0.1:P/0, no query
    }[trust]
    app = create_app(_with_redis(settings, url))
    try:
        assert app.conf.broker_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert app.conf.redbeat_redis_use_ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert "ssl_" not in app.conf.broker_url
        assert "ssl_" not in app.conf.redbeat_redis_url
        outcomes = {}
        with app.connection_for_write() as conn:
            try:
                conn.ensure_connection(max_retries=0)
                with conn.channel() as channel:
                    outcomes["broker"] = str(channel.client.ping())
            except Exception as exc:  # noqa: BLE001 - kombu wraps it in its own error types
                outcomes["broker"] = str(exc)
        try:
            outcomes["redbeat"] = str(get_redis(app).ping())
        except redis.ConnectionError as exc:
            outcomes["redbeat"] = str(exc)
        finally:
            redbeat_client = getattr(app, REDBEAT_REDIS_KEY, None)
            if redbeat_client is not None:
                redbeat_client.close()
    finally:
        app.close()
    if trust == "test CA":
        assert outcomes == {"broker": "True", "redbeat": "True"}
    else:
        for client, outcome in outcomes.items():
            assert "CERTIFICATE_VERIFY_FAILED" in outcome, (client, outcome)


class _ClientCertRedisServer(RedisServer):
    """The same server, but asking every client for a certificate from the CA
    (``--tls-auth-clients yes``)."""

    def _args(self) -> list[str]:
        args = super()._args()
        args[args.index("--tls-auth-clients") + 1] = "yes"
        return args

    def ping(self, timeout: float = 1.0) -> bool:
        return True  # the readiness probe has no client certificate; connect() proves it


def test_client_certificate_from_the_url(
    settings: Settings, tls_material: TlsMaterial, tmp_path: Path
) -> None:
    """``ssl_certfile``/``ssl_keyfile`` reach every client: against a Redis that requires a
    client certificate, grantkeeper's client, kombu and RedBeat connect with them and are
    refused without them (a handshake error, not a verification error)."""
    if not redis_server_has_tls():
        pytest.skip("redis-server was built without TLS")
    # The test server certificate carries clientAuth too, so it serves as the client's.
    client_query = (
        f"&ssl_certfile={quote(str(tls_material.server_cert), safe='')}"
        f"&ssl_keyfile={quote(str(tls_material.server_key), safe='')}"
    )
    with _ClientCertRedisServer.start(
        tmp_path / "redis", password=PASSWORD, tls=tls_material
    ) as server:
        _wait_listening(server)
        with_cert = _with_redis(settings, server.tls_url() + client_query)
        client = Runtime(with_cert, actor="test")
        try:
            assert client.redis.ping() is True
        finally:
            client.close()
        app = create_app(with_cert)
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=0)
            assert get_redis(app).ping() is True
        finally:
            getattr(app, REDBEAT_REDIS_KEY).close()
            app.close()

        without = Runtime(_with_redis(settings, server.tls_url()), actor="test")
        try:
            with pytest.raises(redis.ConnectionError):
                without.redis.ping()
        finally:
            without.close()


def _wait_listening(server: RedisServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((server.host, server.port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return
