"""``grantkeeper status`` as a real subprocess: without a worker and beat it asks for a person;
with them running and nothing failing it exits 0; a connection that needs re-authorization
makes it ask again. Connections are classified from the database and the queued markers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from config.settings import Settings
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import audit_events, connections
from grantkeeper.runtime import Runtime
from grantkeeper.status import NEEDS_ATTENTION_EXIT
from tests.support.dev import import_grant
from tests.support.processes import settings_env, start_celery, stop

GRANTKEEPER = Path(sys.executable).parent / "grantkeeper"


def run_status(env: Mapping[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRANTKEEPER), "status", *args],
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def status_json(env: Mapping[str, str], cwd: Path) -> tuple[int, dict[str, Any]]:
    result = run_status(env, cwd, "--json")
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def set_values(rt: Runtime, connection_id: str, **values: Any) -> None:
    with rt.engine.begin() as conn:
        conn.execute(update(connections).where(connections.c.id == connection_id).values(**values))


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return settings_env(
        settings,
        GRANTKEEPER_CELERY_QUEUE=f"gk-status-{uuid.uuid4().hex[:8]}",
        GRANTKEEPER_SCAN_INTERVAL_SECONDS="1",
        GRANTKEEPER_WORKER_CONCURRENCY="4",
    )


def test_status_without_worker_and_beat_needs_a_person(
    runtime: Runtime,
    devserver: DevOAuthServer,
    provider_name: str,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Nothing running: exit 3, saying "no worker" and "beat not alive"; due connections are
    told apart as queued, backing off and not queued, and an expired one is overdue."""
    now = datetime.now(UTC)
    queued, backing, plain, expired, fine = (
        import_grant(runtime, devserver, provider_name, f"s{n}")[0] for n in range(5)
    )
    for cid in (queued, backing, plain):
        set_values(runtime, cid, access_expires_at=now + timedelta(seconds=30))
    set_values(
        runtime,
        backing,
        next_attempt_at=now + timedelta(minutes=5),
        failure_count=2,
        last_error_class="provider_unavailable",
    )
    set_values(runtime, expired, access_expires_at=now - timedelta(seconds=5))
    runtime.cache.mark_queued(queued, 60)

    result = run_status(env, tmp_path)
    print(result.stdout)
    assert result.returncode == NEEDS_ATTENTION_EXIT, result.stderr
    assert "no worker" in result.stdout
    assert "beat not alive" in result.stdout
    assert "4 expiring within 60 s: 1 queued, 1 backing off, 2 not queued" in result.stdout
    assert "NEEDS A PERSON (exit 3):" in result.stdout

    code, doc = status_json(env, tmp_path)
    assert code == NEEDS_ATTENTION_EXIT
    assert doc["healthy"] is False
    assert [p["code"] for p in doc["problems"]] == ["overdue", "no_worker", "beat_not_alive"]
    assert doc["connections"]["active"] == 5
    assert doc["due"]["count"] == 4
    assert doc["due"]["queued"] == 1
    assert [c["id"] for c in doc["due"]["backing_off"]["connections"]] == [backing]
    assert {c["id"] for c in doc["due"]["not_queued"]["connections"]} == {plain, expired}
    assert [c["id"] for c in doc["overdue"]["connections"]] == [expired]
    assert doc["failures"]["count"] == 1
    assert doc["failures"]["connections"][0]["last_error_class"] == "provider_unavailable"
    assert doc["workers"]["count"] == 0
    assert doc["beat"] == {
        "alive": False,
        "lock_held": False,
        "scan_interval_seconds": 1.0,
        "stale_after_seconds": 3.0,
    }
    assert doc["last_scan"]["at"] is None
    assert fine not in json.dumps(doc)  # a connection not due and not failing is only counted


def test_status_with_worker_and_beat(
    runtime: Runtime,
    devserver: DevOAuthServer,
    provider_name: str,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Worker and beat running, nothing failing: exit 0. Then one connection needs
    re-authorization: exit 3 with that problem alone."""
    ids = [import_grant(runtime, devserver, provider_name, f"h{n}")[0] for n in range(3)]
    worker = start_celery(
        "worker", env, tmp_path / "worker.log", "--without-mingle", "--without-gossip"
    )
    beat = start_celery("beat", env, tmp_path / "beat.log", "--schedule", str(tmp_path / "s"))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with runtime.engine.connect() as conn:
                scans = conn.execute(
                    select(func.count()).where(audit_events.c.event == "scan.completed")
                ).scalar_one()
            if scans:
                break
            time.sleep(0.5)
        assert scans, "no scan.completed within 60 s"

        result = run_status(env, tmp_path)
        print(result.stdout)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.rstrip().endswith("OK: nothing needs a person")
        code, doc = status_json(env, tmp_path)
        assert code == 0
        assert doc["healthy"] is True
        assert doc["problems"] == []
        assert doc["workers"]["count"] == 1
        assert doc["beat"]["alive"] is True
        assert doc["beat"]["lock_held"] is True
        assert doc["last_scan"]["age_seconds"] <= 3.0
        assert doc["connections"]["active"] == 3

        set_values(
            runtime,
            ids[0],
            status="reauth_required",
            failure_count=1,
            last_error_class="invalid_grant",
        )
        result = run_status(env, tmp_path)
        print(result.stdout)
        assert result.returncode == NEEDS_ATTENTION_EXIT
        assert "1 connection(s) need re-authorization" in result.stdout
        assert f"{ids[0]}  dev/h0" in result.stdout
        code, doc = status_json(env, tmp_path)
        assert code == NEEDS_ATTENTION_EXIT
        assert [p["code"] for p in doc["problems"]] == ["reauth_required"]
        assert doc["reauth_required"]["count"] == 1
        assert doc["reauth_required"]["connections"][0]["id"] == ids[0]
    finally:
        stop(beat)
        stop(worker)
