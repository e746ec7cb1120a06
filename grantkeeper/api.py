"""The library API for application code: a valid access token for a connection.

Reads go cache -> database -> refresh under the lock, the same path as ``grantkeeper token``::

    from grantkeeper.api import get_access_token
    token = get_access_token(connection_id)   # str, valid for at least min_token_validity
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

import redis
import structlog

from grantkeeper import repository, sealing
from grantkeeper.audit import audit_decryption_failure
from grantkeeper.errors import (
    ConnectionNotFound,
    ConnectionUnavailable,
    DecryptionError,
    GrantkeeperError,
    LockNotAcquired,
)
from grantkeeper.local_cache import LocalEntry
from grantkeeper.models import ACTIVE
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime, get_runtime
from grantkeeper.timing import cache_ttl_seconds, is_servable
from grantkeeper.worker_refresh import WorkerRefresh

log = structlog.get_logger("grantkeeper.api")


class TokenReader:
    def __init__(self, rt: Runtime, clock: Callable[[], datetime] | None = None):
        self.rt = rt
        self._custom_clock = clock is not None
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.min_validity = timedelta(seconds=rt.settings.min_token_validity_seconds)
        self.min_validity_seconds = float(rt.settings.min_token_validity_seconds)

    def _open(self, connection_id: str, ciphertext: str) -> str:
        return sealing.unseal(
            self.rt.keyring, sealing.CONNECTIONS, connection_id, sealing.ACCESS_TOKEN, ciphertext
        )

    def _from_cache(self, connection_id: str, generation: int = 0) -> str | None:
        try:
            cached = self.rt.cache.get(connection_id)
        except redis.RedisError:
            return None  # Redis down: the database still serves valid tokens
        if cached is None or cached.expires_epoch - self._now_epoch() < self.min_validity_seconds:
            return None
        try:
            token = self._open(connection_id, cached.ciphertext)
        except DecryptionError as exc:
            audit_decryption_failure(
                self.rt.auditor,
                exc,
                connection_id=connection_id,
                source="cache",
            )
            self.rt.cache.drop(connection_id)
            return None
        if self.rt.local_cache is not None:
            entry = LocalEntry(cached.version, float(cached.expires_epoch), token)
            self.rt.local_cache.put(connection_id, entry, generation)
        return token

    def get(self, connection_id: str, *, audit: bool = True, audit_now: bool = False) -> str:
        """A servable token. Reads are audited in per-interval tallies (``audit_now`` writes the
        event at once, as the CLI does: its process is about to exit)."""
        token, source = self._from_memory(connection_id)
        if token is None:
            generation = self.rt.local_cache.generation(connection_id) if self.rt.local_cache else 0
            token = self._from_cache(connection_id, generation)
            source = "cache"
        if token is None:
            token, source = _single_flight(self.rt, connection_id, self._slow_path)
        if audit_now:
            self.rt.auditor.emit("token.read", "ok", connection_id=connection_id, source=source)
        elif audit:
            self.rt.read_audit.record(connection_id, source)
        return token

    def _now_epoch(self) -> float:
        return self.clock().timestamp() if self._custom_clock else time.time()

    def _from_memory(self, connection_id: str) -> tuple[str | None, str]:
        local = self.rt.local_cache
        if local is None:
            return None, "memory"
        entry = local.get(connection_id)
        if entry is None or entry.expires_epoch - self._now_epoch() < self.min_validity_seconds:
            return None, "memory"
        return entry.token, "memory"

    def _slow_path(self, connection_id: str) -> tuple[str, str]:
        token = self._while_someone_refreshes(connection_id)
        if token is not None:
            return token, "cache"
        return self._from_database_or_refresh(connection_id)

    def _while_someone_refreshes(self, connection_id: str) -> str | None:
        """A stampede: if another process holds the refresh lock, wait for the token it is about
        to cache instead of queueing on the database and the lock. Bounded by the lock wait."""
        try:
            if not self.rt.cache.client.exists(self.rt.cache.lock_key(connection_id)):
                return None
        except redis.RedisError:
            return None
        deadline = time.monotonic() + self.rt.settings.lock_wait_seconds
        pause = 0.005
        while time.monotonic() < deadline:
            time.sleep(pause)
            token = self._from_cache(connection_id)
            if token is not None:
                return token
            try:
                if not self.rt.cache.client.exists(self.rt.cache.lock_key(connection_id)):
                    return None  # the holder finished without caching (failed): take the slow path
            except redis.RedisError:
                return None
            pause = min(pause * 1.5, 0.02)
        return None

    def _from_database_or_refresh(self, connection_id: str) -> tuple[str, str]:
        with self.rt.engine.connect() as conn:
            record = repository.get_connection(conn, connection_id)
        if record is None:
            raise ConnectionNotFound(f"no connection {connection_id}")
        if record.status != ACTIVE:
            raise ConnectionUnavailable(connection_id, record.status)
        now = self.clock()
        if record.access_token_ct and is_servable(now, record.access_expires_at, self.min_validity):
            try:
                token = self._open(connection_id, record.access_token_ct)
            except DecryptionError as exc:
                audit_decryption_failure(
                    self.rt.auditor,
                    exc,
                    connection_id=connection_id,
                    source="database",
                    column="access_token_ct",
                )
                raise
            assert record.access_expires_at is not None  # noqa: S101 - is_servable checked it
            ttl = cache_ttl_seconds(now, record.access_expires_at, self.min_validity)
            try:
                self.rt.cache.put(
                    connection_id,
                    record.version,
                    record.access_expires_at,
                    record.access_token_ct,
                    ttl,
                )
            except redis.RedisError:
                log.warning("cache.write_failed", connection_id=connection_id)
            return token, "database"
        if self.rt.settings.api_refresh == "worker":
            # The app role may not write tokens (grantkeeper db roles): the worker refreshes.
            waiter = WorkerRefresh(
                self.rt, self.clock, open_token=self._open, from_cache=self._from_cache
            )
            return waiter.token(record), "worker"
        result = RefreshService(self.rt, self.clock).refresh(
            connection_id,
            reason="on_demand",
            force=True,
            wait=self.rt.settings.lock_wait_seconds,
            seen_version=record.version,
        )
        if result.outcome is Outcome.CONTENDED:
            raise LockNotAcquired(
                f"connection {connection_id} is being refreshed by another process; try again"
            )
        if result.outcome is Outcome.UNAVAILABLE:
            raise ConnectionUnavailable(connection_id, "not active")
        if result.error is not None:
            raise result.error
        if result.access_token_ct is None:
            raise GrantkeeperError(f"connection {connection_id} has no access token")
        return self._open(connection_id, result.access_token_ct), "refresh"


_flights: dict[tuple[int, str], Future[tuple[str, str]]] = {}
_flights_lock = threading.Lock()


def _single_flight(
    rt: Runtime, connection_id: str, work: Callable[[str], tuple[str, str]]
) -> tuple[str, str]:
    """Within one process, concurrent slow reads of one connection share a single attempt:
    one thread goes to Redis, the database and the lock; the others wait on its result without
    using the CPU (a hundred spinning threads would starve the one doing the work of the GIL).
    Across processes the Redis lock and the version check do the same job."""
    key = (id(rt), connection_id)
    with _flights_lock:
        flight = _flights.get(key)
        leader = flight is None
        if flight is None:
            flight = _flights[key] = Future()
    if not leader:
        return flight.result(timeout=rt.settings.lock_wait_seconds + rt.settings.lock_ttl_seconds)
    try:
        result = work(connection_id)
    except BaseException as exc:
        flight.set_exception(exc)
        raise
    else:
        flight.set_result(result)
        return result
    finally:
        with _flights_lock:
            _flights.pop(key, None)


def get_access_token(connection_id: str, *, runtime: Runtime | None = None) -> str:
    """A currently valid access token for ``connection_id``.

    Raises :class:`ConnectionNotFound`, :class:`ConnectionUnavailable` (revoked or needs
    re-authorization), :class:`LockNotAcquired` (another process is refreshing it right now
    and did not finish within ``lock_wait_seconds``) or a classified provider error.
    """
    return TokenReader(runtime or get_runtime()).get(connection_id)
