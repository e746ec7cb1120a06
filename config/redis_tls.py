"""TLS options of a Redis URL, parsed once and handed to every Redis client grantkeeper runs.

One source of truth: the ``ssl_*`` query parameters of ``GRANTKEEPER_REDIS_URL`` (and
``GRANTKEEPER_BROKER_URL``). :func:`parse_redis_tls` reads them into a :class:`RedisTls`;
every client then gets the URL *without* them (:func:`without_tls_params`) plus the parsed
options as keyword arguments, so no client reads the query string on its own terms:

- grantkeeper's own client (:mod:`grantkeeper.redisconn`): ``redis.Redis.from_url(bare_url,
  **tls.redis_kwargs())``;
- the Celery broker (kombu's redis transport): ``broker_use_ssl = tls.redis_kwargs()``. kombu
  would otherwise fall back to ``ssl_cert_reqs=CERT_NONE`` (no verification) for a
  ``rediss://`` URL that does not name it;
- RedBeat: ``redbeat_redis_use_ssl = tls.redis_kwargs()`` for its own ``redbeat_redis_url``.

Supported parameters (anything else starting with ``ssl_`` is refused, as is any ``ssl_*`` on
a plain ``redis://`` URL, so a typo cannot silently weaken or drop TLS)::

    ssl_cert_reqs       required (default) | optional | none  - verify the server certificate
    ssl_ca_certs        path to the PEM bundle of CAs to trust (default: the system's store)
    ssl_certfile        client certificate (PEM) for servers with tls-auth-clients yes
    ssl_keyfile         its private key (PEM); needs ssl_certfile
    ssl_check_hostname  true (default) | false - match the URL host against the certificate;
                        always off with ssl_cert_reqs=none

``ssl_ca_certs`` is trusted *in addition to* the system CA store: every client here is
redis-py's ``SSLConnection``, which starts from ``ssl.create_default_context()``. So a
certificate that a public CA issued for the same host name would pass too: give Redis a
certificate from a private CA, under a name only that CA certifies.

Paths are percent-encoded in the URL (``urllib.parse.quote(path, safe="")``). The values are
the ones redis-py itself understands, so the same URL also works with a bare
``redis.Redis.from_url`` (``redis-cli`` and health checks).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

CertReqs = Literal["required", "optional", "none"]
CERT_REQS: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}
TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
TLS_SCHEME = "rediss"
_BOOLEANS = {"true": True, "false": False}


class RedisUrlError(ValueError):
    """A Redis URL's TLS parameters are wrong. The message never contains the URL (it may hold
    a password), only the parameter names and the allowed values."""


@dataclass(frozen=True)
class RedisTls:
    """The TLS options of one ``rediss://`` URL."""

    cert_reqs: CertReqs = "required"
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    check_hostname: bool = True

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return CERT_REQS[self.cert_reqs]

    @property
    def verifies(self) -> bool:
        """True when the server certificate must chain to a trusted CA."""
        return self.cert_reqs == "required"

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``redis.SSLConnection``; also the shape kombu's
        ``broker_use_ssl`` and RedBeat's ``redbeat_redis_use_ssl`` take."""
        kwargs: dict[str, Any] = {
            "ssl_cert_reqs": self.verify_mode,
            "ssl_check_hostname": self.check_hostname and self.cert_reqs != "none",
        }
        if self.ca_certs is not None:
            kwargs["ssl_ca_certs"] = self.ca_certs
        if self.certfile is not None:
            kwargs["ssl_certfile"] = self.certfile
        if self.keyfile is not None:
            kwargs["ssl_keyfile"] = self.keyfile
        return kwargs


def _tls_query(url: str) -> tuple[str, list[tuple[str, str]]]:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    return parts.scheme, [(k, v) for k, v in pairs if k.startswith("ssl_")]


def parse_redis_tls(url: str) -> RedisTls | None:
    """The TLS options of ``url``: ``None`` for a plain ``redis://`` (or ``unix://``) URL.

    Raises :class:`RedisUrlError` for an unknown ``ssl_*`` parameter, a repeated or invalid
    one, a key without a certificate, or ``ssl_*`` parameters on a URL that is not TLS.
    """
    scheme, pairs = _tls_query(url)
    names = [name for name, _ in pairs]
    if scheme != TLS_SCHEME:
        if names:
            raise RedisUrlError(
                f"{', '.join(sorted(set(names)))} given on a {scheme or 'schemeless'}:// URL:"
                f" TLS needs the {TLS_SCHEME}:// scheme"
            )
        return None
    unknown = sorted({n for n in names if n not in TLS_PARAMS})
    if unknown:
        raise RedisUrlError(
            f"unknown Redis TLS parameter(s) {', '.join(unknown)};"
            f" supported: {', '.join(TLS_PARAMS)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RedisUrlError(f"Redis TLS parameter(s) {', '.join(repeated)} given more than once")
    values = dict(pairs)
    empty = sorted(n for n, v in values.items() if not v)
    if empty:
        raise RedisUrlError(f"Redis TLS parameter(s) {', '.join(empty)} given without a value")

    cert_reqs = values.get("ssl_cert_reqs", "required")
    if cert_reqs not in get_args(CertReqs):
        raise RedisUrlError(
            f"ssl_cert_reqs must be one of {', '.join(get_args(CertReqs))} (lower case)"
        )
    check_hostname = values.get("ssl_check_hostname", "true").lower()
    if check_hostname not in _BOOLEANS:
        raise RedisUrlError("ssl_check_hostname must be true or false")
    if "ssl_keyfile" in values and "ssl_certfile" not in values:
        raise RedisUrlError("ssl_keyfile needs ssl_certfile (the client certificate)")
    return RedisTls(
        cert_reqs=cast(CertReqs, cert_reqs),  # checked against CertReqs above
        ca_certs=values.get("ssl_ca_certs"),
        certfile=values.get("ssl_certfile"),
        keyfile=values.get("ssl_keyfile"),
        check_hostname=_BOOLEANS[check_hostname],
    )


def without_tls_params(url: str) -> str:
    """``url`` without its ``ssl_*`` query parameters (every other part kept as it was)."""
    parts = urlsplit(url)
    if "ssl_" not in parts.query:
        return url
    kept = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not k.startswith("ssl_")
    ]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def redis_endpoint(url: str) -> str:
    """``host:port`` of a Redis URL, for messages (never the credentials)."""
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.hostname or 'localhost'}:{port}"
