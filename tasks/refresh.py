"""Refresh tasks. Arguments are connection ids and reason words, never tokens.

``acks_late`` + idempotent bodies: a task redelivered after a worker died re-reads the row
under the lock and does nothing if the refresh already happened.

Retries of *provider* failures are scheduled in the database (``next_attempt_at``, read by the
scan), not with Celery countdowns. Only an unreachable database is retried here, with short
countdowns, because then the database cannot hold the schedule.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NoReturn

import redis
import structlog
from celery import Task, shared_task
from sqlalchemy.exc import SQLAlchemyError

from grantkeeper.errors import ConnectionNotFound
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
        lambda batch, delay: refresh_batch.apply_async(args=[batch, "scheduled"], countdown=delay),
    )
    rt.auditor.emit(
        "scan.completed",
        "ok",
        due=result.due,
        enqueued=result.enqueued,
        already_queued=result.already_queued,
    )
    return {"due": result.due, "enqueued": result.enqueued}


def _refresh_one(connection_id: str, reason: str, seen_version: int | None) -> str:
    """One connection's refresh, as every refresh task does it. Raises ``SQLAlchemyError``
    when the database is unreachable (the caller retries); a dead Redis is an outcome."""
    rt = get_runtime()
    cutoff = rotation_cutoff(rt, datetime.now(UTC)) if reason == "rotation" else None
    try:
        result = RefreshService(rt).refresh(
            connection_id,
            reason=reason,
            rotation_cutoff=cutoff,
            force=seen_version is not None,
            seen_version=seen_version,
            clear_queued=True,
        )
    except ConnectionNotFound:
        # Deleted (a provider removed) after it was queued: nothing to refresh, nothing to retry.
        log.info("refresh.connection_gone", connection_id=connection_id)
        return "not_found"
    except redis.RedisError as exc:
        # No Redis, no lock, no refresh (fail closed). The scan enqueues it again once Redis
        # is back; the queued marker went with Redis anyway.
        log.warning(
            "refresh.redis_unavailable", connection_id=connection_id, error_class=type(exc).__name__
        )
        return "redis_unavailable"
    if not result.queued_cleared:  # it returned before taking the lock
        try:
            rt.cache.clear_queued(connection_id)
        except redis.RedisError:
            log.warning("refresh.queued_marker_left", connection_id=connection_id)
    return result.outcome.value


def _retry_database(
    task: Task[Any, Any], exc: SQLAlchemyError, connection_id: str, args: list[Any]
) -> NoReturn:
    """The database is away: retry the task (from ``args``) with a growing countdown."""
    retries = task.request.retries or 0
    log.warning(
        "refresh.database_unavailable",
        connection_id=connection_id,
        attempt=retries + 1,
        error_class=type(exc).__name__,
    )
    if retries >= DB_MAX_RETRIES:
        raise exc
    raise task.retry(
        args=tuple(args),
        countdown=backoff_seconds(retries, base=2.0, cap=DB_RETRY_CAP_SECONDS),
        max_retries=DB_MAX_RETRIES,
    ) from None


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
    try:
        return _refresh_one(connection_id, reason, seen_version)
    except SQLAlchemyError as exc:
        _retry_database(self, exc, connection_id, [connection_id, reason, seen_version])


@shared_task(name="grantkeeper.refresh_batch", bind=True, **TASK_OPTIONS)
def refresh_batch(
    self: Task[Any, Any], connection_ids: list[str], reason: str = "scheduled"
) -> dict[str, int]:
    """The scan's task: refresh these connections one after another (each under its own lock,
    exactly as ``refresh_connection`` does). Redelivered after a crash, the finished ones are
    not due any more and are skipped. When the database goes away, the rest of the batch is
    retried as one task, the finished part is not."""
    outcomes: dict[str, int] = {}
    for position, connection_id in enumerate(connection_ids):
        try:
            outcome = _refresh_one(connection_id, reason, None)
        except SQLAlchemyError as exc:
            _retry_database(self, exc, connection_id, [connection_ids[position:], reason])
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


@shared_task(name="grantkeeper.reconcile_parked", **TASK_OPTIONS)
def reconcile_parked() -> int:
    """Beat: move token sets parked during a database outage into the database."""
    rt = get_runtime()
    committed = RefreshService(rt).reconcile_parked()
    if committed:
        rt.auditor.emit("reconcile.completed", "ok", committed=committed)
    return committed
