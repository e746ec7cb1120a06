"""Audit retention: the one place audit rows are ever deleted, on a configured schedule."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from grantkeeper import repository
from grantkeeper.runtime import Runtime


def prune_audit(rt: Runtime, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    before = clock() - timedelta(days=rt.settings.audit_retention_days)
    with rt.engine.begin() as conn:
        removed = repository.prune_audit_events(conn, before)
    rt.auditor.emit(
        "audit.pruned",
        "ok",
        removed=removed,
        before=before.isoformat(),
        retention_days=rt.settings.audit_retention_days,
    )
    return removed
