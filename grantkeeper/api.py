"""The library API for application code: a valid access token for a connection.

Reads go cache -> database -> refresh under the lock, the same path as ``grantkeeper token``::

    from grantkeeper.api import get_access_token
    token = get_access_token(connection_id)   # str, valid for at least min_token_validity
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import redis
import structlog

from grantkeeper import repository, sealing
from grantkeeper.audit import decryption_event
from grantkeeper.errors import (
    ConnectionNotFound,
    ConnectionUnavailable,
    DecryptionError,
    GrantkeeperError,
    LockNotAcquired,
)
from grantkeeper.models import ACTIVE
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime, get_runtime
from grantkeeper.timing import cache_ttl_seconds, is_servable

log = structlog.get_logger("grantkeeper.api")


class TokenReader:
    def __init__(self, rt: Runtime, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.rt = rt
        self.clock = clock
        self.min_validity = timedelta(seconds=rt.settings.min_token_validity_seconds)

    def _open(self, connection_id: str, ciphertext: str) -> str:
        return sealing.unseal(
            self.rt.keyring, sealing.CONNECTIONS, connection_id, sealing.ACCESS_TOKEN, ciphertext
        )

    def _from_cache(self, connection_id: str) -> str | None:
        try:
            cached = self.rt.cache.get(connection_id)
        except redis.RedisError:
            return None  # Redis down: the database still serves valid tokens
        if cached is None or not is_servable(self.clock(), cached.expires_at, self.min_validity):
            return None
        try:
            return self._open(connection_id, cached.ciphertext)
        except DecryptionError as exc:
            self.rt.auditor.emit(
                decryption_event(exc),
                "error",
                connection_id=connection_id,
                key_id=exc.key_id,
                source="cache",
                reason=exc.reason,
            )
            self.rt.cache.drop(connection_id)
            return None

    def get(self, connection_id: str, *, audit: bool = True) -> str:
        token = self._from_cache(connection_id)
        source = "cache"
        if token is None:
            token, source = self._from_database_or_refresh(connection_id)
        if audit:
            self.rt.auditor.emit("token.read", "ok", connection_id=connection_id, source=source)
        return token

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
                self.rt.auditor.emit(
                    decryption_event(exc),
                    "error",
                    connection_id=connection_id,
                    key_id=exc.key_id,
                    source="database",
                    column="access_token_ct",
                    reason=exc.reason,
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


def get_access_token(connection_id: str, *, runtime: Runtime | None = None) -> str:
    """A currently valid access token for ``connection_id``.

    Raises :class:`ConnectionNotFound`, :class:`ConnectionUnavailable` (revoked or needs
    re-authorization), :class:`LockNotAcquired` (another process is refreshing it right now
    and did not finish within ``lock_wait_seconds``) or a classified provider error.
    """
    return TokenReader(runtime or get_runtime()).get(connection_id)
