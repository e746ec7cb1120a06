"""Start-up check of Redis TLS for the worker and beat: a wrong CA stops the process at once,
with one clear line, instead of a broker retry loop (worker) or a traceback (beat).

Without it, a worker whose ``ssl_ca_certs`` does not match the server logs
``consumer: Cannot connect to rediss://:**@host:port/0: Error 1 connecting to host:port.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ...`` and retries for ever, and
beat dies inside RedBeat with a ``redis.exceptions.ConnectionError`` traceback. With it, both
print ``grantkeeper <role> cannot start: TLS certificate verification failed for Redis at
host:port: <reason>. ...`` on stderr (and the structured log line ``startup.redis_tls_failed``)
and exit with 78 (EX_CONFIG).

Only TLS configuration is checked: Redis being down or slow is an outage, which the broker's
own connection retries ride out, so it does not stop start-up here.
"""

from __future__ import annotations

import sys
from typing import Any

import structlog
from redbeat import RedBeatScheduler

from config.settings import get_settings
from grantkeeper.errors import RedisTlsError
from grantkeeper.redisconn import check_redis_tls

EX_CONFIG = 78


def redis_tls_preflight(role: str) -> None:
    """Connect once to each ``rediss://`` URL (cache/locks/RedBeat, broker); on a TLS
    configuration error, say so and exit 78."""
    settings = get_settings()
    urls = dict.fromkeys([settings.redis_url.get_secret_value(), settings.effective_broker_url])
    for url in urls:
        try:
            check_redis_tls(url)
        except RedisTlsError as exc:
            structlog.get_logger("grantkeeper.startup").critical(
                "startup.redis_tls_failed", role=role, error_class=exc.error_class, error=str(exc)
            )
            print(f"grantkeeper {role} cannot start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(EX_CONFIG) from None


class PreflightRedBeatScheduler(RedBeatScheduler):  # type: ignore[misc]  # redbeat is untyped
    """RedBeat, after :func:`redis_tls_preflight`: beat builds its scheduler (which connects
    to Redis) before it sends ``beat_init``, so the check has to run here."""

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("lazy"):
            redis_tls_preflight("beat")
        super().__init__(app, *args, **kwargs)
