"""Building the Celery app from settings."""

from __future__ import annotations

import sys
from typing import Any

import structlog
from celery import Celery
from celery.schedules import crontab
from celery.signals import (
    beat_init,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from config.logging import configure_logging
from config.redis_tls import parse_redis_tls, without_tls_params
from config.settings import Settings, get_settings
from grantkeeper.runtime import set_runtime


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.effective_broker_url
    redis_url = settings.redis_url.get_secret_value()
    prefix = settings.redis_key_prefix
    return {
        "broker_url": without_tls_params(broker),
        "broker_connection_retry_on_startup": True,
        # Pickle from a broker is code execution: JSON only, in and out.
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        # No result backend: nothing a task returns is stored anywhere.
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": settings.celery_queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Refreshes wait on the network, not the CPU: a thread pool keeps many in flight.
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_prefetch_multiplier": 4,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_transport_options": {"visibility_timeout": 3600},
        # RedBeat, after a Redis TLS start-up check (worker/preflight.py).
        "beat_scheduler": "worker.preflight:PreflightRedBeatScheduler",
        "redbeat_redis_url": without_tls_params(redis_url),
        # Explicit, so RedBeat does not fall back to broker_transport_options (deprecated,
        # and never forwarded to its client anyway); TLS comes from redbeat_redis_use_ssl.
        "redbeat_redis_options": {},
        "redbeat_key_prefix": f"{prefix}redbeat:",
        "redbeat_lock_key": f"{prefix}redbeat::lock",
        "beat_max_loop_interval": min(5.0, settings.scan_interval_seconds),
        "redbeat_lock_timeout": max(30, int(settings.scan_interval_seconds * 5)),
        "beat_schedule": {
            "grantkeeper-scan": {
                "task": "grantkeeper.scan_due",
                "schedule": settings.scan_interval_seconds,
                "options": {"expires": settings.scan_interval_seconds * 2},
            },
            "grantkeeper-monthly-rotation": {
                "task": "grantkeeper.monthly_rotation",
                "schedule": crontab_from(settings.rotation_schedule),
            },
            "grantkeeper-audit-retention": {
                "task": "grantkeeper.prune_audit",
                "schedule": crontab(minute="17", hour="4"),
            },
            "grantkeeper-reconcile-parked": {
                "task": "grantkeeper.reconcile_parked",
                "schedule": 30.0,
                "options": {"expires": 60},
            },
            "grantkeeper-revocation-retries": {
                "task": "grantkeeper.retry_provider_revocations",
                "schedule": 60.0,
                "options": {"expires": 120},
            },
        },
        "imports": ["tasks.refresh", "tasks.revoke", "tasks.rotation", "tasks.housekeeping"],
        "worker_hijack_root_logger": False,
        **redis_tls_config(broker, redis_url),
    }


def redis_tls_config(broker_url: str, redis_url: str) -> dict[str, Any]:
    """kombu's ``broker_use_ssl`` and RedBeat's ``redbeat_redis_use_ssl`` from the ``ssl_*``
    parameters of the (TLS) URLs, which are stripped from the URLs Celery sees: one parser
    (config/redis_tls.py) for every client, and verification on unless a URL turns it off.
    Without this, kombu would connect to a ``rediss://`` broker without verifying it."""
    config: dict[str, Any] = {}
    broker_tls = parse_redis_tls(broker_url)
    if broker_tls is not None:
        config["broker_use_ssl"] = broker_tls.redis_kwargs()
    redbeat_tls = parse_redis_tls(redis_url)
    if redbeat_tls is not None:
        config["redbeat_redis_use_ssl"] = redbeat_tls.redis_kwargs()
    return config


def crontab_from(expression: str) -> crontab:
    """'minute hour day-of-month month day-of-week', as in crontab(5)."""
    minute, hour, day_of_month, month_of_year, day_of_week = expression.split()
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("grantkeeper")
    app.conf.update(celery_config(settings))
    return app


@setup_logging.connect
def _configure_logging(**_: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, http_trace=settings.log_http_bodies)


@worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    set_runtime(None)


def _require_keyring(settings: Settings, role: str) -> None:
    """Without a keyring a worker can refresh nothing: refuse to start rather than report
    ready and fail every task."""
    from grantkeeper.crypto import Keyring  # noqa: PLC0415
    from grantkeeper.errors import KeyringError  # noqa: PLC0415

    keys = settings.encryption_keys
    try:
        Keyring.parse(keys.get_secret_value() if keys else None, settings.primary_key_id)
    except KeyringError as exc:
        print(f"grantkeeper {role} refuses to start: {exc}", file=sys.stderr)
        raise SystemExit(78) from None


def _startup_check(role: str) -> None:
    """In production, a worker or beat refuses to start on a failing security check."""
    settings = get_settings()
    _require_keyring(settings, role)
    if settings.env != "production":
        return
    from grantkeeper.checks import evaluate, failed, gather  # noqa: PLC0415

    results = evaluate(gather(settings, production=True))
    if not failed(results):
        return
    log = structlog.get_logger("grantkeeper.startup")
    failures = [f"{r.check}: {r.detail}" for r in results if r.status == "fail"]
    if settings.unsafe_skip_startup_checks:
        log.critical("startup.checks_overridden", role=role, failures=failures)
        return
    log.critical("startup.refused", role=role, failures=failures)
    print(
        f"grantkeeper {role} refuses to start in production; failing checks:\n  "
        + "\n  ".join(failures)
        + "\nRun `grantkeeper check --production` for fixes"
        " (emergency override: GRANTKEEPER_UNSAFE_SKIP_STARTUP_CHECKS=true).",
        file=sys.stderr,
    )
    raise SystemExit(78)  # EX_CONFIG


@worker_init.connect
def _check_redis_tls_before_worker(**_: Any) -> None:
    # First: a wrong CA stops the worker with one line instead of a broker retry loop.
    from worker.preflight import redis_tls_preflight  # noqa: PLC0415

    redis_tls_preflight("worker")


@worker_init.connect
def _check_before_worker(**_: Any) -> None:
    _startup_check("worker")


@beat_init.connect
def _check_before_beat(**_: Any) -> None:
    _startup_check("beat")


# Prometheus (grantkeeper/metrics.py): only with GRANTKEEPER_WORKER_METRICS_PORT or
# GRANTKEEPER_BEAT_METRICS_PORT; prometheus_client is imported only then.


@worker_init.connect
def _metrics_before_pool(**_: Any) -> None:
    if (port := get_settings().worker_metrics_port) is not None:
        from grantkeeper import metrics  # noqa: PLC0415

        metrics.on_worker_init(port)


@worker_ready.connect
def _serve_worker_metrics(**_: Any) -> None:
    settings = get_settings()
    if settings.worker_metrics_port is not None:
        from grantkeeper import metrics  # noqa: PLC0415

        metrics.on_worker_ready(settings.metrics_host, settings.worker_metrics_port)


@worker_process_init.connect
def _metrics_in_pool_process(**_: Any) -> None:
    if get_settings().worker_metrics_port is not None:
        from grantkeeper import metrics  # noqa: PLC0415

        metrics.on_pool_process_init()


@worker_process_shutdown.connect
def _metrics_pool_process_dead(pid: int | None = None, **_: Any) -> None:
    if get_settings().worker_metrics_port is not None:
        from grantkeeper import metrics  # noqa: PLC0415

        metrics.on_pool_process_shutdown(pid)


@beat_init.connect
def _serve_beat_metrics(**_: Any) -> None:
    settings = get_settings()
    if settings.beat_metrics_port is not None:
        from grantkeeper import metrics  # noqa: PLC0415
        from grantkeeper.runtime import get_runtime  # noqa: PLC0415

        metrics.on_beat_init(settings.metrics_host, settings.beat_metrics_port, get_runtime)
