"""Beat's scan on real PostgreSQL and Redis, and the batch task it sends, run as the worker
runs it, against the dev OAuth server (rotation + reuse detection)."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

from grantkeeper import repository
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.runtime import Runtime
from grantkeeper.scan import plan_batches, scan_due
from tasks.refresh import refresh_batch
from tests.support.dev import import_grant


def _import(
    runtime: Runtime, devserver: DevOAuthServer, provider: str, n: int, ttl: int
) -> list[str]:
    ids = [import_grant(runtime, devserver, provider, f"scan-{ttl}-{i}", ttl)[0] for i in range(n)]
    if ttl <= 2:
        time.sleep(ttl)  # past the due point (half the lifetime) of every one of them
    return ids


def test_plan_batches_keeps_order_and_size() -> None:
    """Every id once, in order, in batches of at most the size, countdowns inside the window."""
    ids = [f"c{i}" for i in range(47)]
    plan = plan_batches(ids, 20, 15.0, random.Random(3))
    assert [len(b) for b, _ in plan] == [20, 20, 7]
    assert [cid for b, _ in plan for cid in b] == ids
    assert all(0.0 <= delay < 15.0 for _, delay in plan)
    assert plan_batches([], 20, 15.0, random.Random(3)) == []


def test_scan_enqueues_due_connections_once_in_batches(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """Only connections due within the margin are sent, in batches of the configured size; a
    second scan while their tasks are pending sends nothing (the queued markers)."""
    due = _import(
        runtime, devserver, provider_name, 45, ttl=1
    )  # expires within the 60 s margin: due
    later = _import(runtime, devserver, provider_name, 5, ttl=3600)
    sent: list[tuple[list[str], float]] = []
    first = scan_due(runtime, lambda batch, delay: sent.append((batch, delay)))
    assert (first.due, first.enqueued, first.already_queued) == (45, 45, 0)
    size = runtime.settings.refresh_batch_size
    assert [len(b) for b, _ in sent] == [size, size, 45 - 2 * size]
    assert sorted(cid for b, _ in sent for cid in b) == sorted(due)
    assert not set(later) & {cid for b, _ in sent for cid in b}
    window = runtime.settings.scan_interval_seconds / 2
    assert all(0.0 <= delay < window for _, delay in sent)

    again: list[tuple[list[str], float]] = []
    second = scan_due(runtime, lambda batch, delay: again.append((batch, delay)))
    assert (second.due, second.enqueued, second.already_queued) == (45, 0, 45)
    assert again == []


def test_refresh_batch_refreshes_each_once_and_is_safe_to_redeliver(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """The batch task refreshes every connection in it once; delivered a second time (a worker
    died before its ack), it skips them all: not due any more, no provider call, no reuse."""
    due = _import(runtime, devserver, provider_name, 12, ttl=1)
    scan_due(runtime, lambda _batch, _delay: None)
    outcomes = refresh_batch.run(due, "scheduled")
    assert outcomes == {"refreshed": 12}
    assert devserver.stats()["refresh_ok"] == 12
    # Their queued markers are gone, so the next scan may send them again when due.
    assert all(runtime.cache.mark_queued(cid, 5) for cid in due)
    again = refresh_batch.run(due, "scheduled")
    assert again == {"not_due": 12}
    assert devserver.stats()["refresh_ok"] == 12
    assert devserver.stats()["reuse_detections"] == 0
    with runtime.engine.connect() as conn:
        rows = [repository.get_connection(conn, cid) for cid in due]
    now = datetime.now(UTC)
    assert all(r is not None and r.version == 2 for r in rows)
    assert all(
        r is not None and r.access_expires_at is not None and r.access_expires_at > now
        for r in rows
    )


def test_refresh_batch_skips_a_connection_deleted_after_the_scan(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A connection removed between scan and task is reported, not retried or fatal to the
    rest of its batch."""
    due = _import(runtime, devserver, provider_name, 3, ttl=1)
    outcomes = refresh_batch.run([due[0], "no-such-connection", due[1]], "scheduled")
    assert outcomes == {"refreshed": 2, "not_found": 1}


def test_scan_leaves_out_connections_backing_off(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A connection whose next attempt lies in the future (after a transient failure) is not
    sent until then."""
    due = _import(runtime, devserver, provider_name, 2, ttl=1)
    with runtime.engine.begin() as conn:
        repository.record_failure(
            conn,
            due[0],
            1,
            error_class="provider_unavailable",
            new_status=None,
            now=datetime.now(UTC),
            next_attempt_at=datetime.now(UTC) + timedelta(minutes=5),
        )
    sent: list[str] = []
    scan_due(runtime, lambda batch, _delay: sent.extend(batch))
    assert sent == [due[1]]
