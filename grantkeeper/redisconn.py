"""grantkeeper's Redis clients, with TLS from the URL and a classified verification failure.

:func:`connect_redis` builds a ``redis.Redis`` from a ``redis://`` or ``rediss://`` URL. For
``rediss://`` the TLS options come from :func:`config.redis_tls.parse_redis_tls` (the same
parser the Celery broker and RedBeat options are derived from), and:

- the CA bundle and client certificate are loaded once when the client is built, so a
  missing or unreadable file is a :class:`~grantkeeper.errors.RedisTlsError` naming the
  parameter and path, not a connection error on every command;
- a server certificate that does not verify (wrong CA, hostname not in the certificate,
  expired) raises :class:`~grantkeeper.errors.RedisTlsError` on the first command:
  ``TLS certificate verification failed for Redis at host:port: <reason>``. It is a
  configuration error, not an outage: it is not retried and it is not a ``redis.RedisError``,
  so the paths that tolerate a Redis outage (a cache read falling back to the database) do not
  hide it.

:func:`check_redis_tls` connects once and raises that error, for start-up checks (the worker
and beat run it before they touch the broker, see ``worker/app.py``).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config.redis_tls import RedisTls, parse_redis_tls, redis_endpoint, without_tls_params
from grantkeeper.errors import RedisTlsError


def verification_failed_message(endpoint: str, reason: str) -> str:
    return (
        f"TLS certificate verification failed for Redis at {endpoint}: {reason}. The server's"
        " certificate must be signed by the CA in the URL's ssl_ca_certs and name the URL's"
        " host (see 'Redis over TLS' in README.md)"
    )


class VerifiedSSLConnection(redis.SSLConnection):
    """``redis.SSLConnection`` whose certificate verification failure is classified."""

    def _connect(self) -> socket.socket:
        try:
            sock: socket.socket = super()._connect()  # type: ignore[no-untyped-call]
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or exc.reason or str(exc)
            raise RedisTlsError(
                verification_failed_message(f"{self.host}:{self.port}", reason)
            ) from exc
        return sock


def load_tls_files(tls: RedisTls, endpoint: str) -> None:
    """Load the CA bundle and client certificate as the connection will: a missing, unreadable
    or malformed file raises :class:`RedisTlsError` naming the parameter and the path."""
    context = ssl.create_default_context()
    step = "ssl_ca_certs"
    try:
        if tls.ca_certs is not None:
            context.load_verify_locations(cafile=tls.ca_certs)
        step = "ssl_certfile/ssl_keyfile"
        if tls.certfile is not None:
            context.load_cert_chain(certfile=tls.certfile, keyfile=tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        paths = tls.ca_certs if step == "ssl_ca_certs" else f"{tls.certfile}, {tls.keyfile}"
        raise RedisTlsError(
            f"cannot load the TLS file(s) for Redis at {endpoint}: {step} ({paths}): {exc}"
        ) from None


def connect_redis(url: str, *, pool_wait: float | None = None, **options: Any) -> redis.Redis:
    """A ``redis.Redis`` for ``url``; ``options`` are passed to it (timeouts, retry, pool).

    ``pool_wait``: use a blocking pool that makes a burst of threads wait up to this long for
    a free connection (a stampede of readers) instead of failing with "too many connections".
    """
    tls = parse_redis_tls(url)
    if tls is not None:
        load_tls_files(tls, redis_endpoint(url))
        options = {**options, "connection_class": VerifiedSSLConnection, **tls.redis_kwargs()}
        url = without_tls_params(url)
    if pool_wait is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(url, timeout=pool_wait, **options)
    return redis.Redis(connection_pool=pool)


def check_redis_tls(url: str, timeout: float = 5.0) -> None:
    """For a ``rediss://`` URL: connect once and raise :class:`RedisTlsError` if TLS is
    misconfigured. Anything else (Redis down, wrong password) is left to the caller's own
    retries: an outage is not a configuration error."""
    if parse_redis_tls(url) is None:
        return
    client = connect_redis(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
    except redis.RedisError:
        return
    finally:
        client.close()
