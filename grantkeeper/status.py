"""``grantkeeper status``: one screen that says whether anything needs a person.

:func:`gather` collects the facts (database, Redis, Celery's control channel) in one place;
:func:`evaluate` is pure and decides from them; :func:`to_json` and :func:`render_text` show
them. A person is needed when a connection needs re-authorization, an active connection's
token already expired, a connection exhausted its transient retries, no worker consumes the
queue, or beat is not alive (no RedBeat lock, or no scan within 3 scan intervals).

The last scan is the newest ``scan.completed`` audit row of the last 24 hours (the scan task
writes one per scan; the query reads the ``at`` index).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy.exc import SQLAlchemyError

from grantkeeper import repository
from grantkeeper.errors import GrantkeeperError
from grantkeeper.models import ACTIVE, REAUTH_REQUIRED, STATUSES
from grantkeeper.repository import ConnectionHealth
from grantkeeper.runtime import Runtime

NEEDS_ATTENTION_EXIT = 3
BEAT_STALE_INTERVALS = 3
LAST_SCAN_LOOKBACK = timedelta(hours=24)
WORKER_PING_TIMEOUT = 1.5
MARKER_BATCH = 1000

# Problem codes, in the order they are reported. Stable: scripts match on them.
REAUTH = "reauth_required"
OVERDUE = "overdue"
RETRIES_EXHAUSTED = "retries_exhausted"
NO_WORKER = "no_worker"
BEAT_NOT_ALIVE = "beat_not_alive"
REDIS_UNAVAILABLE = "redis_unavailable"


class StatusUnavailable(GrantkeeperError):
    """The database did not answer: nothing can be said about the connections."""

    error_class = "status_unavailable"


@dataclass(frozen=True)
class WorkerProbe:
    """Workers that answered on Celery's control channel within the timeout."""

    consuming: Sequence[str]  # hostnames consuming this deployment's queue
    other: Sequence[str] = ()  # answered, but consume other queues (another deployment)
    error: str | None = None


@dataclass(frozen=True)
class StatusFacts:
    checked_at: datetime
    queue: str
    refresh_margin_seconds: float
    scan_interval_seconds: float
    max_transient_retries: int
    by_status: Mapping[str, int]
    # Active connections expiring within the margin (soonest first, up to the scan batch).
    due: Sequence[ConnectionHealth]
    queued_ids: frozenset[str]
    reauth_required: Sequence[ConnectionHealth]  # the first few
    failing: Sequence[ConnectionHealth]  # active with failures, most first; the first few
    failing_total: int
    retries_exhausted_total: int
    overdue_total: int
    last_scan_at: datetime | None
    last_scan_details: Mapping[str, Any]
    workers: WorkerProbe
    beat_lock_held: bool
    redis_error: str | None = None
    list_limit: int = 20


@dataclass(frozen=True)
class Problem:
    code: str
    message: str


@dataclass(frozen=True)
class Verdict:
    problems: list[Problem]
    queued: list[ConnectionHealth]
    backing_off: list[ConnectionHealth]
    not_queued: list[ConnectionHealth]
    overdue: list[ConnectionHealth]
    retries_exhausted: list[ConnectionHealth]
    last_scan_age_seconds: float | None
    beat_alive: bool
    beat_stale_after_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.healthy else NEEDS_ATTENTION_EXIT


# -- the decision (pure) -----------------------------------------------------------------------


def classify_due(
    facts: StatusFacts,
) -> tuple[list[ConnectionHealth], list[ConnectionHealth], list[ConnectionHealth]]:
    """Due connections as (queued, backing off, not queued). A queued marker wins: the task
    is pending whatever the backoff says."""
    queued: list[ConnectionHealth] = []
    backing_off: list[ConnectionHealth] = []
    not_queued: list[ConnectionHealth] = []
    for row in facts.due:
        if row.id in facts.queued_ids:
            queued.append(row)
        elif row.next_attempt_at is not None and row.next_attempt_at > facts.checked_at:
            backing_off.append(row)
        else:
            not_queued.append(row)
    return queued, backing_off, not_queued


def _connection_problems(facts: StatusFacts) -> list[Problem]:
    problems = []
    reauth = facts.by_status.get(REAUTH_REQUIRED, 0)
    if reauth:
        problems.append(
            Problem(
                REAUTH,
                f"reauth required: {reauth} connection(s) need re-authorization"
                " (grantkeeper connections authorize --provider NAME --connection ID)",
            )
        )
    if facts.overdue_total:
        problems.append(
            Problem(
                OVERDUE,
                f"overdue: {facts.overdue_total} active connection(s) have an access token that"
                " already expired",
            )
        )
    if facts.retries_exhausted_total:
        problems.append(
            Problem(
                RETRIES_EXHAUSTED,
                f"retries exhausted: {facts.retries_exhausted_total} connection(s) failed"
                f" {facts.max_transient_retries} or more times in a row",
            )
        )
    return problems


def _worker_problem(facts: StatusFacts) -> Problem | None:
    if facts.workers.consuming:
        return None
    detail = f"none answered within {WORKER_PING_TIMEOUT} s"
    if facts.workers.error:
        detail = f"the control channel failed: {facts.workers.error}"
    elif facts.workers.other:
        detail += f"; {len(facts.workers.other)} worker(s) of other queues answered"
    return Problem(NO_WORKER, f"no worker: none consumes queue {facts.queue!r} ({detail})")


def _beat_problem(facts: StatusFacts, age: float | None, stale_after: float) -> Problem | None:
    scan_recent = age is not None and age <= stale_after
    if facts.beat_lock_held and scan_recent:
        return None
    reasons = []
    if not facts.beat_lock_held:
        reasons.append("no RedBeat lock (is a beat running?)")
    if age is None:
        hours = int(LAST_SCAN_LOOKBACK.total_seconds() // 3600)
        reasons.append(f"no scan in the last {hours} h")
    elif not scan_recent:
        reasons.append(f"last scan {_span(age)} ago, more than {_span(stale_after)}")
    return Problem(BEAT_NOT_ALIVE, "beat not alive: " + "; ".join(reasons))


def evaluate(facts: StatusFacts) -> Verdict:
    """What needs a person, from the facts alone (pure)."""
    now = facts.checked_at
    queued, backing_off, not_queued = classify_due(facts)
    overdue = [r for r in facts.due if r.access_expires_at and r.access_expires_at <= now]
    exhausted = [r for r in facts.failing if r.failure_count >= max(facts.max_transient_retries, 1)]
    stale_after = BEAT_STALE_INTERVALS * facts.scan_interval_seconds
    # A scan that wrote its row while the facts were gathered is 0 s old, not in the future.
    age = max((now - facts.last_scan_at).total_seconds(), 0.0) if facts.last_scan_at else None
    worker = _worker_problem(facts)
    beat = _beat_problem(facts, age, stale_after)
    problems = _connection_problems(facts) + [p for p in (worker, beat) if p is not None]
    if facts.redis_error:
        problems.append(
            Problem(
                REDIS_UNAVAILABLE, f"redis unavailable: {facts.redis_error} (no lock, no refresh)"
            )
        )
    notes = []
    if facts.beat_lock_held and beat is not None and worker is None:
        notes.append("beat holds its lock but no scan completed recently: check the beat's log")
    if facts.due and facts.redis_error:
        notes.append("queued markers unknown (Redis did not answer): due rows shown as not queued")
    return Verdict(
        problems=problems,
        queued=queued,
        backing_off=backing_off,
        not_queued=not_queued,
        overdue=overdue,
        retries_exhausted=exhausted,
        last_scan_age_seconds=age,
        beat_alive=beat is None,
        beat_stale_after_seconds=stale_after,
        notes=notes,
    )


# -- gathering ---------------------------------------------------------------------------------


def probe_celery_workers(queue: str, timeout: float = WORKER_PING_TIMEOUT) -> WorkerProbe:
    """Ask every worker on the broker which queues it consumes. A reply is a heartbeat;
    only workers consuming ``queue`` count (a shared broker carries other deployments)."""
    from worker import app  # noqa: PLC0415 - builds the Celery app from the settings

    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:  # noqa: BLE001 - no broker means no worker, said as such
        return WorkerProbe(consuming=(), error=type(exc).__name__)
    consuming = sorted(
        host
        for host, queues in replies.items()
        if any(isinstance(q, Mapping) and q.get("name") == queue for q in queues or ())
    )
    other = sorted(set(replies) - set(consuming))
    return WorkerProbe(consuming=consuming, other=other)


def _queued(rt: Runtime, ids: Sequence[str]) -> frozenset[str]:
    found: set[str] = set()
    for start in range(0, len(ids), MARKER_BATCH):
        chunk = list(ids[start : start + MARKER_BATCH])
        values = rt.redis.mget([rt.cache.queued_key(i) for i in chunk])
        found.update(i for i, v in zip(chunk, values, strict=True) if v is not None)
    return frozenset(found)


def gather(
    rt: Runtime,
    *,
    now: datetime | None = None,
    probe_workers: Callable[[str], WorkerProbe] = probe_celery_workers,
    list_limit: int = 20,
) -> StatusFacts:
    """Every fact :func:`evaluate` needs: a few indexed queries, one MGET per thousand due
    connections, one EXISTS, and one broadcast on Celery's control channel."""
    s = rt.settings
    now = now or datetime.now(UTC)
    try:
        with rt.engine.connect() as conn:
            by_status = repository.count_by_status(conn)
            due = repository.due_connection_health(
                conn, now + timedelta(seconds=s.refresh_margin_seconds), s.scan_batch_limit
            )
            reauth = repository.connection_health_by_status(
                conn, REAUTH_REQUIRED, min_failures=0, limit=list_limit
            )
            failing = repository.connection_health_by_status(
                conn, ACTIVE, min_failures=1, limit=list_limit
            )
            counts = repository.attention_counts(conn, now, s.max_transient_retries)
            scan = repository.latest_audit_event(conn, "scan.completed", now - LAST_SCAN_LOOKBACK)
    except SQLAlchemyError as exc:
        raise StatusUnavailable(f"the database did not answer ({type(exc).__name__})") from None
    redis_error = None
    queued: frozenset[str] = frozenset()
    lock_held = False
    try:
        queued = _queued(rt, [r.id for r in due])
        lock_held = bool(rt.redis.exists(f"{s.redis_key_prefix}redbeat::lock"))
    except redis.RedisError as exc:
        redis_error = type(exc).__name__
    return StatusFacts(
        checked_at=now,
        queue=s.celery_queue,
        refresh_margin_seconds=s.refresh_margin_seconds,
        scan_interval_seconds=s.scan_interval_seconds,
        max_transient_retries=s.max_transient_retries,
        by_status=by_status,
        due=due,
        queued_ids=queued,
        reauth_required=reauth,
        failing=failing,
        failing_total=counts["failing"],
        retries_exhausted_total=counts["retries_exhausted"],
        overdue_total=counts["overdue"],
        last_scan_at=scan["at"] if scan else None,
        last_scan_details=dict(scan["details"] or {}) if scan else {},
        workers=probe_workers(s.celery_queue),
        beat_lock_held=lock_held,
        redis_error=redis_error,
        list_limit=list_limit,
    )


# -- showing -----------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _connection_json(row: ConnectionHealth) -> dict[str, Any]:
    return {
        "id": row.id,
        "provider": row.provider,
        "account": row.account,
        "status": row.status,
        "access_expires_at": _iso(row.access_expires_at),
        "next_attempt_at": _iso(row.next_attempt_at),
        "failure_count": row.failure_count,
        "last_error_class": row.last_error_class,
    }


def to_json(facts: StatusFacts, verdict: Verdict) -> dict[str, Any]:
    """The ``--json`` document. Its keys are stable (README "Monitoring")."""
    limit = facts.list_limit

    def listed(rows: Sequence[ConnectionHealth]) -> list[dict[str, Any]]:
        return [_connection_json(r) for r in rows[:limit]]

    by_status = {status: facts.by_status.get(status, 0) for status in STATUSES}
    by_status.update(facts.by_status)
    scan = facts.last_scan_details
    return {
        "healthy": verdict.healthy,
        "exit_code": verdict.exit_code,
        "checked_at": facts.checked_at.isoformat(),
        "problems": [{"code": p.code, "message": p.message} for p in verdict.problems],
        "notes": list(verdict.notes),
        "connections": {**by_status, "total": sum(facts.by_status.values())},
        "due": {
            "margin_seconds": facts.refresh_margin_seconds,
            "count": len(facts.due),
            "queued": len(verdict.queued),
            "backing_off": {
                "count": len(verdict.backing_off),
                "connections": listed(verdict.backing_off),
            },
            "not_queued": {
                "count": len(verdict.not_queued),
                "connections": listed(verdict.not_queued),
            },
        },
        "overdue": {"count": facts.overdue_total, "connections": listed(verdict.overdue)},
        "failures": {
            "count": facts.failing_total,
            "retries_exhausted": facts.retries_exhausted_total,
            "max_transient_retries": facts.max_transient_retries,
            "connections": listed(facts.failing),
        },
        "reauth_required": {
            "count": facts.by_status.get(REAUTH_REQUIRED, 0),
            "connections": listed(facts.reauth_required),
        },
        "last_scan": {
            "at": _iso(facts.last_scan_at),
            "age_seconds": (
                round(verdict.last_scan_age_seconds, 1)
                if verdict.last_scan_age_seconds is not None
                else None
            ),
            "due": scan.get("due"),
            "enqueued": scan.get("enqueued"),
        },
        "workers": {
            "queue": facts.queue,
            "count": len(facts.workers.consuming),
            "hostnames": list(facts.workers.consuming),
            "other_queues_count": len(facts.workers.other),
            "error": facts.workers.error,
        },
        "beat": {
            "alive": verdict.beat_alive,
            "lock_held": facts.beat_lock_held,
            "scan_interval_seconds": facts.scan_interval_seconds,
            "stale_after_seconds": verdict.beat_stale_after_seconds,
        },
        "redis_error": facts.redis_error,
    }


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _relative(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "-"
    delta = (at - now).total_seconds()
    return f"in {_span(delta)}" if delta >= 0 else f"{_span(delta)} ago"


def _line(row: ConnectionHealth, now: datetime, *, failures: bool = False) -> str:
    who = f"{row.provider or '?'}/{row.account}"
    parts = [f"expires {_relative(row.access_expires_at, now)}"]
    if row.next_attempt_at is not None and row.next_attempt_at > now:
        parts.append(f"next attempt {_relative(row.next_attempt_at, now)}")
    if failures or row.failure_count:
        parts.append(f"{row.failure_count} failure(s)")
    if row.last_error_class:
        parts.append(f"last error {row.last_error_class}")
    return f"    {row.id}  {who}  " + ", ".join(parts)


def render_text(facts: StatusFacts, verdict: Verdict) -> list[str]:
    """The one screen, as plain lines (no colour: it is read in logs and pipes too)."""
    now = facts.checked_at
    limit = facts.list_limit
    lines = [f"grantkeeper status at {now.isoformat(timespec='seconds')} (queue {facts.queue})"]

    def section(title: str, text: str) -> None:
        lines.append(f"{title:<16} {text}")

    def rows(label: str, items: Sequence[ConnectionHealth], total: int) -> None:
        if not items:
            return
        lines.append(f"  {label}:")
        lines.extend(_line(r, now) for r in items[:limit])
        if total > min(len(items), limit):
            lines.append(f"    ... and {total - min(len(items), limit)} more")

    statuses = {s: facts.by_status.get(s, 0) for s in STATUSES} | dict(facts.by_status)
    section("connections", ", ".join(f"{n} {s}" for s, n in statuses.items()))
    section(
        "due",
        f"{len(facts.due)} expiring within {facts.refresh_margin_seconds:g} s:"
        f" {len(verdict.queued)} queued, {len(verdict.backing_off)} backing off,"
        f" {len(verdict.not_queued)} not queued",
    )
    rows("not queued", verdict.not_queued, len(verdict.not_queued))
    rows("backing off", verdict.backing_off, len(verdict.backing_off))
    section("overdue", f"{facts.overdue_total} active token(s) already expired")
    rows("overdue", verdict.overdue, facts.overdue_total)
    section(
        "failures",
        f"{facts.failing_total} active connection(s) with failures,"
        f" {facts.retries_exhausted_total} with retries exhausted"
        f" (>= {facts.max_transient_retries})",
    )
    rows("failing", facts.failing, facts.failing_total)
    reauth_total = facts.by_status.get(REAUTH_REQUIRED, 0)
    section("reauth required", str(reauth_total))
    rows("reauth required", facts.reauth_required, reauth_total)
    if facts.last_scan_at is None:
        section("last scan", "none in the last 24 h")
    else:
        scan = facts.last_scan_details
        section(
            "last scan",
            f"{_span(verdict.last_scan_age_seconds or 0.0)} ago"
            f" ({facts.last_scan_at.isoformat(timespec='seconds')});"
            f" due {scan.get('due', '?')}, enqueued {scan.get('enqueued', '?')}",
        )
    workers = facts.workers
    if workers.consuming:
        section("workers", f"{len(workers.consuming)} alive: {', '.join(workers.consuming)}")
    else:
        other = f"; {len(workers.other)} of other queues answered" if workers.other else ""
        error = f" ({workers.error})" if workers.error else ""
        section("workers", f"none consumes this queue{error}{other}")
    beat = "alive" if verdict.beat_alive else "NOT alive"
    lock = "lock held" if facts.beat_lock_held else "no lock"
    section("beat", f"{beat} ({lock}; stale after {_span(verdict.beat_stale_after_seconds)})")
    lines.extend(f"note: {n}" for n in verdict.notes)
    lines.append("")
    if verdict.healthy:
        lines.append("OK: nothing needs a person")
    else:
        lines.append(f"NEEDS A PERSON (exit {verdict.exit_code}):")
        lines.extend(f"  - {p.message}" for p in verdict.problems)
    return lines
