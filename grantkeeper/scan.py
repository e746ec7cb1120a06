"""The proactive scan: which connections are due, and enqueue each once.

A Redis ``queued`` marker (SET NX with a TTL) makes the scan idempotent: two beats, or a scan
that overlaps the previous one, enqueue a connection at most once until its task has run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
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


def scan_due(
    rt: Runtime,
    enqueue: Callable[[str, float], None],
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> ScanResult:
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
    # Spread the burst over part of one scan interval so a provider sees no spike.
    window = settings.scan_interval_seconds / 2
    enqueued = 0
    for connection_id in due_ids:
        if rt.cache.mark_queued(connection_id, ttl):
            enqueue(connection_id, rng.uniform(0.0, window))
            enqueued += 1
    return ScanResult(due=len(due_ids), enqueued=enqueued, already_queued=len(due_ids) - enqueued)
