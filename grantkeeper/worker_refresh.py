"""On-demand refresh by the worker, for processes whose database role may only read tokens.

With ``GRANTKEEPER_API_REFRESH=worker`` a read that finds no servable token does not refresh it
itself: that writes ``connections``, which the app role of ``grantkeeper db roles`` may not.
Instead it sends the worker the task ``grantkeeper.refresh_connection(id, "on_demand",
version)`` (the task beat sends: lock, re-read, fenced write; forced, like an inline on-demand
read, unless the row moved past ``version``) and polls the cache, then the database, for a
newer version with a servable token, for at most ``lock_wait_seconds``.

Nothing here writes to the database but audit rows (INSERT). Filling the Redis cache from the
database is fine: Redis is not role-restricted, and the entry is the same ciphertext the worker
would have cached.

Concurrent readers of one due connection send one task per stale version, not one each: a
Redis ``SET NX`` on ``{prefix}ondemand:{id}:{version}`` that lives ``lock_wait_seconds``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import redis
import structlog
from kombu.exceptions import KombuError

from grantkeeper import repository
from grantkeeper.errors import (
    ConnectionNotFound,
    ConnectionUnavailable,
    WorkerRefreshError,
    WorkerRefreshFailed,
    WorkerRefreshTimeout,
)
from grantkeeper.models import ACTIVE
from grantkeeper.repository import ConnectionRecord
from grantkeeper.runtime import Runtime
from grantkeeper.timing import cache_ttl_seconds, is_servable

log = structlog.get_logger("grantkeeper.worker_refresh")

REFRESH_TASK = "grantkeeper.refresh_connection"
REASON = "on_demand"
FIRST_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 0.5


def send_refresh_task(rt: Runtime, connection_id: str, seen_version: int) -> None:
    """``tasks.refresh.refresh_connection.apply_async([id, "on_demand", seen_version])``,
    through a Celery app built from this runtime's settings (broker, queue), not from the
    process environment. With ``seen_version`` the worker forces the refresh (the token may be
    unservable before it is due by the refresh margin) unless the row moved past it."""
    import tasks.refresh  # noqa: F401, PLC0415 - defines the shared task for every Celery app

    rt.celery.tasks[REFRESH_TASK].apply_async(args=(connection_id, REASON, seen_version))


class WorkerRefresh:
    """One wait for the worker to refresh one connection."""

    def __init__(
        self,
        rt: Runtime,
        clock: Callable[[], datetime],
        *,
        open_token: Callable[[str, str], str],
        from_cache: Callable[[str], str | None],
        dispatch: Callable[[str, int], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.rt = rt
        self.clock = clock
        self.open_token = open_token
        self.from_cache = from_cache
        self.dispatch = dispatch or (lambda cid, version: send_refresh_task(rt, cid, version))
        self.sleep = sleep
        self.min_validity = timedelta(seconds=rt.settings.min_token_validity_seconds)
        self.wait_seconds = rt.settings.lock_wait_seconds

    def token(self, seen: ConnectionRecord) -> str:
        """A servable token stored by the worker after ``seen``, the row the caller found
        not servable. Raises :class:`WorkerRefreshTimeout`, :class:`WorkerRefreshFailed`,
        :class:`ConnectionUnavailable` or :class:`ConnectionNotFound`."""
        started = time.monotonic()
        self._request(seen)
        deadline = started + self.wait_seconds
        delay = FIRST_POLL_SECONDS
        while True:
            token = self.from_cache(seen.id) or self._from_database(seen)
            if token is not None:
                return token
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._audit_failure(seen, "worker_refresh_timeout", started)
                raise WorkerRefreshTimeout(
                    f"the worker did not refresh connection {seen.id} within"
                    f" {self.wait_seconds:g} s; is a grantkeeper worker consuming queue"
                    f" {self.rt.settings.celery_queue!r}?"
                )
            self.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_POLL_SECONDS)

    def _request(self, seen: ConnectionRecord) -> None:
        key = f"{self.rt.cache.prefix}ondemand:{seen.id}:{seen.version}"
        try:
            first = bool(
                self.rt.redis.set(key, b"1", nx=True, ex=max(1, math.ceil(self.wait_seconds)))
            )
        except redis.RedisError:
            first = True  # no marker: ask anyway (the task is idempotent)
            key = ""
        if not first:
            return  # another reader asked for this version already: wait for the same refresh
        try:
            self.dispatch(seen.id, seen.version)
        except (KombuError, redis.RedisError, OSError) as exc:
            if key:
                try:
                    self.rt.redis.delete(key)
                except redis.RedisError:
                    log.warning("worker_refresh.marker_left", connection_id=seen.id)
            self._audit_failure(seen, "worker_refresh", None)
            raise WorkerRefreshError(
                f"could not ask the worker to refresh connection {seen.id}:"
                f" {type(exc).__name__} (is the broker reachable?)"
            ) from None

    def _from_database(self, seen: ConnectionRecord) -> str | None:
        with self.rt.engine.connect() as conn:
            current = repository.get_connection(conn, seen.id)
        if current is None:
            raise ConnectionNotFound(f"no connection {seen.id}")
        if current.status != ACTIVE:
            raise ConnectionUnavailable(seen.id, current.status)
        now = self.clock()
        if (
            current.version != seen.version
            and current.access_token_ct is not None
            and current.access_expires_at is not None
            and is_servable(now, current.access_expires_at, self.min_validity)
        ):
            token = self.open_token(seen.id, current.access_token_ct)
            ttl = cache_ttl_seconds(now, current.access_expires_at, self.min_validity)
            try:
                self.rt.cache.put(
                    seen.id,
                    current.version,
                    current.access_expires_at,
                    current.access_token_ct,
                    ttl,
                )
            except redis.RedisError:
                log.warning("cache.write_failed", connection_id=seen.id)
            return token
        if current.version == seen.version and current.failure_count > seen.failure_count:
            # A refresh ran and failed (a permanent failure would have changed the status).
            error_class = current.last_error_class or "unknown"
            self._audit_failure(seen, "worker_refresh_failed", None, cause=error_class)
            raise WorkerRefreshFailed(
                f"the worker's refresh of connection {seen.id} failed ({error_class}); it is"
                " retried on the worker's schedule"
            )
        return None

    def _audit_failure(
        self, seen: ConnectionRecord, error_class: str, started: float | None, **details: str
    ) -> None:
        extra: dict[str, Any] = dict(details)
        if started is not None:
            extra["waited_ms"] = round((time.monotonic() - started) * 1000, 1)
        self.rt.auditor.emit(
            "token.worker_refresh",
            "failed",
            connection_id=seen.id,
            version=seen.version,
            error_class=error_class,
            **extra,
        )
