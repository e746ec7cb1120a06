"""Revocation tasks: ids and a reason word in, nothing secret in or out."""

from __future__ import annotations

from celery import shared_task

from grantkeeper.revoke import RevokeService
from grantkeeper.runtime import get_runtime
from tasks.refresh import TASK_OPTIONS


@shared_task(name="grantkeeper.revoke_connection", **TASK_OPTIONS)
def revoke_connection(
    connection_id: str, reason: str = "operator", local_only: bool = False
) -> str:
    """Idempotent: revoking a revoked connection records that and changes nothing."""
    result = RevokeService(get_runtime()).revoke(
        connection_id, reason=reason, local_only=local_only
    )
    return result.provider_outcome


@shared_task(name="grantkeeper.retry_provider_revocations", **TASK_OPTIONS)
def retry_provider_revocations() -> dict[str, int]:
    """Beat, every minute: parked provider revocations whose retry is due."""
    done, pending = RevokeService(get_runtime()).retry_pending()
    return {"done": done, "pending": pending}
