"""Refresh tasks. Arguments are connection ids and reason words, never tokens.

``acks_late`` + idempotent bodies: a task redelivered after a worker died re-reads the row
under the lock and does nothing if the refresh already happened.

Retries of *provider* failures are scheduled in the database (``next_attempt_at``, read by the
scan), not with Celery countdowns. Only an unreachable database is retried here, with short
countdowns, because then the database cannot hold the schedule.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from celery import Task, shared_task
from sqlalchemy.exc import SQLAlchemyError

from grantkeeper.refresh import RefreshService
from grantkeeper.rotation import rotation_cutoff
from grantkeeper.runtime import get_runtime
from grantkeeper.scan import scan_due
from grantkeeper.timing import backoff_seconds

TASK_OPTIONS: dict[str, Any] = {"ignore_result": True, "acks_late": True}
# Database outages: retry every few seconds at first, then at most every 5 minutes.
DB_RETRY_CAP_SECONDS = 300.0
DB_MAX_RETRIES = 50

log = structlog.get_logger("grantkeeper.tasks")


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
def refresh_connection(
    self: Task[Any, Any],
    connection_id: str,
    reason: str = "scheduled",
    seen_version: int | None = None,
) -> str:
    """``seen_version``: sent by a reader that found no servable token at that version (the
    library API with ``GRANTKEEPER_API_REFRESH=worker``). The refresh is then forced, as an
    inline on-demand read does, unless the row has moved past that version meanwhile."""
    rt = get_runtime()
    cutoff = rotation_cutoff(rt, datetime.now(UTC)) if reason == "rotation" else None
    try:
        result = RefreshService(rt).refresh(
            connection_id,
            reason=reason,
            rotation_cutoff=cutoff,
            force=seen_version is not None,
            seen_version=seen_version,
        )
    except SQLAlchemyError as exc:
        retries = self.request.retries or 0
        log.warning(
            "refresh.database_unavailable",
            connection_id=connection_id,
            attempt=retries + 1,
            error_class=type(exc).__name__,
        )
        if retries >= DB_MAX_RETRIES:
            raise
        raise self.retry(
            countdown=backoff_seconds(retries, base=2.0, cap=DB_RETRY_CAP_SECONDS),
            max_retries=DB_MAX_RETRIES,
        ) from None
    except redis.RedisError as exc:
        # No Redis, no lock, no refresh (fail closed). The scan enqueues it again once Redis
        # is back; the queued marker went with Redis anyway.
        log.warning(
            "refresh.redis_unavailable", connection_id=connection_id, error_class=type(exc).__name__
        )
        return "redis_unavailable"
    try:
        rt.cache.clear_queued(connection_id)
    except redis.RedisError:
        log.warning("refresh.queued_marker_left", connection_id=connection_id)
    return result.outcome.value


@shared_task(name="grantkeeper.reconcile_parked", **TASK_OPTIONS)
def reconcile_parked() -> int:
    """Beat: move token sets parked during a database outage into the database."""
    rt = get_runtime()
    committed = RefreshService(rt).reconcile_parked()
    if committed:
        rt.auditor.emit("reconcile.completed", "ok", committed=committed)
    return committed
