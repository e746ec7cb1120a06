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

from grantkeeper import repository
from grantkeeper.models import REVOKED
from grantkeeper.revoke import RevokeService, withdrawal_note
from grantkeeper.runtime import Runtime

# How long the command waits for the worker to finish before reporting what is left.
FAN_OUT_TIMEOUT_SECONDS = 900.0


@dataclass(frozen=True)
class BulkRevokeReport:
    targeted: int
    revoked: int
    via_worker: bool
    seconds: float
    redis_keys_removed: int
    manual_withdrawals: list[str]


def revoke_many(
    rt: Runtime,
    ids: Sequence[str],
    *,
    reason: str,
    dispatch: Callable[[str], None] | None,
    progress: Callable[[int, int], None],
    flush_all_keys: bool,
    local_threads: int = 8,
) -> BulkRevokeReport:
    """``dispatch`` sends one revoke task (None: no worker, revoke in this process)."""
    started = time.monotonic()
    if dispatch is not None:
        for connection_id in ids:
            dispatch(connection_id)
        done = _wait(rt, ids, progress)
    else:
        service = RevokeService(rt)
        finished = 0
        with ThreadPoolExecutor(local_threads) as pool:
            for _ in pool.map(lambda cid: service.revoke(cid, reason=reason), ids):
                finished += 1
                progress(finished, len(ids))
        done = _count_revoked(rt, ids)
    removed = _forget_in_redis(rt, ids, flush_all_keys)
    return BulkRevokeReport(
        targeted=len(ids),
        revoked=done,
        via_worker=dispatch is not None,
        seconds=time.monotonic() - started,
        redis_keys_removed=removed,
        manual_withdrawals=_manual_withdrawals(rt, ids),
    )


def _count_revoked(rt: Runtime, ids: Sequence[str]) -> int:
    with rt.engine.connect() as conn:
        return repository.count_with_status(conn, ids, REVOKED)


def _wait(rt: Runtime, ids: Sequence[str], progress: Callable[[int, int], None]) -> int:
    deadline = time.monotonic() + FAN_OUT_TIMEOUT_SECONDS
    done = 0
    while time.monotonic() < deadline:
        done = _count_revoked(rt, ids)
        progress(done, len(ids))
        if done >= len(ids):
            break
        time.sleep(0.5)
    return done


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
