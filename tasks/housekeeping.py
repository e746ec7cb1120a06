"""Housekeeping run by beat: audit retention."""

from __future__ import annotations

from celery import shared_task

from grantkeeper.retention import prune_audit
from grantkeeper.runtime import get_runtime
from tasks.refresh import TASK_OPTIONS


@shared_task(name="grantkeeper.prune_audit", **TASK_OPTIONS)
def prune_audit_trail() -> int:
    """Daily: delete audit rows older than GRANTKEEPER_AUDIT_RETENTION_DAYS (the only deleter)."""
    return prune_audit(get_runtime())
