"""An optional process-local token cache, kept honest by Redis server-assisted invalidation.

Redis 6+ client tracking in broadcast mode: a *tracker* connection asks Redis to report every
write to keys under ``{prefix}at:`` and to redirect the reports to a *listener* connection
subscribed to ``__redis__:invalidate``. The listener thread drops the matching local entries,
so a refresh or revocation anywhere is seen here within milliseconds, with no round trip on
the read path.

If either connection fails, the local cache is cleared and bypassed until tracking is set up
again: a token is never served from memory while invalidations could have been missed. A fill
racing an invalidation is refused by a per-key generation counter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from redis.maint_notifications import MaintNotificationsConfig

log = structlog.get_logger("grantkeeper.local_cache")
TRACKER_PING_SECONDS = 2.0  # tracking lives as long as the tracker connection: check it


@dataclass(frozen=True)
class LocalEntry:
    version: int
    expires_epoch: float
    token: str


class LocalTokenCache:
    def __init__(self, client: redis.Redis, key_prefix: str, *, max_entries: int = 100_000):
        self.pool = client.connection_pool
        self.key_prefix = key_prefix  # the access-token keys, "{prefix}at:"
        self.max_entries = max_entries
        self._entries: OrderedDict[str, LocalEntry] = OrderedDict()
        self._generation: dict[str, int] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gk-local-cache", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 5.0) -> bool:
        return self._ready.wait(timeout)

    def get(self, connection_id: str) -> LocalEntry | None:
        if not self._ready.is_set():
            return None
        return self._entries.get(connection_id)

    def generation(self, connection_id: str) -> int:
        return self._generation.get(connection_id, 0)

    def put(self, connection_id: str, entry: LocalEntry, generation: int) -> None:
        """Store, unless an invalidation for this key arrived since ``generation`` was read."""
        with self._lock:
            if not self._ready.is_set() or self._generation.get(connection_id, 0) != generation:
                return
            self._entries[connection_id] = entry
            self._entries.move_to_end(connection_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, keys: list[Any] | None) -> None:
        with self._lock:
            if keys is None:  # a flush, or tracking lost: forget everything
                self._entries.clear()
                self._generation = {k: v + 1 for k, v in self._generation.items()}
                return
            start = len(self.key_prefix)
            for raw in keys:
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                if key.startswith(self.key_prefix):
                    connection_id = key[start:]
                    self._entries.pop(connection_id, None)
                    self._generation[connection_id] = self._generation.get(connection_id, 0) + 1

    def _connect(self) -> Any:
        # RESP2 on purpose: the subscribed listener then receives invalidations as ordinary
        # pub/sub messages (redis-py 8 otherwise negotiates RESP3 push frames).
        kwargs = {
            k: v
            for k, v in self.pool.connection_kwargs.items()
            if not k.startswith(("maint_notifications", "orig_"))
        }
        kwargs.update(
            protocol=2, maint_notifications_config=MaintNotificationsConfig(enabled=False)
        )
        connection = self.pool.connection_class(**kwargs)
        connection.connect()
        return connection

    def _run(self) -> None:
        while not self._stop.is_set():
            listener = tracker = None
            try:
                listener, tracker = self._connect(), self._connect()
                listener.send_command("CLIENT", "ID")
                listener_id = int(listener.read_response())
                listener.send_command("SUBSCRIBE", "__redis__:invalidate")
                listener.read_response()
                tracker.send_command(
                    "CLIENT", "TRACKING", "on", "REDIRECT", listener_id,
                    "BCAST", "PREFIX", self.key_prefix,
                )  # fmt: skip
                _expect_ok(tracker.read_response())
                self._ready.set()
                self._listen(listener, tracker)
            except (redis.RedisError, OSError) as exc:
                log.warning("local_cache.tracking_lost", error_class=type(exc).__name__)
            finally:
                self._ready.clear()
                self.invalidate(None)
                for connection in (listener, tracker):
                    if connection is not None:
                        connection.disconnect()
            self._stop.wait(1.0)

    def _listen(self, listener: Any, tracker: Any) -> None:
        waited = 0.0
        while not self._stop.is_set():
            if listener.can_read(timeout=0.5):
                message = listener.read_response()
                if (
                    isinstance(message, list)
                    and len(message) == 3
                    and message[0] in (b"message", "message")
                ):
                    payload = message[2]
                    self.invalidate(payload if isinstance(payload, list) else None)
                continue
            waited += 0.5
            if waited >= TRACKER_PING_SECONDS:
                waited = 0.0
                tracker.send_command("PING")
                tracker.read_response()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _expect_ok(reply: object) -> None:
    if reply not in (b"OK", "OK"):
        raise redis.RedisError("CLIENT TRACKING refused")
