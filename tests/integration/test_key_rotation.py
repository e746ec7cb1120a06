"""Encryption-key rotation (``grantkeeper keys status|rotate|retire``) on real PostgreSQL and
Redis: counts per key id, the staged rollout, rows under a key that is gone, re-encryption while
workers refresh against a provider with reuse detection, and a rotation killed halfway.

Keyrings: ``old`` is the key in use; ``new`` is added decrypt-only and then promoted; ``gone`` is
a key whose ciphertexts exist but which is no longer configured.
"""

from __future__ import annotations

import json
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import insert, text

from config.settings import Settings
from grantkeeper import repository, sealing
from grantkeeper.connections import ProviderSpec, add_provider
from grantkeeper.crypto import Keyring, generate_key_entry
from grantkeeper.db import upgrade
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.errors import FencedWrite
from grantkeeper.keys import key_status, reencrypt_all
from grantkeeper.models import ACTIVE, connections, pending_revocations
from grantkeeper.refresh import Outcome, RefreshResult, RefreshService
from grantkeeper.revoke import PENDING, TOKEN_COLUMN
from grantkeeper.runtime import Runtime
from tests.support.dev import CLIENT
from tests.support.processes import settings_env

GRANTKEEPER = Path(sys.executable).parent / "grantkeeper"


def _entry(kid: str) -> str:
    return f"{kid}:{generate_key_entry().split(':', 1)[1]}"


OLD, NEW, GONE = _entry("old"), _entry("new"), _entry("gone")
STAGED = f"{OLD},{NEW}"  # the new key is configured everywhere before it is promoted


@dataclass
class Rollout:
    """The same database seen with three keyrings."""

    settings: Settings
    old: Runtime  # old,new with old primary: new is decrypt-only
    new: Runtime  # old,new with new primary: promoted
    gone: Runtime  # only the key that later disappears
    provider_id: str

    @property
    def new_env(self) -> dict[str, str]:
        return settings_env(self.new.settings)


def _with_keys(settings: Settings, keys: str, primary: str) -> Settings:
    return settings.model_copy(
        update={"encryption_keys": SecretStr(keys), "primary_key_id": primary}
    )


@pytest.fixture
def rollout(runtime: Runtime, settings: Settings, devserver: DevOAuthServer) -> Iterator[Rollout]:
    """Clean tables (via ``runtime``), a provider whose secret is under ``old``."""
    del runtime
    old = Runtime(_with_keys(settings, STAGED, "old"), actor="test-old")
    new = Runtime(_with_keys(settings, STAGED, "new"), actor="test-new")
    gone = Runtime(_with_keys(settings, GONE, "gone"), actor="test-gone")
    provider_id = add_provider(
        old,
        ProviderSpec(
            name="dev",
            token_url=devserver.token_url,
            revocation_url=devserver.revocation_url,
            client_id=CLIENT.client_id,
            client_secret=CLIENT.client_secret,
            auth_method=CLIENT.auth_method,
        ),
    )
    try:
        yield Rollout(settings, old, new, gone, provider_id)
    finally:
        for rt in (old, new, gone):
            rt.close()


@dataclass(frozen=True)
class Sealed:
    id: str
    access: str
    refresh: str


def bulk_connections(
    rt: Runtime,
    provider_id: str,
    count: int,
    grants: Sequence[Mapping[str, Any]] | None = None,
) -> list[Sealed]:
    """Insert ``count`` active connections sealed with ``rt``'s primary key, fast (one
    executemany per thousand rows). Plaintexts come from ``grants`` or are random."""
    now = datetime.now(UTC)
    made: list[Sealed] = []
    rows: list[dict[str, Any]] = []
    for i in range(count):
        cid = str(uuid.uuid4())
        grant = grants[i] if grants is not None else None
        access = str(grant["access_token"]) if grant else secrets.token_urlsafe(24)
        refresh = str(grant["refresh_token"]) if grant else secrets.token_urlsafe(24)
        made.append(Sealed(cid, access, refresh))
        rows.append(
            {
                "id": cid,
                "provider_id": provider_id,
                "account": f"acct-{cid[:8]}",
                "status": ACTIVE,
                "version": 1,
                "access_token_ct": sealing.seal(
                    rt.keyring, sealing.CONNECTIONS, cid, sealing.ACCESS_TOKEN, access
                ),
                "refresh_token_ct": sealing.seal(
                    rt.keyring, sealing.CONNECTIONS, cid, sealing.REFRESH_TOKEN, refresh
                ),
                "access_expires_at": now + timedelta(hours=1),
                "access_issued_at": now,
                "refresh_issued_at": now,
                "created_at": now,
                "updated_at": now,
            }
        )
    with rt.engine.begin() as conn:
        for start in range(0, len(rows), 1000):
            conn.execute(insert(connections), rows[start : start + 1000])
    return made


def pending_revocation(rt: Runtime, connection_id: str, provider_id: str) -> str:
    pending_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    with rt.engine.begin() as conn:
        conn.execute(
            insert(pending_revocations).values(
                id=pending_id,
                connection_id=connection_id,
                provider_id=provider_id,
                token_ct=sealing.seal(
                    rt.keyring, PENDING, pending_id, TOKEN_COLUMN, secrets.token_urlsafe(24)
                ),
                token_type_hint="refresh_token",
                attempts=1,
                created_at=now,
                next_attempt_at=now + timedelta(hours=1),
            )
        )
    return pending_id


def snapshot(rt: Runtime) -> dict[str, dict[str, Any]]:
    """Every connection's ciphertexts, version and updated_at, by id."""
    with rt.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, version, access_token_ct, refresh_token_ct, updated_at FROM connections"
            )
        ).mappings()
        return {str(r["id"]): dict(r) for r in rows}


def all_ciphertexts(rt: Runtime) -> list[str]:
    with rt.engine.connect() as conn:
        return [
            str(ct)
            for (ct,) in conn.execute(
                text(
                    "SELECT access_token_ct FROM connections UNION ALL"
                    " SELECT refresh_token_ct FROM connections UNION ALL"
                    " SELECT client_secret_ct FROM providers UNION ALL"
                    " SELECT token_ct FROM pending_revocations"
                )
            )
            if ct is not None
        ]


def audit(rt: Runtime, event: str) -> list[dict[str, Any]]:
    with rt.engine.connect() as conn:
        return repository.list_audit_events(conn, event=event, limit=100_000)


def unseal(keyring: Keyring, cid: str, column: str, ciphertext: str) -> str:
    return sealing.unseal(keyring, sealing.CONNECTIONS, cid, column, ciphertext)


def cli(
    env: Mapping[str, str], cwd: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRANTKEEPER), *args],
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert lines, result.stderr
    return lines[-1]


# -- status ------------------------------------------------------------------------------------


def test_status_counts_per_key_id_and_kind_and_reports_unknown_keys(
    rollout: Rollout, tmp_path: Path
) -> None:
    """``keys status`` counts ciphertexts per key id and kind (access tokens, refresh tokens,
    client secrets, pending revocations), shows configured and primary keys (a configured key
    with no ciphertext included), and reports a key id used in the database that is not in the
    keyring. The CLI's JSON and the service agree."""
    olds = bulk_connections(rollout.old, rollout.provider_id, 3)
    bulk_connections(rollout.new, rollout.provider_id, 2)
    bulk_connections(rollout.gone, rollout.provider_id, 1)
    pending_revocation(rollout.old, olds[0].id, rollout.provider_id)

    status = key_status(rollout.new)
    assert status.primary_key_id == "new"
    assert status.configured == ("old", "new")
    assert status.unknown == ("gone",)
    assert [u.key_id for u in status.keys] == ["new", "old", "gone"]
    old, new, gone = (status.usage(k) for k in ("old", "new", "gone"))
    assert old.counts == {
        "access_token": 3,
        "refresh_token": 3,
        "client_secret": 1,
        "pending_revocation": 1,
    }
    assert new.counts == {"access_token": 2, "refresh_token": 2}
    assert gone.counts == {"access_token": 1, "refresh_token": 1}
    assert (old.state, new.state, gone.state) == ("configured", "primary", "unknown")
    assert status.to_reencrypt == 8 + 2

    # Seen before the promotion: old is the primary, new only decrypts.
    staged = key_status(rollout.old)
    assert (staged.usage("old").state, staged.usage("new").state) == ("primary", "configured")
    assert staged.to_reencrypt == 4 + 2

    shown = cli(rollout.new_env, tmp_path, "keys", "status", "--json")
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["primary"] == "new"
    assert body["unknown"] == ["gone"]
    assert body["to_reencrypt"] == 10
    by_id = {k["key_id"]: k for k in body["keys"]}
    assert by_id["old"]["counts"] == {
        "access_token": 3,
        "refresh_token": 3,
        "client_secret": 1,
        "pending_revocation": 1,
    }
    assert by_id["gone"]["state"] == "unknown"
    assert "gk1." not in shown.stdout

    table = cli(rollout.new_env, tmp_path, "keys", "status")
    assert table.returncode == 0, table.stderr
    print(f"\n$ grantkeeper keys status\n{table.stdout}{table.stderr}")
    assert "UNKNOWN" in table.stdout
    assert "gone" in table.stderr
    assert "not in GRANTKEEPER_ENCRYPTION_KEYS" in table.stderr
    assert "keys rotate" in table.stderr


# -- the staged rollout ------------------------------------------------------------------------


def test_rotate_after_promotion_then_retire(rollout: Rollout, tmp_path: Path) -> None:
    """The staged rollout: with ``new`` promoted, ``keys retire old`` is refused while ``old``
    is in use (with counts); the rotation moves every ciphertext (tokens, client secret, pending
    revocation) to ``new``, each connection decrypts to the same plaintexts with only ``new``
    configured, versions and updated_at are unchanged and cached entries are dropped. A second
    run does nothing. Then retiring ``old`` succeeds (audited) and retiring the primary is
    refused."""
    made = bulk_connections(rollout.old, rollout.provider_id, 50)
    pending_id = pending_revocation(rollout.old, made[0].id, rollout.provider_id)
    cached = made[:5]
    for s in cached:
        ct = snapshot(rollout.new)[s.id]["access_token_ct"]
        rollout.new.cache.put(s.id, 1, datetime.now(UTC) + timedelta(hours=1), ct, 600)
    before = snapshot(rollout.new)

    refused = cli(rollout.new_env, tmp_path, "keys", "retire", "old")
    assert refused.returncode == 1, refused.stderr
    assert "retire_refused" in error_line(refused)
    assert "still protects 102 ciphertext(s)" in error_line(refused)
    assert "50 connection access tokens" in error_line(refused)
    assert "1 provider client secrets" in error_line(refused)

    seen: list[tuple[int, int]] = []
    report = reencrypt_all(
        rollout.new, batch_size=7, progress=lambda p: seen.append((p.done, p.total))
    )
    assert report.ok
    assert report.reencrypted == 102
    assert report.by_kind == {
        "access_token": 50,
        "refresh_token": 50,
        "client_secret": 1,
        "pending_revocation": 1,
    }
    assert (report.superseded, report.failed, report.remaining) == (0, 0, 0)
    assert report.batches == 8 + 1 + 1
    assert seen[-1] == (102, 102)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    after = snapshot(rollout.new)
    only_new = Keyring.parse(NEW)
    for s in made:
        row = after[s.id]
        assert row["version"] == before[s.id]["version"] == 1
        assert row["updated_at"] == before[s.id]["updated_at"]
        assert row["access_token_ct"].startswith("gk1.new.")
        assert row["refresh_token_ct"].startswith("gk1.new.")
        assert unseal(only_new, s.id, sealing.ACCESS_TOKEN, row["access_token_ct"]) == s.access
        assert unseal(only_new, s.id, sealing.REFRESH_TOKEN, row["refresh_token_ct"]) == s.refresh
    assert all(ct.startswith("gk1.new.") for ct in all_ciphertexts(rollout.new))
    assert all(rollout.new.cache.get(s.id) is None for s in cached)
    with rollout.new.engine.connect() as conn:
        pending_ct = conn.execute(
            text("SELECT token_ct FROM pending_revocations WHERE id = :id"), {"id": pending_id}
        ).scalar_one()
    sealing.unseal(only_new, PENDING, pending_id, TOKEN_COLUMN, pending_ct)

    again = reencrypt_all(rollout.new)
    assert (again.reencrypted, again.rows, again.batches, again.total) == (0, 0, 0, 0)
    assert snapshot(rollout.new) == after

    status = key_status(rollout.new)
    assert status.usage("old").total == 0
    assert status.usage("new").total == 102
    assert status.to_reencrypt == 0

    primary = cli(rollout.new_env, tmp_path, "keys", "retire", "new")
    assert primary.returncode == 1
    assert "is the primary key" in error_line(primary)

    retired = cli(rollout.new_env, tmp_path, "keys", "retire", "old")
    assert retired.returncode == 0, retired.stderr
    print(f"\n$ grantkeeper keys retire old\n{retired.stderr}")
    assert "safe to remove it from GRANTKEEPER_ENCRYPTION_KEYS" in retired.stderr
    assert "cannot do that for you" in retired.stderr
    events = audit(rollout.new, "key.retired")
    assert [(e["key_id"], e["outcome"]) for e in events] == [("old", "ok")]
    started = audit(rollout.new, "key.rotation_started")
    completed = audit(rollout.new, "key.rotation_completed")
    assert [e["details"]["to_reencrypt"] for e in started] == [102, 0]
    assert completed[0]["details"]["reencrypted"] == 102
    assert completed[0]["details"]["failures"] == 0
    assert completed[0]["details"]["rows_per_second"] > 0


# -- rows that cannot be re-encrypted ----------------------------------------------------------


def test_rows_under_an_unconfigured_key_are_reported_and_left_untouched(
    rollout: Rollout, tmp_path: Path
) -> None:
    """A connection whose access token is under ``gone`` (not configured) and one whose access
    token was copied from another row (fails authentication) are reported per row (connection,
    column, key id, reason), audited as ``key.reencrypt_failed`` without the ciphertext, and left
    byte-identical; everything else, including the good column of those rows, is rotated. The
    CLI exits 1 after finishing the rest, with the report on stdout."""
    made = bulk_connections(rollout.old, rollout.provider_id, 20)
    lost = made[3]
    copied = made[4]
    gone_ct = sealing.seal(
        rollout.gone.keyring, sealing.CONNECTIONS, lost.id, sealing.ACCESS_TOKEN, "x" * 20
    )
    with rollout.old.engine.begin() as conn:
        conn.execute(
            text("UPDATE connections SET access_token_ct = :ct WHERE id = :id"),
            {"ct": gone_ct, "id": lost.id},
        )
        conn.execute(
            text(
                "UPDATE connections SET access_token_ct ="
                " (SELECT access_token_ct FROM connections WHERE id = :src) WHERE id = :id"
            ),
            {"src": made[5].id, "id": copied.id},
        )
    before = snapshot(rollout.old)

    result = cli(rollout.new_env, tmp_path, "keys", "rotate", "--json")
    print(f"\n$ grantkeeper keys rotate --json\n{result.stderr}")
    assert result.returncode == 1, result.stderr
    assert "rotation_incomplete" in error_line(result)
    assert lost.id in result.stderr
    assert copied.id in result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] == 2
    assert report["reencrypted"] == 20 * 2 - 2 + 1
    failures = {f["connection_id"]: f for f in report["failures"]}
    assert failures[lost.id] == {
        "kind": "access_token",
        "table": "connections",
        "row_id": lost.id,
        "column": "access_token_ct",
        "key_id": "gone",
        "reason": "unknown_key",
        "connection_id": lost.id,
        "provider": None,
    }
    assert failures[copied.id]["key_id"] == "old"
    assert failures[copied.id]["reason"] == "tampered"
    assert "gk1." not in result.stdout

    after = snapshot(rollout.new)
    assert after[lost.id]["access_token_ct"] == before[lost.id]["access_token_ct"] == gone_ct
    assert after[copied.id]["access_token_ct"] == before[copied.id]["access_token_ct"]
    for s in (lost, copied):
        assert after[s.id]["refresh_token_ct"].startswith("gk1.new.")
        assert after[s.id]["version"] == 1
    leftover = [ct for ct in all_ciphertexts(rollout.new) if not ct.startswith("gk1.new.")]
    assert sorted(leftover) == sorted([gone_ct, before[copied.id]["access_token_ct"]])

    events = audit(rollout.new, "key.reencrypt_failed")
    assert sorted((e["connection_id"], e["key_id"], e["details"]["column"]) for e in events) == (
        sorted([(lost.id, "gone", "access_token_ct"), (copied.id, "old", "access_token_ct")])
    )
    assert not any("gk1." in json.dumps(e["details"]) for e in events)
    (completed,) = audit(rollout.new, "key.rotation_completed")
    assert completed["outcome"] == "partial"
    assert completed["details"]["failures"] == 2

    # Still refused: the copied row still names "old"; and a rerun reports the same rows again.
    assert cli(rollout.new_env, tmp_path, "keys", "retire", "old").returncode == 1
    rerun = reencrypt_all(rollout.new)
    assert (rerun.reencrypted, rerun.failed) == (0, 2)
    assert snapshot(rollout.new) == after


# -- concurrency -------------------------------------------------------------------------------


def test_reencryption_during_an_in_flight_refresh_keeps_the_rotated_token(
    rollout: Rollout, devserver: DevOAuthServer
) -> None:
    """The interleaving the design is about, forced: a refresh has read the row and is waiting
    for the provider (1 s of latency) when the rotation re-encrypts that row. The rotation must
    not bump the version, so the refresh's fenced write still lands: the rotated refresh token
    is stored (under the new key), live at the provider, and nothing was reused."""
    grant = devserver.mint_grant(CLIENT.client_id, access_ttl=3600)
    (conn_row,) = bulk_connections(rollout.old, rollout.provider_id, 1, [grant])
    devserver.reset_stats()
    devserver.set_latency(1.0)
    results: list[RefreshResult] = []
    worker = threading.Thread(
        target=lambda: results.append(
            RefreshService(rollout.new).refresh(conn_row.id, reason="manual", force=True)
        )
    )
    worker.start()
    deadline = time.monotonic() + 10
    while devserver.stats()["token_requests"] < 1:
        assert time.monotonic() < deadline, "the refresh never reached the provider"
        time.sleep(0.01)

    report = reencrypt_all(rollout.new)
    # The rotation got there first: both columns swapped while the refresh was in flight.
    assert report.by_kind["access_token"] == report.by_kind["refresh_token"] == 1
    assert snapshot(rollout.new)[conn_row.id]["version"] == 1
    worker.join(timeout=30)
    devserver.set_latency(0.0)

    (result,) = results
    assert result.outcome is Outcome.REFRESHED, result.error
    row = snapshot(rollout.new)[conn_row.id]
    assert row["version"] == 2
    refresh = unseal(
        rollout.new.keyring, conn_row.id, sealing.REFRESH_TOKEN, row["refresh_token_ct"]
    )
    assert refresh != grant["refresh_token"]
    assert devserver.is_active(refresh)
    assert row["refresh_token_ct"].startswith("gk1.new.")
    assert devserver.stats()["reuse_detections"] == 0


CONNECTIONS = 3000
REFRESH_THREADS = 12


def test_rotation_of_3000_connections_while_workers_refresh(
    rollout: Rollout, devserver: DevOAuthServer
) -> None:
    """3,000 connections under ``old``; while ``keys rotate`` runs, 12 threads force-refresh a
    random subset through the real RefreshService against the dev server (rotating refresh
    tokens, reuse detection). Afterwards every connection decrypts under ``new`` alone, every
    stored refresh token is the live one at the provider (none lost), there was no reuse
    detection, no failed or fenced refresh, and each refreshed connection was refreshed exactly
    once at the provider for its one request."""
    grants = [devserver.mint_grant(CLIENT.client_id, access_ttl=3600) for _ in range(CONNECTIONS)]
    made = bulk_connections(rollout.old, rollout.provider_id, CONNECTIONS, grants)
    grant_of = {s.id: devserver.grant_id_of(s.refresh) for s in made}
    devserver.reset_stats()
    devserver.set_latency(0.01)

    rt = rollout.new
    for name in ("keyring", "engine", "redis", "cache", "oauth", "auditor", "crash_window"):
        getattr(rt, name)  # build shared resources before the threads race to build them
    queue = [s.id for s in made]
    random.Random(7).shuffle(queue)
    queue_lock = threading.Lock()
    stop = threading.Event()
    outcomes: dict[str, RefreshResult] = {}
    finished_at: list[float] = []

    def refresher() -> None:
        service = RefreshService(rt)
        while not stop.is_set():
            with queue_lock:
                if not queue:
                    return
                cid = queue.pop()
            result = service.refresh(cid, reason="manual", force=True)
            with queue_lock:
                outcomes[cid] = result
                finished_at.append(time.monotonic())

    threads = [threading.Thread(target=refresher) for _ in range(REFRESH_THREADS)]
    for t in threads:
        t.start()
    while len(finished_at) < REFRESH_THREADS:  # refreshes are flowing before the rotation starts
        time.sleep(0.005)
    rotation_started = time.monotonic()
    report = reencrypt_all(rt, batch_size=250)
    rotation_ended = time.monotonic()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    devserver.set_latency(0.0)

    during = sum(1 for t in finished_at if rotation_started <= t <= rotation_ended)
    print(
        f"\nrotation under load: {report.rows} rows, {report.reencrypted} ciphertexts in"
        f" {report.elapsed_seconds:.2f} s = {report.rows_per_second:.0f} rows/s"
        f" ({report.ciphertexts_per_second:.0f} ciphertexts/s); {report.superseded} swaps"
        f" superseded by refreshes; {len(outcomes)} refreshes, {during} finished during the"
        f" rotation; provider {devserver.stats()}"
    )
    assert during > 0
    assert report.ok
    assert report.remaining == 0
    assert report.reencrypted + report.superseded <= CONNECTIONS * 2 + 1

    assert {r.outcome for r in outcomes.values()} == {Outcome.REFRESHED}
    assert not [r for r in outcomes.values() if isinstance(r.error, FencedWrite)]
    assert audit(rt, "refresh.failed") == []
    stats = devserver.stats()
    assert stats["reuse_detections"] == 0
    assert stats["refresh_failed"] == 0
    assert stats["refresh_ok"] == len(outcomes)
    for s in made:
        grant_id = grant_of[s.id]
        assert grant_id is not None
        assert devserver.refresh_count(grant_id) == (1 if s.id in outcomes else 0)

    only_new = Keyring.parse(NEW)
    rows = snapshot(rt)
    assert len(rows) == CONNECTIONS
    for s in made:
        row = rows[s.id]
        assert row["version"] == (2 if s.id in outcomes else 1)
        access = unseal(only_new, s.id, sealing.ACCESS_TOKEN, row["access_token_ct"])
        refresh = unseal(only_new, s.id, sealing.REFRESH_TOKEN, row["refresh_token_ct"])
        assert devserver.is_active(refresh), f"refresh token of {s.id} lost"
        assert devserver.is_active(access)
        if s.id not in outcomes:
            assert (access, refresh) == (s.access, s.refresh)
    assert key_status(rt).usage("old").total == 0


def test_throughput_of_3000_rows(rollout: Rollout) -> None:
    """Measures re-encryption alone (no concurrent load) for 3,000 connections: prints rows/s
    and requires at least 1,000 rows/s (6,000 ciphertexts/s) on PostgreSQL."""
    bulk_connections(rollout.old, rollout.provider_id, CONNECTIONS)
    report = reencrypt_all(rollout.new)
    print(
        f"\nthroughput: {report.rows} rows ({report.reencrypted} ciphertexts) in"
        f" {report.elapsed_seconds:.3f} s = {report.rows_per_second:.0f} rows/s,"
        f" {report.ciphertexts_per_second:.0f} ciphertexts/s, batch {report.batch_size}"
    )
    assert report.reencrypted == CONNECTIONS * 2 + 1
    assert report.rows_per_second > 1000


# -- killed halfway ----------------------------------------------------------------------------


def _moved(rt: Runtime) -> int:
    with rt.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM connections WHERE access_token_ct LIKE 'gk1.new.%'")
            ).scalar_one()
        )


def test_rotation_killed_halfway_resumes_without_rewriting(
    rollout: Rollout, tmp_path: Path
) -> None:
    """``keys rotate`` (a real subprocess, paced with ``--pause``) is SIGKILLed after some
    batches committed. A second run finishes the rest, exits 0, and the rows the first run had
    done are byte-identical: they were not rewritten. A third run has nothing to do."""
    bulk_connections(rollout.old, rollout.provider_id, CONNECTIONS)
    env = rollout.new_env
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [str(GRANTKEEPER), "keys", "rotate", "--batch-size", "100", "--pause", "0.25"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while _moved(rollout.new) < 300:
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert first.returncode == -signal.SIGKILL

    halfway = snapshot(rollout.new)
    done = {
        cid: row for cid, row in halfway.items() if row["access_token_ct"].startswith("gk1.new.")
    }
    assert 300 <= len(done) < CONNECTIONS
    # A batch commits both columns together: no row is half done.
    assert all(row["refresh_token_ct"].startswith("gk1.new.") for row in done.values())
    left = sum(1 for ct in all_ciphertexts(rollout.new) if not ct.startswith("gk1.new."))

    second = cli(env, tmp_path, "keys", "rotate", "--json")
    print(f"\n$ grantkeeper keys rotate  (after a SIGKILL at {len(done)} rows)\n{second.stderr}")
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["reencrypted"] == left
    assert report["rows"] == CONNECTIONS - len(done) + 1  # and the provider's secret
    after = snapshot(rollout.new)
    for cid, row in done.items():
        assert after[cid] == row, f"{cid} was rewritten"
    assert all(ct.startswith("gk1.new.") for ct in all_ciphertexts(rollout.new))

    third = cli(env, tmp_path, "keys", "rotate", "--json")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["reencrypted"] == 0
    assert snapshot(rollout.new) == after


# -- SQLite ------------------------------------------------------------------------------------


def test_status_and_rotate_on_sqlite(sqlite_settings: Settings) -> None:
    """The embedded database counts key ids with substr/instr instead of split_part, and
    rotates the same way; a row under an unknown key is counted and left alone."""
    old = Runtime(_with_keys(sqlite_settings, STAGED, "old"), actor="test-old")
    new = Runtime(_with_keys(sqlite_settings, STAGED, "new"), actor="test-new")
    gone = Runtime(_with_keys(sqlite_settings, GONE, "gone"), actor="test-gone")
    try:
        upgrade(old.engine)
        provider_id = add_provider(
            old,
            ProviderSpec(
                name="dev",
                token_url="https://dev.example/token",
                client_id="c",
                client_secret="client-secret-value",
            ),
        )
        made = bulk_connections(old, provider_id, 5)
        bulk_connections(gone, provider_id, 1)
        status = key_status(new)
        assert status.usage("old").counts == {
            "access_token": 5,
            "refresh_token": 5,
            "client_secret": 1,
        }
        assert status.unknown == ("gone",)
        report = reencrypt_all(new, batch_size=2)
        assert (report.reencrypted, report.failed) == (11, 2)
        after = key_status(new)
        assert after.usage("old").total == 0
        assert after.usage("gone").total == 2
        row = snapshot(new)[made[0].id]
        assert unseal(new.keyring, made[0].id, sealing.ACCESS_TOKEN, row["access_token_ct"]) == (
            made[0].access
        )
    finally:
        for rt in (old, new, gone):
            rt.cache.delete_all()
            rt.close()
