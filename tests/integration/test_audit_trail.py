"""The audit trail: append-only in the database itself, pruned only by retention, readable
and followable through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError

from config.settings import Settings
from grantkeeper import repository
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.models import audit_events
from grantkeeper.refresh import RefreshService
from grantkeeper.retention import prune_audit
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant
from tests.support.processes import settings_env

GRANTKEEPER = str(Path(sys.executable).parent / "grantkeeper")


def test_audit_rows_cannot_be_updated(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """An UPDATE of an audit row fails in the database (trigger), whoever runs it."""
    import_grant(runtime, devserver, provider_name, "acct")
    with pytest.raises(DBAPIError, match="append-only"), runtime.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET outcome = 'ok'"))


def test_retention_prunes_only_old_rows(runtime: Runtime) -> None:
    """Retention deletes rows older than the configured days, keeps the rest, and records
    that it ran."""
    now = datetime.now(UTC)
    with runtime.engine.begin() as conn:
        conn.execute(
            insert(audit_events),
            [
                {
                    "at": now - timedelta(days=500),
                    "event": "old",
                    "outcome": "ok",
                    "actor": "t",
                    "details": {},
                },
                {
                    "at": now - timedelta(days=10),
                    "event": "recent",
                    "outcome": "ok",
                    "actor": "t",
                    "details": {},
                },
            ],
        )
    assert prune_audit(runtime) == 1
    with runtime.engine.connect() as conn:
        events = sorted(r.event for r in conn.execute(select(audit_events.c.event)))
    assert events == ["audit.pruned", "recent"]


def test_cli_reads_filters_and_follows(
    runtime: Runtime,
    settings: Settings,
    devserver: DevOAuthServer,
    provider_name: str,
    tmp_path: Path,
) -> None:
    """`grantkeeper audit` filters by connection, event pattern and time; --follow prints an
    event written after it started."""
    env = settings_env(settings)
    first, _ = import_grant(runtime, devserver, provider_name, "a")
    import_grant(runtime, devserver, provider_name, "b")
    listed = subprocess.run(
        [GRANTKEEPER, "audit", "--json", "--connection", first, "--event", "connection.*"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["event"], r["connection_id"]) for r in rows] == [("connection.imported", first)]
    future = subprocess.run(
        [
            GRANTKEEPER,
            "audit",
            "--json",
            "--since",
            (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert future.stdout == ""

    follower = subprocess.Popen(
        [GRANTKEEPER, "audit", "--follow", "--json", "--event", "refresh.*", "--connection", first],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(2.5)
        RefreshService(runtime).refresh(first, reason="manual", force=True)
        assert follower.stdout is not None
        line = follower.stdout.readline()
        assert json.loads(line)["event"] == "refresh.succeeded"
    finally:
        follower.terminate()
        follower.wait(10)
        if follower.stdout is not None:
            follower.stdout.close()
    with runtime.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(audit_events)).scalar_one() >= 3


def test_limit_keeps_the_newest_events_unless_since_is_given(runtime: Runtime) -> None:
    """``grantkeeper audit --limit N`` answers "what happened lately": the last N events,
    oldest first. With ``--since`` it is the first N from that time."""
    for n in range(5):
        runtime.auditor.emit("test.step", "ok", step=n)
    with runtime.engine.connect() as conn:
        latest = repository.list_audit_events(conn, event="test.step", limit=2, newest=True)
        first = repository.list_audit_events(conn, event="test.step", limit=2)
    assert [r["details"]["step"] for r in latest] == [3, 4]
    assert [r["details"]["step"] for r in first] == [0, 1]
