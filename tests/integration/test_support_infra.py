"""The fault-injection and TLS test infrastructure itself: ``tests/support/tcp_proxy.py``,
``tests/support/redis_server.py`` and ``tests/support/tls.py``.

These tests prove that the tools do what the fault-injection tests rely on: the proxy really
forwards to PostgreSQL and really breaks or stalls connections on demand, a private
``redis-server`` starts, restarts on the same port and dies on demand, and a TLS
``redis-server`` is reachable over ``rediss://`` only with the right CA.

redis-py 8 reads TLS settings from a URL through ``redis.connection.parse_url``: ``rediss://``
selects ``SSLConnection``; query parameters are percent-decoded and, unless they have a
parser (``ssl_check_hostname`` → bool, ``ssl_min_version`` → int), passed as strings, which
is what ``ssl_cert_reqs=required`` (``none``/``optional``/``required``) and
``ssl_ca_certs=<percent-encoded path to a PEM file>`` need. ``RedisServer.tls_url(ca)``
builds such a URL. Verification against an unrelated CA fails with
``redis.exceptions.ConnectionError: ... [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify
failed: ...``.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from cryptography import x509
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError as SqlOperationalError

from tests.support.redis_server import REDIS_SERVER, RedisServer, redis_server_has_tls
from tests.support.tcp_proxy import TcpProxy
from tests.support.tls import TlsMaterial, make_tls_material

PG_HOST, _, PG_PORT = os.environ.get("GK_TEST_PG_HOST", "127.0.0.1:5432").partition(":")
PG_TARGET = (PG_HOST, int(PG_PORT or "5432"))

needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed"
)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


def pg_connect(port: int, *, connect_timeout: int = 5) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        dbname="postgres",
        connect_timeout=connect_timeout,
        autocommit=True,
    )


def no_retry_client(url: str) -> redis.Redis:
    """A client that reports the first connection failure instead of retrying it away."""
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    with TcpProxy(*PG_TARGET) as proxy:
        yield proxy


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with RedisServer.start(tmp_path / "redis", password="s3cret pw") as server:
        yield server


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_redis(tmp_path: Path, tls_material: TlsMaterial) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    if not redis_server_has_tls():
        pytest.skip(f"{REDIS_SERVER} was built without TLS support (BUILD_TLS=no)")
    with RedisServer.start(tmp_path / "redis-tls", password="pw", tls=tls_material) as server:
        yield server


# -- TCP proxy ---------------------------------------------------------------------------------


def test_proxy_forwards_to_postgresql(pg_proxy: TcpProxy) -> None:
    """A psycopg connection made through the proxy reaches PostgreSQL and runs queries."""
    with pg_connect(pg_proxy.port) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pg_proxy.connections == 1
    wait_until(lambda: pg_proxy.connections == 0)


def test_cut_fails_open_and_new_connections_until_restore(pg_proxy: TcpProxy) -> None:
    """``cut()`` resets a live connection (its next query fails at once) and every new one;
    ``restore()`` lets new connections through again."""
    conn = pg_connect(pg_proxy.port)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        pg_proxy.cut()
        assert pg_proxy.connections == 0
        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert time.monotonic() - began < 2, "a cut must fail fast, not by timeout"
    finally:
        conn.close()

    with pytest.raises(psycopg.OperationalError):
        pg_connect(pg_proxy.port).close()
    assert pg_proxy.connections == 0

    pg_proxy.restore()
    with pg_connect(pg_proxy.port) as again:
        assert again.execute("SELECT 2").fetchone() == (2,)


def test_pause_holds_traffic_until_resume(pg_proxy: TcpProxy) -> None:
    """``pause()`` keeps connections open but moves no byte: a query hangs, a new connection
    times out; ``resume()`` delivers the held query and its answer."""
    with pg_connect(pg_proxy.port) as conn:
        pg_proxy.pause()
        results: list[object] = []
        worker = threading.Thread(
            target=lambda: results.append(conn.execute("SELECT 42").fetchone()), daemon=True
        )
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "the query must hang while the proxy is paused"

        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            pg_connect(pg_proxy.port, connect_timeout=2).close()
        assert time.monotonic() - began >= 1.5
        assert pg_proxy.accepted >= 2

        pg_proxy.resume()
        worker.join(5)
        assert not worker.is_alive()
        assert results == [(42,)]


def test_sqlalchemy_engine_recovers_after_cut(pg_proxy: TcpProxy) -> None:
    """An SQLAlchemy engine on ``postgresql+psycopg://`` through the proxy sees the database
    vanish mid-transaction, and with ``pool_pre_ping`` reconnects after ``restore()``."""
    engine = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{pg_proxy.port}/postgres",
        pool_pre_ping=True,
        connect_args={"connect_timeout": 5},
    )
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
            pg_proxy.cut()
            with pytest.raises(SqlOperationalError):
                conn.execute(text("SELECT 1"))
        with pytest.raises(SqlOperationalError), engine.connect():
            pass
        pg_proxy.restore()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 3")).scalar_one() == 3
    finally:
        engine.dispose()


@needs_redis_server
def test_proxy_handles_hundreds_of_connections(redis_server: RedisServer) -> None:
    """300 concurrent connections through one proxy each get their answer, a 4 MiB value
    round-trips intact, and closed clients are released."""
    count = 300
    auth_ping = b"*2\r\n$4\r\nAUTH\r\n$9\r\ns3cret pw\r\n*1\r\n$4\r\nPING\r\n"
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        clients: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                clients.append(sock)
                sock.sendall(auth_ping)
            for sock in clients:
                received = b""
                while b"+PONG\r\n" not in received:
                    chunk = sock.recv(4096)
                    assert chunk, "connection closed before PONG"
                    received += chunk
                assert received == b"+OK\r\n+PONG\r\n"
            assert proxy.connections == count
        finally:
            for sock in clients:
                sock.close()
        wait_until(lambda: proxy.connections == 0)
        assert proxy.accepted == count

        url = redis_server.url.replace(f":{redis_server.port}/", f":{proxy.port}/")
        client = redis.Redis.from_url(url)
        try:
            value = os.urandom(4 << 20)
            client.set("big", value)
            assert client.get("big") == value
        finally:
            client.close()


def test_proxy_stop_leaves_nothing_behind() -> None:
    """``stop()`` closes the listening socket and live connections and joins its thread
    (any leaked socket would fail this run through ResourceWarning → error)."""
    before = {t.ident for t in threading.enumerate()}
    proxy = TcpProxy(*PG_TARGET).start()
    port = proxy.port
    conn = pg_connect(port)
    try:
        assert proxy.connections == 1
        proxy.stop()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    proxy.stop()  # idempotent
    assert {t.ident for t in threading.enumerate()} <= before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_proxy_resets_clients_when_target_is_down() -> None:
    """With nothing listening behind the proxy, a client is reset rather than left hanging."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with TcpProxy("127.0.0.1", dead_port) as proxy:
        with pytest.raises(psycopg.OperationalError):
            pg_connect(proxy.port).close()
        wait_until(lambda: proxy.connections == 0)


# -- redis-server --------------------------------------------------------------------------------


@needs_redis_server
def test_redis_server_starts_answers_and_restarts_on_same_port(
    redis_server: RedisServer,
) -> None:
    """The private server answers on its URL; ``restart()`` brings it back on the same port
    with an empty data set, and the same client recovers."""
    assert redis_server.url == f"redis://:s3cret%20pw@127.0.0.1:{redis_server.port}/0"
    assert redis_server.start_seconds < 5
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
        client.set("k", "v")
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        port = redis_server.port
        redis_server.restart()
        assert redis_server.port == port
        assert client.ping() is True  # the stale pooled connection is retried
        assert client.get("k") is None
    finally:
        client.close()


@needs_redis_server
def test_redis_server_requires_its_password(redis_server: RedisServer) -> None:
    """Without the password the server refuses commands."""
    client = no_retry_client(f"redis://127.0.0.1:{redis_server.port}/0")
    try:
        with pytest.raises(redis.AuthenticationError):
            client.ping()
    finally:
        client.close()


@needs_redis_server
def test_redis_server_kill_fails_clients(redis_server: RedisServer) -> None:
    """After ``kill()`` a redis-py client fails with ``ConnectionError``, both on its open
    connection and on a new one."""
    client = no_retry_client(redis_server.url)
    try:
        assert client.ping() is True
        redis_server.kill()
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            client.ping()
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()
    redis_server.stop()  # idempotent after kill


# -- TLS -------------------------------------------------------------------------------------------


def test_tls_material(tls_material: TlsMaterial) -> None:
    """The CA is a CA, the server certificate names 127.0.0.1 and localhost and chains to it
    (not to the other CA), and the key files are private."""
    ca = x509.load_pem_x509_certificate(tls_material.ca_cert.read_bytes())
    other = x509.load_pem_x509_certificate(tls_material.other_ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls_material.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert other.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    with pytest.raises(ValueError, match=r"[Ii]ssuer"):
        server.verify_directly_issued_by(other)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    for key in (tls_material.server_key, tls_material.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_tls_redis_answers_with_the_right_ca(tls_redis: RedisServer) -> None:
    """Over ``rediss://`` with ``ssl_cert_reqs=required`` and ``ssl_ca_certs=<ca>`` in the
    URL, the TLS server answers, by IP address and by the name ``localhost``."""
    url = tls_redis.tls_url()
    assert url.startswith(f"rediss://:pw@127.0.0.1:{tls_redis.port}/0?ssl_cert_reqs=required&")
    for candidate in (url, tls_redis.tls_url(host="localhost")):
        client = redis.Redis.from_url(candidate)
        try:
            assert client.ping() is True
            client.set("k", "v")
            assert client.get("k") == b"v"
        finally:
            client.close()


def test_tls_redis_rejects_the_other_ca(tls_redis: RedisServer, tls_material: TlsMaterial) -> None:
    """Trusting an unrelated CA fails the handshake with an error that names certificate
    verification; so does talking plain ``redis://`` to the TLS port."""
    client = no_retry_client(tls_redis.tls_url(tls_material.other_ca_cert))
    try:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            client.ping()
    finally:
        client.close()

    plain = no_retry_client(f"redis://:pw@127.0.0.1:{tls_redis.port}/0")
    try:
        with pytest.raises(redis.ConnectionError):
            plain.ping()
    finally:
        plain.close()
