"""The metrics observer turns audit rows into Prometheus samples, in its own registry."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from grantkeeper import metrics
from grantkeeper.metrics import Metrics, MetricsObserver, QueueProbe


def row(event: str, provider: str | None = "dev", **details: Any) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC),
        "event": event,
        "outcome": "ok",
        "connection_id": "c1",
        "provider": provider,
        "actor": "test",
        "key_id": None,
        "version": 1,
        "details": details,
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_refresh_rows_count_outcomes_and_observe_durations() -> None:
    registry = CollectorRegistry()
    observe = MetricsObserver(Metrics(registry))
    observe(row("refresh.succeeded", result="refreshed", duration_ms=120.0, lock_wait_ms=0.0))
    observe(row("refresh.succeeded", result="refreshed", duration_ms=80.0, lock_wait_ms=2.5))
    observe(
        row(
            "refresh.failed",
            result="failed_transient",
            duration_ms=5000.0,
            lock_wait_ms=0.0,
            error_class="provider_unavailable",
            http_status=503,
        )
    )
    observe(row("refresh.skipped", result="not_due", duration_ms=1.0, lock_wait_ms=0.0))

    outcomes = "grantkeeper_refresh_outcomes_total"
    assert value(registry, outcomes, provider="dev", result="refreshed", error_class="") == 2
    failed = {
        "provider": "dev",
        "result": "failed_transient",
        "error_class": "provider_unavailable",
    }
    assert value(registry, outcomes, **failed) == 1
    assert value(registry, outcomes, provider="dev", result="not_due", error_class="") == 1
    duration = "grantkeeper_refresh_duration_seconds"
    assert value(registry, f"{duration}_count", provider="dev", result="refreshed") == 2
    total = value(registry, f"{duration}_sum", provider="dev", result="refreshed")
    assert total == pytest.approx(0.2)
    assert value(registry, f"{duration}_bucket", provider="dev", result="refreshed", le="0.1") == 1
    assert value(registry, "grantkeeper_lock_wait_seconds_count") == 4
    assert value(registry, "grantkeeper_lock_wait_seconds_sum") == pytest.approx(0.0025)


def test_anomalies_and_scans() -> None:
    registry = CollectorRegistry()
    observe = MetricsObserver(Metrics(registry))
    observe(row("anomaly.refresh_storm", refreshes=40))
    observe(row("anomaly.refresh_storm", refreshes=41))
    observe(row("anomaly.tampering"))
    observe(row("scan.completed", provider=None, due=7, enqueued=5, already_queued=2))
    observe(row("scan.completed", provider=None, due=3, enqueued=0, already_queued=3))
    assert value(registry, "grantkeeper_anomalies_total", rule="refresh_storm") == 2
    assert value(registry, "grantkeeper_anomalies_total", rule="tampering") == 1
    assert value(registry, "grantkeeper_scans_total") == 2
    assert value(registry, "grantkeeper_scan_due") == 3


def test_odd_rows_are_tolerated() -> None:
    registry = CollectorRegistry()
    observe = MetricsObserver(Metrics(registry))
    observe(row("refresh.failed", provider=None))  # no details at all
    observe(row("scan.completed", due="many"))
    observe(row("token.read"))
    outcomes = "grantkeeper_refresh_outcomes_total"
    assert value(registry, outcomes, provider="unknown", result="failed", error_class="") == 1
    assert value(registry, "grantkeeper_scans_total") == 1
    assert value(registry, "grantkeeper_scan_due") == 0


def test_registries_are_independent_and_the_global_one_is_untouched() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    MetricsObserver(Metrics(a))(row("scan.completed", due=1))
    Metrics(b)  # a second set of the same names: no "duplicated timeseries" error
    assert value(a, "grantkeeper_scans_total") == 1
    assert value(b, "grantkeeper_scans_total") == 0
    from prometheus_client import REGISTRY  # noqa: PLC0415

    assert b"grantkeeper_" not in generate_latest(REGISTRY)


def test_metrics_are_off_unless_enabled_in_this_process() -> None:
    # The test process never serves metrics: no observer, so Runtime.auditor attaches none.
    assert metrics.enabled() is None
    assert metrics.observer() is None


def test_queue_probe_reads_every_priority_list() -> None:
    assert QueueProbe("gk").keys() == ["gk", "gk\x06\x163", "gk\x06\x166", "gk\x06\x169"]
