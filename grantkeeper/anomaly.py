"""Suspicious-activity detection over the audit event stream.

Each rule keeps a small Redis counter or set per connection or provider with a TTL equal to its
window, so the cost is O(events) and nothing scans a table. A rule fires at most once per
window per subject; firing means an ``anomaly.*`` audit event (also a warning log line and a
metric, through the audit observers) and, when configured, a signed webhook.

Rules:
* ``anomaly.refresh_storm``: a connection refreshed far more often than its token lifetime
  explains within the window (a leaked refresh token being used, or a runaway client).
* ``anomaly.provider_failures``: refreshes of many distinct connections of one provider failed
  in a short time (a revoked client, a provider-side incident, an attack).
* ``anomaly.tampering``: a ciphertext failed authentication or names a missing key.
* ``anomaly.new_reader``: an actor read a connection's token that it never read before
  (opt-in: ``GRANTKEEPER_ANOMALY_NEW_READER``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import redis

from config.settings import Settings
from grantkeeper.audit import Auditor
from grantkeeper.notify import Notifier

READER_MEMORY_SECONDS = 90 * 24 * 3600
MIN_LIFETIME_SECONDS = 60.0  # floor for the expected-refresh estimate


def expected_refreshes(window: float, lifetime: float) -> float:
    """How many refreshes a token of this lifetime needs in the window (pure)."""
    return window / max(lifetime, MIN_LIFETIME_SECONDS)


def storm_threshold(window: float, lifetime: float, factor: float) -> int:
    return int(factor * expected_refreshes(window, lifetime)) + 3


def stable_actor(actor: str) -> str:
    """The actor without its process id: a restarted process is not a new reader."""
    head, _, tail = actor.rpartition(":")
    return head if head and tail.isdigit() else actor


class AnomalyDetector:
    def __init__(
        self, client: redis.Redis, settings: Settings, auditor: Auditor, notifier: Notifier
    ):
        self.client = client
        self.prefix = f"{settings.redis_key_prefix}anom:"
        self.settings = settings
        self.auditor = auditor
        self.notifier = notifier

    def __call__(self, row: Mapping[str, Any]) -> None:
        event = str(row["event"])
        if event.startswith("anomaly."):
            return
        if event == "refresh.succeeded":
            self._refresh_storm(row)
        elif event == "refresh.failed":
            self._provider_failures(row)
        elif event in {"token.tampered", "token.decryption_failed"}:
            self._tampering(row)
        elif event == "token.read" and self.settings.anomaly_new_reader:
            self._new_reader(row)

    def _fire_once(self, rule: str, subject: str, window: int, **details: Any) -> None:
        if not self.client.set(f"{self.prefix}fired:{rule}:{subject}", b"1", nx=True, ex=window):
            return
        self.auditor.emit(f"anomaly.{rule}", "alert", **details)
        self.notifier.send(f"anomaly.{rule}", **details)

    def _refresh_storm(self, row: Mapping[str, Any]) -> None:
        connection_id = row["connection_id"]
        details = row["details"]
        window = self.settings.anomaly_refresh_window_seconds
        expires = details.get("access_expires_at")
        at: datetime = row["at"]
        lifetime = (datetime.fromisoformat(expires) - at).total_seconds() if expires else 3600.0
        key = f"{self.prefix}refreshes:{connection_id}"
        pipe = self.client.pipeline(transaction=False)  # a counter: MULTI/EXEC buys nothing
        pipe.incr(key)
        pipe.expire(key, window, nx=True)
        count = int(pipe.execute()[0])
        threshold = storm_threshold(window, lifetime, self.settings.anomaly_refresh_factor)
        if count > threshold:
            self._fire_once(
                "refresh_storm",
                str(connection_id),
                window,
                connection_id=connection_id,
                provider=row["provider"],
                refreshes=count,
                window_seconds=window,
                expected_at_most=threshold,
            )

    def _provider_failures(self, row: Mapping[str, Any]) -> None:
        provider = row["provider"]
        window = self.settings.anomaly_failure_window_seconds
        key = f"{self.prefix}failures:{provider}"
        pipe = self.client.pipeline()
        pipe.sadd(key, str(row["connection_id"]))
        pipe.expire(key, window, nx=True)
        pipe.scard(key)
        distinct = int(pipe.execute()[2])
        if distinct >= self.settings.anomaly_failure_connections:
            self._fire_once(
                "provider_failures",
                str(provider),
                window,
                provider=provider,
                failed_connections=distinct,
                window_seconds=window,
                last_error_class=row["details"].get("error_class"),
            )

    def _tampering(self, row: Mapping[str, Any]) -> None:
        self._fire_once(
            "tampering",
            str(row["connection_id"]),
            3600,
            connection_id=row["connection_id"],
            provider=row["provider"],
            key_id=row["key_id"],
            reason=row["details"].get("reason"),
            source=row["details"].get("source"),
        )

    def _new_reader(self, row: Mapping[str, Any]) -> None:
        connection_id = str(row["connection_id"])
        actor = stable_actor(str(row["actor"]))
        key = f"{self.prefix}readers:{connection_id}"
        pipe = self.client.pipeline()
        pipe.sadd(key, actor)
        pipe.scard(key)
        pipe.expire(key, READER_MEMORY_SECONDS)
        added, members, _ = pipe.execute()
        if int(added) == 1 and int(members) > 1:
            self._fire_once(
                "new_reader",
                f"{connection_id}:{actor}",
                READER_MEMORY_SECONDS,
                connection_id=connection_id,
                reader=actor,
                known_readers=int(members) - 1,
            )
