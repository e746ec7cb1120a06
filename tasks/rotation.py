"""The monthly rotation task (beat, crontab ``rotation_schedule``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import Task, shared_task

from grantkeeper.rotation import BATCH_WINDOW_SECONDS, enqueue_rotation_batch
from grantkeeper.runtime import get_runtime
from tasks.refresh import TASK_OPTIONS, refresh_connection


@shared_task(name="grantkeeper.monthly_rotation", bind=True, **TASK_OPTIONS)
def monthly_rotation(self: Task[Any, Any], continuation: int = 0) -> dict[str, int]:
    """Step 1 in paced batches (each continues itself), then step 2: re-encryption."""
    rt = get_runtime()
    now = datetime.now(UTC)
    if continuation == 0:
        rt.auditor.emit("rotation.started", "ok", max_age_days=rt.settings.rotation_max_age_days)
    batch = enqueue_rotation_batch(
        rt,
        now,
        lambda connection_id, delay: refresh_connection.apply_async(
            args=[connection_id, "rotation"], countdown=delay
        ),
    )
    if batch.more:
        self.apply_async(args=(continuation + 1,), countdown=BATCH_WINDOW_SECONDS)
        return {"enqueued": batch.enqueued, "continuation": continuation + 1}
    from grantkeeper.keys import reencrypt_all  # noqa: PLC0415 - step 2, once step 1 is done

    report = reencrypt_all(rt)
    rt.auditor.emit(
        "rotation.completed",
        "ok",
        enqueued_last_batch=batch.enqueued,
        batches=continuation + 1,
        reencrypted=getattr(report, "reencrypted", None),
    )
    return {"enqueued": batch.enqueued, "continuation": continuation}
