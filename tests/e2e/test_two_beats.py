"""Two ``celery beat`` processes on one schedule do not double the work: RedBeat's lock keeps
one active, and the queued marker keeps each due connection to one pending task."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from config.settings import Settings
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import audit_events, connections
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant
from tests.support.processes import settings_env, start_celery, stop

pytestmark = pytest.mark.e2e
WINDOW = 10.0  # seconds of observation


def test_two_beats_schedule_once(
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
    tmp_path: Path,
) -> None:
    """Over a 10 s window with a 1 s scan interval and two beats running, at most one scan per
    interval happens, and each connection (all due at once) is refreshed exactly once."""
    ids = [
        import_grant(runtime, devserver, provider_name, f"a{n}", access_ttl=3600)[0]
        for n in range(10)
    ]
    # Make them all due now, once: expiry inside the 60 s margin, and a lifetime long enough
    # (issued an hour ago) that the margin is not capped; the refresh then gives 1 h tokens.
    now = datetime.now(UTC)
    with runtime.engine.begin() as conn:
        conn.execute(
            update(connections)
            .where(connections.c.id.in_(ids))
            .values(
                access_expires_at=now + timedelta(seconds=30),
                access_issued_at=now - timedelta(hours=1),
            )
        )
    env = settings_env(
        settings,
        GRANTKEEPER_CELERY_QUEUE=f"gk-beats-{uuid.uuid4().hex[:8]}",
        GRANTKEEPER_SCAN_INTERVAL_SECONDS="1",
        GRANTKEEPER_REFRESH_MARGIN_SECONDS="60",
        GRANTKEEPER_WORKER_CONCURRENCY="4",
    )
    worker = start_celery(
        "worker", env, tmp_path / "worker.log", "--without-mingle", "--without-gossip"
    )
    beats = [
        start_celery("beat", env, tmp_path / f"beat{n}.log", "--schedule", str(tmp_path / f"s{n}"))
        for n in range(2)
    ]
    start = time.monotonic()
    try:
        time.sleep(WINDOW)
    finally:
        for beat in beats:
            stop(beat)
        stop(worker)
    elapsed = time.monotonic() - start
    with runtime.engine.connect() as conn:
        scans = conn.execute(
            select(func.count()).where(audit_events.c.event == "scan.completed")
        ).scalar_one()
    stats = devserver.stats()
    print(f"\ntwo beats: {scans} scans in {elapsed:.1f}s, provider {stats}")
    assert 1 <= scans <= elapsed + 2
    assert stats["refresh_ok"] == len(ids)
    assert stats["reuse_detections"] == 0
