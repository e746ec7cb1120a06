"""Redis: the access-token cache, the per-connection refresh lock and scan bookkeeping.

Every key starts with the configured prefix (default ``gk:``), so a compromise flush removes
grantkeeper's keys and nothing else of a shared Redis database. Only ciphertexts are stored,
and never a refresh token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from redis.lock import Lock

# Write the cache entry only if it is not older than what is there: a slow reader that
# filled the cache from the database must not overwrite a token a refresh just wrote.
_SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local v = tonumber(string.match(current, '^(%d+)|'))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class CachedAccessToken:
    version: int
    expires_at: datetime
    ciphertext: str


class TokenCache:
    """Cache entries are ``version|expires_epoch|ciphertext`` strings: one GET per read."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix
        self._set_if_newer = client.register_script(_SET_IF_NEWER)

    def access_key(self, connection_id: str) -> str:
        return f"{self.prefix}at:{connection_id}"

    def lock_key(self, connection_id: str) -> str:
        return f"{self.prefix}lock:{connection_id}"

    def queued_key(self, connection_id: str) -> str:
        return f"{self.prefix}queued:{connection_id}"

    def get(self, connection_id: str) -> CachedAccessToken | None:
        raw = self.client.get(self.access_key(connection_id))
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        version, expires, ciphertext = text.split("|", 2)
        return CachedAccessToken(
            int(version), datetime.fromtimestamp(int(expires), UTC), ciphertext
        )

    def put(
        self, connection_id: str, version: int, expires_at: datetime, ciphertext: str, ttl: int
    ) -> None:
        if ttl <= 0:
            return
        value = f"{version}|{int(expires_at.timestamp())}|{ciphertext}"
        self._set_if_newer(keys=[self.access_key(connection_id)], args=[version, value, ttl])

    def drop(self, connection_id: str) -> None:
        self.client.delete(self.access_key(connection_id))

    def lock(self, connection_id: str, ttl: float, wait: float | None) -> Lock:
        """A redis-py lock (SET NX PX with an owner token; Lua release and extend)."""
        return Lock(
            self.client,
            self.lock_key(connection_id),
            timeout=ttl,
            blocking_timeout=wait,
            thread_local=False,
        )

    def mark_queued(self, connection_id: str, ttl: int) -> bool:
        """True if no refresh task is pending for this connection (and now one is)."""
        return bool(self.client.set(self.queued_key(connection_id), b"1", nx=True, ex=ttl))

    def clear_queued(self, connection_id: str) -> None:
        self.client.delete(self.queued_key(connection_id))

    def delete_all(self, batch: int = 1000) -> int:
        """Remove every key under the prefix (SCAN, never FLUSHDB)."""
        removed = 0
        keys: list[bytes] = []
        for key in self.client.scan_iter(match=f"{self.prefix}*", count=batch):
            keys.append(key)
            if len(keys) >= batch:
                removed += int(self.client.delete(*keys))
                keys.clear()
        if keys:
            removed += int(self.client.delete(*keys))
        return removed
