"""`grantkeeper check` against the live services of this machine, and the production start-up
gate of worker and beat."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from config.settings import Settings
from grantkeeper.models import audit_events
from grantkeeper.runtime import Runtime
from tests.support.processes import ROOT, settings_env, start_celery, stop

GRANTKEEPER = str(Path(sys.executable).parent / "grantkeeper")


def _check(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRANTKEEPER, "check", "--json", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_reports_this_machine(runtime: Runtime, settings: Settings, tmp_path: Path) -> None:
    """On this machine (plain Redis without password, PostgreSQL without TLS, a superuser
    role), development mode warns and passes, production mode fails on exactly those points,
    with a fix for each, and records the failure in the audit trail."""
    env = settings_env(settings)
    dev = _check(env, tmp_path)
    assert dev.returncode == 0, dev.stderr
    dev_results = {r["check"]: r["status"] for r in json.loads(dev.stdout)}
    assert dev_results["celery.json_only"] == "pass"
    assert dev_results["keyring.randomness"] == "pass"
    assert "fail" not in dev_results.values()

    prod = _check(env, tmp_path, "--production")
    assert prod.returncode == 1
    results = json.loads(prod.stdout)
    failing = {r["check"] for r in results if r["status"] == "fail"}
    assert {"redis.tls", "redis.password", "database.tls", "database.role_ddl"} <= failing
    assert all(r["fix"] for r in results if r["status"] == "fail")
    with runtime.engine.connect() as conn:
        details = conn.execute(
            select(audit_events.c.details).where(audit_events.c.event == "check.failed")
        ).scalar_one()
    assert "redis.tls" in details["checks"]


def test_production_worker_and_beat_refuse_to_start(settings: Settings, tmp_path: Path) -> None:
    """With GRANTKEEPER_ENV=production and failing checks, worker and beat exit with 78 and
    say why; the logged emergency override lets the worker start."""
    env = settings_env(settings, GRANTKEEPER_ENV="production")
    for role in ("worker", "beat"):
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", role],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 78, done.stderr[-2000:]
        assert "refuses to start in production" in done.stderr
        assert "redis.tls" in done.stderr

    log = tmp_path / "override.log"
    override = {
        **env,
        "GRANTKEEPER_UNSAFE_SKIP_STARTUP_CHECKS": "true",
        "GRANTKEEPER_CELERY_QUEUE": "gk-override-test",
    }
    worker = start_celery("worker", override, log, "--without-mingle", "--without-gossip")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "ready" not in log.read_text():
            assert worker.poll() is None, log.read_text()[-2000:]
            time.sleep(0.3)
        text = log.read_text()
        assert "ready" in text
        assert "startup.checks_overridden" in text
    finally:
        stop(worker)
