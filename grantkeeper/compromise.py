"""Revoking many connections at once: the compromise runbook as one command.

Revocations are fanned out as Celery tasks when a worker answers; otherwise they run here, in a
small thread pool. Either way progress is read from the database (status ``revoked``), so it
shows what is done, not what was sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from grantkeeper import repository
from grantkeeper.errors import GrantkeeperError
from grantkeeper.models import REVOKED
from grantkeeper.revoke import RevokeService, withdrawal_note
from grantkeeper.runtime import Runtime

log = structlog.get_logger("grantkeeper.compromise")

# How long the command waits for the worker to finish before reporting what is left.
FAN_OUT_TIMEOUT_SECONDS = 900.0
# If the worker makes no progress for this long (its tasks fail, or it stopped), the command
# revokes what is left itself. One revocation may wait out a refresh's lock, so this is longer
# than the lock TTL.
STALL_MARGIN_SECONDS = 15.0


@dataclass(frozen=True)
class BulkRevokeReport:
    targeted: int
    revoked: int
    via_worker: bool
    seconds: float
    redis_keys_removed: int
    manual_withdrawals: list[str]
    revoked_here: int = 0  # by this process: no worker, or the worker stalled


def revoke_many(
    rt: Runtime,
    ids: Sequence[str],
    *,
    reason: str,
    dispatch: Callable[[str], None] | None,
    progress: Callable[[int, int], None],
    flush_all_keys: bool,
    local_threads: int = 8,
    stall_seconds: float | None = None,
) -> BulkRevokeReport:
    """``dispatch`` sends one revoke task (None: no worker, revoke in this process). When the
    worker stalls (no connection revoked for ``stall_seconds``), the rest is revoked here:
    a compromise response must not hang on a broken worker. Revoking is idempotent, so a
    worker that wakes up meanwhile does no harm."""
    started = time.monotonic()
    finished_here = 0
    if dispatch is not None:
        for connection_id in ids:
            dispatch(connection_id)
        stall = stall_seconds or rt.settings.lock_ttl_seconds + STALL_MARGIN_SECONDS
        done = _wait(rt, ids, progress, stall)
        if done < len(ids):
            left = _not_revoked(rt, ids)
            finished_here = len(left)
            _revoke_here(rt, left, reason, local_threads, lambda n: progress(done + n, len(ids)))
            done = _count_revoked(rt, ids)
    else:
        finished_here = len(ids)
        _revoke_here(rt, ids, reason, local_threads, lambda n: progress(n, len(ids)))
        done = _count_revoked(rt, ids)
    removed = _forget_in_redis(rt, ids, flush_all_keys)
    return BulkRevokeReport(
        targeted=len(ids),
        revoked=done,
        via_worker=dispatch is not None,
        seconds=time.monotonic() - started,
        redis_keys_removed=removed,
        manual_withdrawals=_manual_withdrawals(rt, ids),
        revoked_here=finished_here,
    )


def _revoke_here(
    rt: Runtime,
    ids: Sequence[str],
    reason: str,
    threads: int,
    progress: Callable[[int], None],
) -> None:
    """Revoke in this process, a few at a time. One connection that cannot be revoked is
    audited by the service and reported at the end (not revoked); it does not stop the rest."""
    service = RevokeService(rt)

    def one(connection_id: str) -> None:
        try:
            service.revoke(connection_id, reason=reason)
        except GrantkeeperError as exc:
            log.warning(
                "compromise.revoke_failed",
                connection_id=connection_id,
                error_class=exc.error_class,
            )

    finished = 0
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, ids):
            finished += 1
            progress(finished)


def _not_revoked(rt: Runtime, ids: Sequence[str]) -> list[str]:
    with rt.engine.connect() as conn:
        return repository.ids_without_status(conn, ids, REVOKED)


def _count_revoked(rt: Runtime, ids: Sequence[str]) -> int:
    with rt.engine.connect() as conn:
        return repository.count_with_status(conn, ids, REVOKED)


def _wait(
    rt: Runtime, ids: Sequence[str], progress: Callable[[int, int], None], stall: float
) -> int:
    """Until every connection is revoked, the worker stalls, or the overall deadline."""
    now = time.monotonic()
    deadline = now + FAN_OUT_TIMEOUT_SECONDS
    done: int | None = None
    last_change = now
    while True:
        count = _count_revoked(rt, ids)
        progress(count, len(ids))
        if count >= len(ids) or now >= deadline:
            return count
        if count != done:
            done, last_change = count, now
        elif now - last_change > stall:
            log.warning("compromise.worker_stalled", revoked=count, left=len(ids) - count)
            return count
        time.sleep(0.5)
        now = time.monotonic()


def _forget_in_redis(rt: Runtime, ids: Sequence[str], flush_all_keys: bool) -> int:
    """Every grantkeeper key (only under our prefix, never a whole database), or just these
    connections' entries."""
    if flush_all_keys:
        return rt.cache.delete_all()
    removed = 0
    for connection_id in ids:
        removed += int(
            rt.redis.delete(rt.cache.access_key(connection_id), rt.cache.queued_key(connection_id))
        )
    return removed


def _manual_withdrawals(rt: Runtime, ids: Sequence[str]) -> list[str]:
    wanted = set(ids)
    with rt.engine.connect() as conn:
        providers = {p.id: p for p in repository.list_providers(conn)}
        used = {c.provider_id for c in repository.list_connections(conn) if c.id in wanted}
    return [
        withdrawal_note(providers[p])
        for p in sorted(used)
        if p in providers and not providers[p].revocation_url
    ]


def remaining_steps(since: str | None, manual: Sequence[str]) -> list[str]:
    """What a person still has to do after the bulk revocation."""
    steps = [
        "Rotate the encryption key: `grantkeeper keys generate`, put the new entry first in"
        " GRANTKEEPER_ENCRYPTION_KEYS on every process, restart, run `grantkeeper keys rotate`,"
        " then `grantkeeper keys retire OLD_KID` once `grantkeeper keys status` shows it unused.",
        "Rotate the client secret at each provider, then store the new one:"
        " `grantkeeper providers set-secret NAME --client-secret-stdin`.",
        *[f"Withdraw access by hand: {note}." for note in manual],
        "Review the audit trail since the suspected exposure: `grantkeeper audit --since "
        + (since or "YYYY-MM-DDTHH:MM:SSZ")
        + "`.",
        "Re-authorize each account: `grantkeeper connections authorize --provider NAME"
        " --connection ID`.",
    ]
    return steps
