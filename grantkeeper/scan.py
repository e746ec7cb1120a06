"""The proactive scan: which connections are due, and enqueue each once.

A Redis ``queued`` marker (SET NX with a TTL) makes the scan idempotent: two beats, or a scan
that overlaps the previous one, enqueue a connection at most once until its task has run.

Due connections go out in batches (``GRANTKEEPER_REFRESH_BATCH_SIZE`` ids per task): a Celery
task costs about as much CPU as the refresh it carries, so one task per refresh would spend
half the box on the queue. Each batch gets its own jittered countdown, so the provider still
sees the refreshes spread over the scan interval, not a burst.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from grantkeeper import repository
from grantkeeper.runtime import Runtime


@dataclass(frozen=True)
class ScanResult:
    due: int
    enqueued: int
    already_queued: int


def queued_marker_ttl(rt: Runtime) -> int:
    """Long enough to cover a queued task's wait and its retries; short enough that a lost
    task (worker killed before it acked) is scanned again soon."""
    s = rt.settings
    return int(max(s.scan_interval_seconds * 4, s.lock_ttl_seconds * 2, 60))


def plan_batches(
    connection_ids: Sequence[str], batch_size: int, window: float, rng: random.Random
) -> list[tuple[list[str], float]]:
    """Split ``connection_ids`` (soonest expiry first) into batches of at most ``batch_size``,
    each with a countdown drawn from ``[0, window)``. Pure: the scan's whole decision."""
    return [
        (list(connection_ids[start : start + batch_size]), rng.uniform(0.0, window))
        for start in range(0, len(connection_ids), batch_size)
    ]


def scan_due(
    rt: Runtime,
    enqueue: Callable[[list[str], float], None],
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> ScanResult:
    """Enqueue every due connection that has no pending task, ``enqueue(batch, countdown)``."""
    settings = rt.settings
    now = now or datetime.now(UTC)
    rng = rng or random.Random()
    with rt.engine.connect() as conn:
        due_ids = repository.due_connection_ids(
            conn,
            now + timedelta(seconds=settings.refresh_margin_seconds),
            settings.scan_batch_limit,
            now,
        )
    ttl = queued_marker_ttl(rt)
    fresh = rt.cache.mark_queued_many(due_ids, ttl) if due_ids else []
    # Spread the burst over part of one scan interval so a provider sees no spike.
    window = settings.scan_interval_seconds / 2
    for batch, countdown in plan_batches(fresh, settings.refresh_batch_size, window, rng):
        enqueue(batch, countdown)
    return ScanResult(
        due=len(due_ids), enqueued=len(fresh), already_queued=len(due_ids) - len(fresh)
    )
