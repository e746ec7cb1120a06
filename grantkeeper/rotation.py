"""The monthly rotation, step 1: force-refresh connections whose refresh token is old.

Resumable and idempotent by construction: what still needs rotating is a database question
(``refresh_issued_at`` before the cutoff and not tried since), so a run killed halfway leaves
exactly the rest for the next run, and a second run finds nothing. Step 2 (re-encrypting
everything under the primary key) is :func:`grantkeeper.keys.reencrypt_all`.

The work is paced: each batch covers ``BATCH_WINDOW_SECONDS`` of refreshes at
``rotation_rate_per_second``, and the task schedules its own continuation, so no countdown
comes near the broker's visibility timeout and the provider sees no burst.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from grantkeeper import repository
from grantkeeper.runtime import Runtime
from grantkeeper.scan import queued_marker_ttl

BATCH_WINDOW_SECONDS = 600  # well under the Redis broker's 1 h visibility timeout


@dataclass(frozen=True)
class RotationBatch:
    cutoff: datetime
    enqueued: int
    already_queued: int
    more: bool  # a continuation is needed


def rotation_cutoff(rt: Runtime, now: datetime) -> datetime:
    return now - timedelta(days=rt.settings.rotation_max_age_days)


def enqueue_rotation_batch(
    rt: Runtime, now: datetime, enqueue: Callable[[str, float], None]
) -> RotationBatch:
    """Enqueue one window's worth of forced refreshes, spaced at the configured rate."""
    rate = rt.settings.rotation_rate_per_second
    limit = max(1, int(rate * BATCH_WINDOW_SECONDS))
    cutoff = rotation_cutoff(rt, now)
    with rt.engine.connect() as conn:
        ids = repository.rotation_candidates(conn, cutoff, limit)
    ttl = queued_marker_ttl(rt) + BATCH_WINDOW_SECONDS
    enqueued = 0
    for connection_id in ids:
        # A connection already queued (by the scan, or by an overlapping rotation run) is left
        # to that task; if it still needs rotating afterwards, the next batch finds it.
        if rt.cache.mark_queued(connection_id, ttl):
            enqueue(connection_id, enqueued / rate)
            enqueued += 1
    return RotationBatch(cutoff, enqueued, len(ids) - enqueued, more=len(ids) == limit)
