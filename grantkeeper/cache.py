"""Redis: the access-token cache, the per-connection refresh lock and scan bookkeeping.

Every key starts with the configured prefix (default ``gk:``), so a compromise flush removes
grantkeeper's keys and nothing else of a shared Redis database. Only ciphertexts are stored,
and never a refresh token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

# Write the cache entry only if it is not older than what is there: a slow reader that
# filled the cache from the database must not overwrite a token a refresh just wrote.
# KEYS[2..]: keys to delete in the same call (a refresh's crash-window marker).
_SET_IF_NEWER = """
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
local current = redis.call('GET', KEYS[1])
if current then
  local v = tonumber(string.match(current, '^(%d+)|'))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


# KEYS[1]: a lock, KEYS[2..]: keys to delete whatever happens. ARGV[1]: our lock token.
_RELEASE_AND_DELETE = """
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass(frozen=True)
class CachedAccessToken:
    version: int
    expires_epoch: int  # seconds; the hot read compares numbers, not datetimes
    ciphertext: str

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires_epoch, UTC)


class TokenCache:
    """Cache entries are ``version|expires_epoch|ciphertext`` strings: one GET per read."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix
        self._set_if_newer = client.register_script(_SET_IF_NEWER)
        self._release = client.register_script(_RELEASE_AND_DELETE)

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
        return CachedAccessToken(int(version), int(expires), ciphertext)

    def put(
        self,
        connection_id: str,
        version: int,
        expires_at: datetime,
        ciphertext: str,
        ttl: int,
        *,
        also_delete: Sequence[str] = (),
    ) -> None:
        """Cache a version unless a newer one is cached. ``also_delete``: keys to drop in the
        same round trip (the refresh's crash-window marker)."""
        if ttl <= 0:
            if also_delete:
                self.client.delete(*also_delete)
            return
        value = f"{version}|{int(expires_at.timestamp())}|{ciphertext}"
        self._set_if_newer(
            keys=[self.access_key(connection_id), *also_delete], args=[version, value, ttl]
        )

    def drop(self, connection_id: str) -> None:
        self.client.delete(self.access_key(connection_id))

    def release(self, lock: Lock, *, also_delete: Sequence[str] = ()) -> None:
        """``lock.release()`` (only while the lock is still ours), and ``also_delete`` dropped
        in the same round trip: the refresh's queued marker. Raises ``LockNotOwnedError``
        as redis-py does when the lock expired and someone else may hold it now."""
        token = lock.local.token
        if token is None:
            raise LockError("cannot release a lock that is not held", lock_name=str(lock.name))
        lock.local.token = None
        if not self._release(keys=[lock.name, *also_delete], args=[token]):
            raise LockNotOwnedError("the lock expired before its release", lock_name=str(lock.name))

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

    def mark_queued_many(self, connection_ids: Sequence[str], ttl: int) -> list[str]:
        """``mark_queued`` for many connections in one round trip: the ids that were not
        pending yet (and now are), in the order given."""
        pipe = self.client.pipeline(transaction=False)
        for connection_id in connection_ids:
            pipe.set(self.queued_key(connection_id), b"1", nx=True, ex=ttl)
        return [cid for cid, ok in zip(connection_ids, pipe.execute(), strict=True) if ok]

    def clear_queued(self, connection_id: str) -> None:
        self.client.delete(self.queued_key(connection_id))

    def forget(self, connection_id: str) -> int:
        """Every key grantkeeper keeps about one connection: cache, markers, the crash-window
        bookkeeping and anomaly counters. Used when a connection is revoked."""
        p = self.prefix
        return int(
            self.client.delete(
                self.access_key(connection_id),
                self.queued_key(connection_id),
                f"{p}inflight:{connection_id}",
                f"{p}parked:{connection_id}",
                f"{p}anom:refreshes:{connection_id}",
                f"{p}anom:readers:{connection_id}",
            )
        )

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


# KEYS: the lock, the in-flight marker. ARGV: our lock token, lock TTL (ms), version, marker TTL.
_RENEW_LOCK_AND_MARK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
return 1
"""


class CrashWindow:
    """Redis bookkeeping for the most dangerous moment: between the provider's answer (the old
    refresh token is now consumed) and the database commit of the new one.

    * ``inflight``: set before the provider call, holding the row version the call started
      from; removed once the outcome is known. If a worker dies in the window, the marker
      outlives it, and the next refresh's ``invalid_grant`` is reported as a rotation lost in
      the window instead of an ordinary dead grant.
    * ``parked``: the new token set (ciphertexts only, bound to their row) when the database
      could not take it. While it exists the connection is not refreshed with the old token;
      every refresh and the reconcile task try to commit it first. It has no TTL on purpose.
    """

    INFLIGHT_TTL = 7 * 24 * 3600

    def __init__(self, client: redis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix
        self._begin = client.register_script(_RENEW_LOCK_AND_MARK)

    def inflight_key(self, connection_id: str) -> str:
        return f"{self.prefix}inflight:{connection_id}"

    def parked_key(self, connection_id: str) -> str:
        return f"{self.prefix}parked:{connection_id}"

    def begin(self, connection_id: str, version: int, lock: Lock) -> None:
        """Renew ``lock`` to its full TTL and set the in-flight marker, in one round trip and
        only while we still own the lock: the provider call that follows gets the whole TTL,
        and a lock lost meanwhile (a stalled process) leaves no marker and makes no call."""
        token = lock.local.token
        if token is None or lock.timeout is None:
            raise LockNotOwnedError("the refresh lock is not held", lock_name=str(lock.name))
        renewed = self._begin(
            keys=[lock.name, self.inflight_key(connection_id)],
            args=[token, int(lock.timeout * 1000), version, self.INFLIGHT_TTL],
        )
        if not renewed:
            raise LockNotOwnedError(
                "the refresh lock expired before the provider call", lock_name=str(lock.name)
            )

    def end(self, connection_id: str) -> None:
        self.client.delete(self.inflight_key(connection_id))

    def queue_state(self, pipe: redis.client.Pipeline, connection_id: str) -> None:
        """Add the state read to a pipeline (one command): the parked set, if any, and the
        in-flight marker's version, if any; see :meth:`parse_state`."""
        pipe.mget([self.parked_key(connection_id), self.inflight_key(connection_id)])

    @staticmethod
    def parse_state(answer: list[bytes | None]) -> tuple[str | None, int | None]:
        parked, inflight = answer
        payload = parked.decode() if isinstance(parked, bytes) else parked
        return payload, (int(inflight) if inflight is not None else None)

    def park(self, connection_id: str, payload: str) -> None:
        self.client.set(self.parked_key(connection_id), payload)

    def parked(self, connection_id: str) -> str | None:
        raw = self.client.get(self.parked_key(connection_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    def unpark(self, connection_id: str) -> None:
        self.client.delete(self.parked_key(connection_id))

    def parked_ids(self) -> list[str]:
        start = len(self.parked_key(""))
        return [
            (k.decode() if isinstance(k, bytes) else str(k))[start:]
            for k in self.client.scan_iter(match=self.parked_key("*"), count=1000)
        ]


# Open the breaker when a provider's transient failures reach the threshold within the window;
# the cooldown doubles each time it reopens within an hour, up to the maximum.
_BREAKER_FAILURE = """
local fails = redis.call('INCR', KEYS[1])
if fails == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if fails < tonumber(ARGV[2]) then return 0 end
local level = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 3600)
local cooldown = math.min(tonumber(ARGV[3]) * 2 ^ (level - 1), tonumber(ARGV[4]))
redis.call('SET', KEYS[2], '1', 'EX', math.floor(cooldown))
redis.call('DEL', KEYS[1])
return math.floor(cooldown)
"""


class ProviderBreaker:
    """A per-provider circuit breaker shared by every process: when a provider fails for many
    connections at once (an outage), stop calling it for a cooldown, then resume by itself."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        threshold: int,
        window: int,
        cooldown: int,
        max_cooldown: int,
    ):
        self.client = client
        self.prefix = prefix
        self.threshold = threshold
        self.window = window
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._failure = client.register_script(_BREAKER_FAILURE)

    def _keys(self, provider_id: str) -> list[str]:
        base = f"{self.prefix}breaker:{provider_id}"
        return [f"{base}:fails", f"{base}:open", f"{base}:level"]

    def queue_state(self, pipe: redis.client.Pipeline, provider_id: str) -> None:
        """Add the state read to a pipeline (two commands): seconds until the breaker closes
        (0 when closed), and whether failures are being counted (only then does a success
        need to reset them); see :meth:`parse_state`."""
        fails, open_key, _ = self._keys(provider_id)
        pipe.pttl(open_key)
        pipe.exists(fails)

    @staticmethod
    def parse_state(ms: int, counting: int) -> tuple[float, bool]:
        return (int(ms) / 1000 if int(ms) > 0 else 0.0), bool(counting)

    def record_failure(self, provider_id: str) -> int:
        """Returns the cooldown in seconds if this failure opened the breaker, else 0."""
        args = [self.window, self.threshold, self.cooldown, self.max_cooldown]
        return int(self._failure(keys=self._keys(provider_id), args=args))

    def record_success(self, provider_id: str) -> None:
        fails, _, _ = self._keys(provider_id)
        self.client.delete(fails)
