"""Per-process resources: settings, keyring, database engine, Redis, HTTP client, auditor.

Built once per process by :func:`get_runtime` and rebuilt after a fork (a forked child must
not share its parent's sockets). Tests build a :class:`Runtime` from explicit settings.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING

import httpx
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from sqlalchemy import Engine

from config.logging import configure_logging
from config.settings import Settings, get_settings
from grantkeeper.anomaly import AnomalyDetector
from grantkeeper.audit import Auditor, worker_actor
from grantkeeper.cache import CrashWindow, ProviderBreaker, TokenCache
from grantkeeper.crypto import Keyring
from grantkeeper.db import create_db_engine
from grantkeeper.local_cache import LocalTokenCache
from grantkeeper.notify import Notifier
from grantkeeper.oauth import OAuthClient, build_http_client
from grantkeeper.read_audit import ReadAuditBuffer
from grantkeeper.redisconn import connect_redis

if TYPE_CHECKING:
    from celery import Celery


@dataclass
class Runtime:
    settings: Settings
    actor: str = field(default_factory=worker_actor)

    @cached_property
    def keyring(self) -> Keyring:
        keys = self.settings.encryption_keys
        return Keyring.parse(
            keys.get_secret_value() if keys else None, self.settings.primary_key_id
        )

    @cached_property
    def engine(self) -> Engine:
        return create_db_engine(self.settings)

    @cached_property
    def autocommit_engine(self) -> Engine:
        """The same pool, each statement its own transaction. For the hot path's single
        statements (the row read, the fenced UPDATE, the audit INSERT): one round trip each
        instead of BEGIN, statement, COMMIT. A single statement is atomic either way."""
        return self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @cached_property
    def redis(self) -> redis.Redis:
        # Few, quick retries: with Redis down a refresh must fail closed promptly, and a read
        # fall back to the database, rather than both stalling in client retries.
        # rediss:// URLs: TLS options from the URL; a certificate that does not verify raises
        # RedisTlsError (classified, never retried), see grantkeeper/redisconn.py.
        return connect_redis(
            self.settings.redis_url.get_secret_value(),
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            max_connections=self.settings.worker_concurrency * 2 + 10,
            pool_wait=10.0,
        )

    @cached_property
    def cache(self) -> TokenCache:
        return TokenCache(self.redis, self.settings.redis_key_prefix)

    @cached_property
    def crash_window(self) -> CrashWindow:
        return CrashWindow(self.redis, self.settings.redis_key_prefix)

    @cached_property
    def breaker(self) -> ProviderBreaker:
        s = self.settings
        return ProviderBreaker(
            self.redis,
            s.redis_key_prefix,
            threshold=s.breaker_threshold,
            window=s.breaker_window_seconds,
            cooldown=s.breaker_cooldown_seconds,
            max_cooldown=s.breaker_max_cooldown_seconds,
        )

    @cached_property
    def celery(self) -> Celery:
        """A Celery app on this runtime's broker and queue: how a process that is not the
        worker sends it tasks (``GRANTKEEPER_API_REFRESH=worker``)."""
        from worker.app import create_app  # noqa: PLC0415 - worker.app imports this module

        return create_app(self.settings)

    @cached_property
    def notifier(self) -> Notifier:
        return Notifier(self.settings, self.http)

    @cached_property
    def local_cache(self) -> LocalTokenCache | None:
        if not self.settings.local_cache:
            return None
        cache = LocalTokenCache(
            self.redis,
            f"{self.settings.redis_key_prefix}at:",
            max_entries=self.settings.local_cache_max_entries,
        )
        cache.wait_ready(2.0)
        return cache

    @cached_property
    def read_audit(self) -> ReadAuditBuffer:
        return ReadAuditBuffer(self.auditor, self.settings.read_audit_interval_seconds)

    @cached_property
    def http(self) -> httpx.Client:
        s = self.settings
        return build_http_client(
            s.http_connect_timeout_seconds, s.http_read_timeout_seconds, s.http_max_connections
        )

    @cached_property
    def oauth(self) -> OAuthClient:
        return OAuthClient(
            self.http,
            max_response_bytes=self.settings.http_max_response_bytes,
            skew=timedelta(seconds=self.settings.clock_skew_seconds),
        )

    @cached_property
    def auditor(self) -> Auditor:
        auditor = Auditor(self.autocommit_engine, self.actor)
        auditor.observers.append(AnomalyDetector(self.redis, self.settings, auditor, self.notifier))
        if self.settings.worker_metrics_port or self.settings.beat_metrics_port:
            from grantkeeper import metrics  # noqa: PLC0415 - prometheus_client only when used

            # Set only in a worker or beat that serves metrics (worker/app.py signals).
            metrics_observer = metrics.observer()
            if metrics_observer is not None:
                auditor.observers.append(metrics_observer)
        return auditor

    def close(self) -> None:
        """Release sockets; only what was actually built."""
        if "read_audit" in self.__dict__:
            self.read_audit.close()
        if "local_cache" in self.__dict__ and self.local_cache is not None:
            self.local_cache.close()
        if "celery" in self.__dict__:
            self.celery.close()
        if "http" in self.__dict__:
            self.http.close()
        if "redis" in self.__dict__:
            self.redis.close()
        if "engine" in self.__dict__:
            self.engine.dispose()


_lock = threading.Lock()
_runtime: Runtime | None = None
_runtime_pid: int | None = None


def get_runtime() -> Runtime:
    """This process's runtime, built on first use (and again in a forked child)."""
    global _runtime, _runtime_pid  # noqa: PLW0603 - one runtime per process, by design
    with _lock:
        if _runtime is None or _runtime_pid != os.getpid():
            settings = get_settings()
            configure_logging(settings.log_level, http_trace=settings.log_http_bodies)
            _runtime = Runtime(settings)
            _runtime.keyring  # noqa: B018 - fail at start-up, not at the first refresh
            _runtime_pid = os.getpid()
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime built elsewhere (tests, the CLI with its own actor)."""
    global _runtime, _runtime_pid  # noqa: PLW0603
    with _lock:
        _runtime = runtime
        _runtime_pid = os.getpid() if runtime else None
