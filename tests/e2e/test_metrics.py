"""Prometheus endpoints of a real ``celery worker`` and ``celery beat``: the worker's refresh
metrics agree with what the provider saw, and beat's scrape-time gauges with the database.

Run with the default threads pool, and with a prefork pool in prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), where the refreshes happen in pool
processes and the worker's main process serves their merged values.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import update

from config.settings import Settings
from grantkeeper import repository
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import STATUSES, connections
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant
from tests.support.processes import settings_env, start_celery, stop

pytestmark = pytest.mark.e2e
CONNECTIONS = 8
DEADLINE = 45.0

Samples = dict[str, list[Sample]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, by family name (counters without ``_total``)."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return {
        family.name: list(family.samples)
        for family in text_string_to_metric_families(response.text)
    }


def total(samples: Samples, family: str, suffix: str = "", **labels: str) -> float:
    return sum(
        s.value
        for s in samples.get(family, [])
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass  # the endpoint is not up yet
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_worker_and_beat_metrics_endpoints(
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
    tmp_path: Path,
    pool: str,
) -> None:
    ids = [
        import_grant(runtime, devserver, provider_name, f"m{n}", access_ttl=3600)[0]
        for n in range(CONNECTIONS)
    ]
    # All due at once (inside the 60 s margin, with an hour-long lifetime so the margin is not
    # capped); one more connection stays out of it, needing re-authorization.
    now = datetime.now(UTC)
    with runtime.engine.begin() as conn:
        conn.execute(
            update(connections)
            .where(connections.c.id.in_(ids[1:]))
            .values(
                access_expires_at=now + timedelta(seconds=30),
                access_issued_at=now - timedelta(hours=1),
            )
        )
        conn.execute(
            update(connections)
            .where(connections.c.id == ids[0])
            .values(status="reauth_required", failure_count=1)
        )
    devserver.reset_stats()
    worker_port, beat_port = free_port(), free_port()
    queue = f"gk-metrics-{uuid.uuid4().hex[:8]}"
    env = settings_env(
        settings,
        GRANTKEEPER_CELERY_QUEUE=queue,
        GRANTKEEPER_SCAN_INTERVAL_SECONDS="1",
        GRANTKEEPER_WORKER_CONCURRENCY="4",
        GRANTKEEPER_WORKER_METRICS_PORT=str(worker_port),
        GRANTKEEPER_BEAT_METRICS_PORT=str(beat_port),
    )
    worker_env = dict(env)
    pool_args = ["--pool", pool]
    if pool == "prefork":
        multiproc = tmp_path / "prometheus"
        multiproc.mkdir()
        worker_env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
        pool_args += ["--concurrency", "2"]
    worker = start_celery(
        "worker",
        worker_env,
        tmp_path / "worker.log",
        "--without-mingle",
        "--without-gossip",
        *pool_args,
    )
    beat = start_celery("beat", env, tmp_path / "beat.log", "--schedule", str(tmp_path / "s"))
    expected = CONNECTIONS - 1
    try:
        wait_for(
            "every due connection refreshed and counted",
            lambda: (
                total(
                    scrape(worker_port),
                    "grantkeeper_refresh_outcomes",
                    "_total",
                    result="refreshed",
                )
                >= expected
            ),
        )
        wait_for("beat's endpoint", lambda: "grantkeeper_connections" in scrape(beat_port))
        worker_samples = scrape(worker_port)
        beat_samples = scrape(beat_port)
        with runtime.engine.connect() as conn:
            by_status = repository.count_by_status(conn)
            soonest = repository.soonest_active_expiry(conn)
        scraped_at = datetime.now(UTC)
    finally:
        stop(beat)
        stop(worker)
    stats = devserver.stats()
    print(f"\nmetrics ({pool}): provider {stats}")
    worker_log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "audit.observer_failed" not in worker_log
    assert "metrics.http_failed" not in worker_log
    assert "metrics.prefork_without_multiproc_dir" not in worker_log

    # Worker: refresh outcomes agree with the provider's own counters.
    outcomes = "grantkeeper_refresh_outcomes"
    assert stats["refresh_ok"] == expected
    assert total(worker_samples, outcomes, "_total", result="refreshed") == stats["refresh_ok"]
    failed = sum(
        s.value
        for s in worker_samples[outcomes]
        if s.name == outcomes + "_total" and s.labels["result"].startswith("failed")
    )
    assert failed == stats["refresh_failed"] == 0
    assert {s.labels["provider"] for s in worker_samples[outcomes]} == {provider_name}
    duration = "grantkeeper_refresh_duration_seconds"
    assert total(worker_samples, duration, "_count", result="refreshed") == expected
    assert total(worker_samples, duration, "_sum", result="refreshed") > 0
    assert total(worker_samples, "grantkeeper_lock_wait_seconds", "_count") >= expected
    assert total(worker_samples, "grantkeeper_scans", "_total") >= 1
    assert "grantkeeper_scan_due" in worker_samples
    # Scrape-time gauges are beat's alone: N workers do not repeat the queries.
    assert "grantkeeper_connections" not in worker_samples

    # Beat: connections by status, from the database at scrape time.
    gauge = {s.labels["status"]: s.value for s in beat_samples["grantkeeper_connections"]}
    assert gauge == {status: float(by_status.get(status, 0)) for status in STATUSES}
    assert gauge["reauth_required"] == 1
    # The soonest expiry is a fresh hour-long token's (or the one not refreshed).
    (expiry,) = beat_samples["grantkeeper_seconds_until_soonest_expiry"]
    assert soonest is not None
    assert abs(expiry.value - (soonest - scraped_at).total_seconds()) < 10
    assert 0 < expiry.value <= 3600
    (pending,) = beat_samples["grantkeeper_tasks_pending"]
    assert pending.labels == {"queue": queue}
    assert pending.value >= 0
    up = {s.labels["source"]: s.value for s in beat_samples["grantkeeper_metrics_source_up"]}
    assert up == {"database": 1, "broker": 1}
