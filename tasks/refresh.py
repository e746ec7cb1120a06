"""Refresh tasks. Arguments are connection ids and reason words, never tokens.

``acks_late`` + idempotent bodies: a task redelivered after a worker died re-reads the row
under the lock and does nothing if the refresh already happened.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import Task, shared_task

from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.rotation import rotation_cutoff
from grantkeeper.runtime import get_runtime
from grantkeeper.scan import queued_marker_ttl, scan_due
from grantkeeper.timing import backoff_seconds

TASK_OPTIONS: dict[str, Any] = {"ignore_result": True, "acks_late": True}


@shared_task(name="grantkeeper.scan_due", **TASK_OPTIONS)
def scan_due_connections() -> dict[str, int]:
    rt = get_runtime()
    result = scan_due(
        rt,
        lambda connection_id, delay: refresh_connection.apply_async(
            args=[connection_id, "scheduled"], countdown=delay
        ),
    )
    rt.auditor.emit(
        "scan.completed",
        "ok",
        due=result.due,
        enqueued=result.enqueued,
        already_queued=result.already_queued,
    )
    return {"due": result.due, "enqueued": result.enqueued}


@shared_task(name="grantkeeper.refresh_connection", bind=True, **TASK_OPTIONS)
def refresh_connection(self: Task[Any, Any], connection_id: str, reason: str = "scheduled") -> str:
    rt = get_runtime()
    cutoff = rotation_cutoff(rt, datetime.now(UTC)) if reason == "rotation" else None
    result = RefreshService(rt).refresh(connection_id, reason=reason, rotation_cutoff=cutoff)
    retries = self.request.retries or 0
    if result.outcome is Outcome.FAILED_TRANSIENT and retries < rt.settings.max_transient_retries:
        delay = backoff_seconds(retries, retry_after=result.retry_after)
        # Keep the queued marker while the retry waits, so scans do not pile up duplicates.
        rt.cache.client.expire(
            rt.cache.queued_key(connection_id), int(delay) + queued_marker_ttl(rt)
        )
        raise self.retry(countdown=delay)
    rt.cache.clear_queued(connection_id)
    return result.outcome.value
