"""Prometheus metrics for the worker and beat processes.

Two sources:

* :class:`MetricsObserver`, an audit observer (see :class:`grantkeeper.audit.Auditor`): every
  ``refresh.*``, ``anomaly.*`` and ``scan.completed`` row updates counters and histograms, so
  the cost is O(events) and the numbers agree with the audit trail.
* :class:`StateCollector`, computed when Prometheus scrapes, in the **beat** process only (one
  per deployment, so N workers do not repeat the queries): connections by status, seconds
  until the soonest expiry, and the Celery queue's length on the broker.

A process keeps metrics only when its endpoint is configured (``GRANTKEEPER_WORKER_METRICS_PORT``
or ``GRANTKEEPER_BEAT_METRICS_PORT``): :func:`enable` builds one dedicated
:class:`~prometheus_client.CollectorRegistry` for the process, never the library's global one,
and :func:`observer` hands :class:`grantkeeper.runtime.Runtime` the observer to attach. Tests
and the CLI never enable it.

Prefork workers: with ``PROMETHEUS_MULTIPROC_DIR`` set (an empty directory, wiped before each
start), every pool process writes its values there, the worker's endpoint serves them merged
by a :class:`~prometheus_client.multiprocess.MultiProcessCollector`, and a pool process that
exits is marked dead (``worker_process_shutdown``). The default threads pool is one process
and needs none of that. Give beat no ``PROMETHEUS_MULTIPROC_DIR`` (or another directory than
the worker's): it serves its own registry.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from grantkeeper import repository
from grantkeeper.models import STATUSES
from grantkeeper.redisconn import connect_redis

if TYPE_CHECKING:
    from grantkeeper.runtime import Runtime

log = structlog.get_logger("grantkeeper.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REFRESH_EVENTS = frozenset({"refresh.succeeded", "refresh.failed", "refresh.skipped"})
# Seconds. A refresh waits on the provider (100-500 ms typical, read timeout 15 s).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
LOCK_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 30.0, 60.0)
# kombu's Redis transport keeps a queue's messages of priority p > 0 in "<queue>\x06\x16<p>".
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (3, 6, 9)


def multiprocess_dir() -> str | None:
    """The prometheus_client multiprocess directory, when this process runs in that mode."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    """The metric objects of one process, in its own registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.refresh_duration = Histogram(
            "grantkeeper_refresh_duration_seconds",
            "Time one refresh attempt took, lock wait and provider call included.",
            ["provider", "result"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.refresh_outcomes = Counter(
            "grantkeeper_refresh_outcomes",
            "Refresh attempts by outcome (result: refreshed, not_due, failed_transient, ...).",
            ["provider", "result", "error_class"],
            registry=registry,
        )
        self.lock_wait = Histogram(
            "grantkeeper_lock_wait_seconds",
            "Time a refresh waited for the connection's lock (0 when it did not wait).",
            buckets=LOCK_WAIT_BUCKETS,
            registry=registry,
        )
        self.anomalies = Counter(
            "grantkeeper_anomalies",
            "Anomaly rules that fired (grantkeeper/anomaly.py).",
            ["rule"],
            registry=registry,
        )
        self.scans = Counter(
            "grantkeeper_scans", "Completed scans for due connections.", registry=registry
        )
        self.scan_due = Gauge(
            "grantkeeper_scan_due",
            "Connections the most recent scan found due.",
            registry=registry,
            # Prefork: the value of the pool process that scanned last, not a sum.
            multiprocess_mode="mostrecent",
        )


class MetricsObserver:
    """An audit observer: turns audit rows into metric updates. Never raises on odd rows."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def __call__(self, row: Mapping[str, Any]) -> None:
        event = str(row.get("event") or "")
        details = row.get("details") or {}
        if event in REFRESH_EVENTS:
            self._refresh(event, row, details)
        elif event.startswith("anomaly."):
            self.metrics.anomalies.labels(rule=event.removeprefix("anomaly.")).inc()
        elif event == "scan.completed":
            self.metrics.scans.inc()
            due = details.get("due")
            if isinstance(due, int | float):
                self.metrics.scan_due.set(due)

    def _refresh(self, event: str, row: Mapping[str, Any], details: Mapping[str, Any]) -> None:
        m = self.metrics
        provider = str(row.get("provider") or "unknown")
        result = str(details.get("result") or event.removeprefix("refresh."))
        error_class = str(details.get("error_class") or "")
        m.refresh_outcomes.labels(provider=provider, result=result, error_class=error_class).inc()
        duration_ms = details.get("duration_ms")
        if isinstance(duration_ms, int | float):
            m.refresh_duration.labels(provider=provider, result=result).observe(duration_ms / 1000)
        lock_wait_ms = details.get("lock_wait_ms")
        if isinstance(lock_wait_ms, int | float):
            m.lock_wait.observe(lock_wait_ms / 1000)


@dataclass(frozen=True)
class QueueProbe:
    """The broker's view of the Celery queue: messages not yet fetched by any worker."""

    queue: str

    def keys(self) -> list[str]:
        return [self.queue, *(f"{self.queue}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS)]

    def pending(self, client: redis.Redis) -> int:
        pipe = client.pipeline(transaction=False)
        for key in self.keys():
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())


class StateCollector(Collector):
    """Scrape-time gauges from the database and the broker (beat only).

    A source that fails is reported by ``grantkeeper_metrics_source_up{source} 0`` and its
    gauges are left out of that scrape; the scrape itself never fails.
    """

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self._runtime = runtime
        self._clock = clock
        self._broker: redis.Redis | None = None
        self._broker_lock = threading.Lock()

    def _broker_client(self, rt: Runtime) -> redis.Redis:
        with self._broker_lock:
            if self._broker is None:
                url = rt.settings.effective_broker_url
                if url == rt.settings.redis_url.get_secret_value():
                    self._broker = rt.redis
                else:
                    self._broker = connect_redis(url, socket_timeout=5, socket_connect_timeout=5)
            return self._broker

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "grantkeeper_metrics_source_up",
            "1 if the source answered for this scrape's state gauges, else 0.",
            labels=["source"],
        )
        rt = self._runtime()
        yield from self._database(rt, up)
        yield from self._broker_queue(rt, up)
        yield up

    def _database(self, rt: Runtime, up: GaugeMetricFamily) -> Iterator[Metric]:
        try:
            with rt.engine.connect() as conn:
                by_status = repository.count_by_status(conn)
                soonest = repository.soonest_active_expiry(conn)
        except SQLAlchemyError as exc:
            log.warning("metrics.database_unavailable", error_class=type(exc).__name__)
            up.add_metric(["database"], 0)
            return
        up.add_metric(["database"], 1)
        connections = GaugeMetricFamily(
            "grantkeeper_connections", "Connections by status.", labels=["status"]
        )
        for status in sorted({*STATUSES, *by_status}):
            connections.add_metric([status], by_status.get(status, 0))
        yield connections
        expiry = GaugeMetricFamily(
            "grantkeeper_seconds_until_soonest_expiry",
            "Seconds until the soonest access token of an active connection expires (negative:"
            " already expired). Absent when no active connection has a token.",
        )
        if soonest is not None:
            expiry.add_metric([], (soonest - self._clock()).total_seconds())
        yield expiry

    def _broker_queue(self, rt: Runtime, up: GaugeMetricFamily) -> Iterator[Metric]:
        queue = rt.settings.celery_queue
        try:
            pending = QueueProbe(queue).pending(self._broker_client(rt))
        except redis.RedisError as exc:
            log.warning("metrics.broker_unavailable", error_class=type(exc).__name__)
            up.add_metric(["broker"], 0)
            return
        up.add_metric(["broker"], 1)
        tasks = GaugeMetricFamily(
            "grantkeeper_tasks_pending",
            "Messages waiting in the Celery queue on the broker, not yet fetched by a worker"
            " (tasks a worker holds for their countdown are not counted).",
            labels=["queue"],
        )
        tasks.add_metric([queue], pending)
        yield tasks


# -- per process -------------------------------------------------------------------------------

_lock = threading.Lock()
_metrics: Metrics | None = None


def enable() -> Metrics:
    """Build this process's metrics once (a forked pool process inherits them)."""
    global _metrics  # noqa: PLW0603 - one registry per process, by design
    with _lock:
        if _metrics is None:
            registry = CollectorRegistry()
            if multiprocess_dir() is None:
                ProcessCollector(registry=registry)
            _metrics = Metrics(registry)
        return _metrics


def enabled() -> Metrics | None:
    return _metrics


def observer() -> MetricsObserver | None:
    """The audit observer for this process; None unless metrics are enabled in it."""
    metrics = _metrics
    return MetricsObserver(metrics) if metrics is not None else None


def worker_registry(metrics: Metrics) -> CollectorRegistry:
    """What the worker serves: its own registry, or, in multiprocess mode, every pool
    process's values merged from the directory."""
    path = multiprocess_dir()
    if path is None:
        return metrics.registry
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
    return merged


def beat_registry(metrics: Metrics, runtime: Callable[[], Runtime]) -> CollectorRegistry:
    metrics.registry.register(StateCollector(runtime))
    return metrics.registry


def serve(registry: CollectorRegistry, host: str, port: int, role: str) -> bool:
    """Start the /metrics endpoint on a daemon thread. A port in use is logged, not fatal:
    metrics are never worth stopping refreshes for."""
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error(  # noqa: TRY400 - one line: the address and the reason say it all
            "metrics.http_failed", role=role, host=host, port=port, error=str(exc)
        )
        return False
    log.info("metrics.http_started", role=role, host=host, port=port)
    return True


def process_exited(pid: int) -> None:
    """A pool process exits: drop its live gauges from the multiprocess directory."""
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# -- Celery signal bodies (connected in worker/app.py) -----------------------------------------


def on_worker_init(worker_port: int | None) -> None:
    """Before the pool starts, so prefork pool processes inherit the enabled metrics."""
    if worker_port is not None:
        enable()


def on_worker_ready(host: str, worker_port: int | None) -> None:
    if worker_port is not None:
        serve(worker_registry(enable()), host, worker_port, "worker")


def on_pool_process_init() -> None:
    """A prefork pool process: without a multiprocess directory its values are invisible."""
    if _metrics is not None and multiprocess_dir() is None:
        log.warning(
            "metrics.prefork_without_multiproc_dir",
            detail=f"set {MULTIPROC_ENV} to an empty directory, or the worker's endpoint shows"
            " only its main process, which refreshes nothing",
        )


def on_pool_process_shutdown(pid: int | None) -> None:
    if _metrics is not None:
        process_exited(pid or os.getpid())


def on_beat_init(host: str, beat_port: int | None, runtime: Callable[[], Runtime]) -> None:
    if beat_port is not None:
        serve(beat_registry(enable(), runtime), host, beat_port, "beat")
