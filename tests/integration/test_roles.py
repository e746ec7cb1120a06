"""Least privilege on real PostgreSQL: the three roles of ``grantkeeper db roles``.

One database per test session, created here and owned by the migration role. The roles are
cluster-wide, so their names carry a random suffix; the database and the roles are dropped at
the end (database first: the migration role owns it and the others hold privileges in it).

- the migration role runs ``grantkeeper.db.upgrade`` and owns every object;
- the worker role refreshes (``RefreshService`` against the dev OAuth server), and runs as a
  real ``celery worker`` subprocess;
- the app role reads tokens through ``get_access_token`` with ``api_refresh=worker``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.exc import DBAPIError

from config.settings import Settings
from grantkeeper import repository
from grantkeeper.api import TokenReader, get_access_token
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.db import MIGRATIONS_DIR, create_db_engine, current_revision, upgrade
from grantkeeper.devserver import DevOAuthServer, ScriptedResponse
from grantkeeper.errors import WorkerRefreshError, WorkerRefreshFailed, WorkerRefreshTimeout
from grantkeeper.models import audit_events
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.roles import RoleNames, roles_sql
from grantkeeper.runtime import Runtime, set_runtime
from grantkeeper.worker_refresh import WorkerRefresh
from tasks.refresh import refresh_connection
from tests.conftest import PG_ADMIN_DSN, PG_HOST, REDIS_TEST_URL, make_settings
from tests.support.dev import CLIENT, import_grant
from tests.support.processes import settings_env, start_celery, stop

GRANTKEEPER = Path(sys.executable).parent / "grantkeeper"
TABLES = ("providers", "connections", "pending_revocations", "audit_events", "alembic_version")
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
DML = {"SELECT", "INSERT", "UPDATE", "DELETE"}
EXPECTED_WORKER = {
    "providers": DML,
    "connections": DML,
    "pending_revocations": DML,
    "audit_events": {"SELECT", "INSERT"},
    "alembic_version": {"SELECT"},
}
EXPECTED_APP: dict[str, set[str]] = {
    "providers": {"SELECT"},
    "connections": {"SELECT"},
    "pending_revocations": set(),
    "audit_events": {"INSERT"},
    "alembic_version": set(),
}
# A due token: imported as expiring in 20 s (18 s after skew), below min_token_validity (30 s);
# the dev server's grant issues one-hour tokens, so the refreshed token is servable.
DUE_TTL = 20


@dataclass(frozen=True)
class RolesDatabase:
    name: str
    roles: RoleNames
    first_run_notices: tuple[str, ...]

    def url(self, role: str) -> str:
        return f"postgresql+psycopg://{role}@{PG_HOST}/{self.name}"

    def admin_dsn(self) -> str:
        return PG_ADMIN_DSN.replace("dbname=postgres", f"dbname={self.name}")


def _run_script(dsn: str, script: str) -> list[str]:
    """The script through psycopg, in one transaction; returns the server's notices."""
    notices: list[str] = []
    with psycopg.connect(dsn) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute(script)
    return notices


def _existing_roles(admin: psycopg.Connection[Any], names: list[str]) -> list[str]:
    rows = admin.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [names])
    return [r[0] for r in rows]


@pytest.fixture(scope="session")
def roles_db() -> Iterator[RolesDatabase]:
    """Roles with a random suffix, and a fresh database owned by the migration role, migrated
    by it, with the `db roles` script run before and after the migration."""
    suffix = uuid.uuid4().hex[:8]
    roles = RoleNames(
        migrator=f"gkt_mig_{suffix}", worker=f"gkt_wrk_{suffix}", app=f"gkt_app_{suffix}"
    )
    name = f"gk_roles_{suffix}"
    role_list = [roles.migrator, roles.worker, roles.app]
    script = roles_sql(roles)
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        db = RolesDatabase(name, roles, ())
        notices = _run_script(db.admin_dsn(), script)  # before the migration: creates the roles
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" OWNER TO "{roles.migrator}"')
        engine = create_db_engine(make_settings(database_url=db.url(roles.migrator)))
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        _run_script(db.admin_dsn(), script)  # after it: the grants
        yield RolesDatabase(name, roles, tuple(notices))
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            existing = _existing_roles(admin, role_list)
            if existing:
                quoted = ", ".join(f'"{r}"' for r in existing)
                admin.execute(f"DROP OWNED BY {quoted}")  # anything left in this database
                admin.execute(f"DROP ROLE {quoted}")
            assert _existing_roles(admin, role_list) == []


def _settings(
    db: RolesDatabase, role: str, keyring_spec: str, prefix: str, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "database_url": db.url(role),
        "redis_url": REDIS_TEST_URL,
        "redis_key_prefix": prefix,
        "encryption_keys": keyring_spec,
        "refresh_margin_seconds": 60,
        "clock_skew_seconds": 2,
        "http_connect_timeout_seconds": 2,
        "http_read_timeout_seconds": 5,
        "lock_ttl_seconds": 20,
        "lock_wait_seconds": 15,
        "worker_concurrency": 2,
        **extra,
    }
    return make_settings(**values)


@pytest.fixture
def prefix() -> str:
    return f"gkr{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def queue() -> str:
    return f"gk-roles-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def worker_rt(
    roles_db: RolesDatabase, keyring_spec: str, prefix: str, queue: str
) -> Iterator[Runtime]:
    rt = Runtime(
        _settings(roles_db, roles_db.roles.worker, keyring_spec, prefix, celery_queue=queue),
        actor="test-worker-role",
    )
    try:
        yield rt
    finally:
        rt.cache.delete_all()
        rt.close()


@pytest.fixture
def app_rt(
    roles_db: RolesDatabase, keyring_spec: str, prefix: str, queue: str
) -> Iterator[Runtime]:
    rt = Runtime(
        _settings(
            roles_db,
            roles_db.roles.app,
            keyring_spec,
            prefix,
            celery_queue=queue,
            api_refresh="worker",
        ),
        actor="test-app-role",
    )
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def provider(worker_rt: Runtime, devserver: DevOAuthServer) -> Iterator[str]:
    name = f"dev-{uuid.uuid4().hex[:6]}"
    add_provider(
        worker_rt,
        ProviderSpec(
            name=name,
            token_url=devserver.token_url,
            revocation_url=devserver.revocation_url,
            client_id=CLIENT.client_id,
            client_secret=CLIENT.client_secret,
            auth_method=CLIENT.auth_method,
        ),
    )
    return name


def _admin_engine(db: RolesDatabase) -> Engine:
    return create_db_engine(
        make_settings(database_url=f"postgresql+psycopg://postgres@{PG_HOST}/{db.name}")
    )


def _assert_denied(engine: Engine, statement: str) -> None:
    with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
        conn.execute(text(statement))
    assert isinstance(caught.value.orig, psycopg.errors.InsufficientPrivilege), statement


def _import_due(
    rt: Runtime, devserver: DevOAuthServer, provider: str, account: str
) -> tuple[str, dict[str, Any]]:
    grant: dict[str, Any] = dict(devserver.mint_grant(CLIENT.client_id, access_ttl=3600))
    grant["expires_in"] = DUE_TTL
    return import_connection(rt, provider, account, json.dumps(grant).encode()), grant


def _head_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


def _record(rt: Runtime, connection_id: str) -> repository.ConnectionRecord:
    with rt.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    return record


def _drop_queue(rt: Runtime, queue: str) -> None:
    rt.redis.delete(queue, f"_kombu.binding.{queue}")


# -- the script --------------------------------------------------------------------------------


def test_before_the_migration_the_script_only_creates_roles(roles_db: RolesDatabase) -> None:
    """Run on an empty database, the script creates the roles and says to come back after
    `grantkeeper db upgrade` instead of granting on tables that do not exist."""
    assert any("run grantkeeper db upgrade" in n for n in roles_db.first_run_notices)


def test_cli_output_runs_cleanly_in_psql_and_is_idempotent(roles_db: RolesDatabase) -> None:
    """`grantkeeper db roles` prints SQL that psql runs without an error or warning, twice
    over on the migrated database, leaving the same privileges."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRANTKEEPER_")}
    names = roles_db.roles
    generated = subprocess.run(
        [
            str(GRANTKEEPER),
            "db",
            "roles",
            "--migrator",
            names.migrator,
            "--worker",
            names.worker,
            "--app",
            names.app,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == roles_sql(names)
    assert re.search(r"PASSWORD\s+'", generated.stdout, re.IGNORECASE) is None  # none set
    host, port = PG_HOST.split(":")
    connect = [psql, "-X", "-h", host, "-p", port, "-U", "postgres", "-d", roles_db.name]
    for _ in range(2):
        ran = subprocess.run(
            [*connect, "-v", "ON_ERROR_STOP=1", "--single-transaction", "-q", "-f", "-"],
            input=generated.stdout,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert ran.returncode == 0, ran.stderr
        assert "ERROR" not in ran.stderr
        assert "WARNING" not in ran.stderr
    _assert_privilege_matrix(roles_db)


def test_unsafe_role_names_are_refused() -> None:
    """Only plain lower-case identifiers are accepted, never reserved ones, and the three
    roles must differ: nothing reaches the SQL unvalidated."""
    for bad in ('x"; DROP ROLE postgres; --', "Upper", "1abc", "pg_monitor", "postgres", "a" * 64):
        with pytest.raises(ValueError, match="worker role"):
            RoleNames(worker=bad)
    with pytest.raises(ValueError, match="schema"):
        RoleNames(schema="pg_catalog")
    with pytest.raises(ValueError, match="different"):
        RoleNames(worker="same", app="same")


# -- who owns and may do what ------------------------------------------------------------------


def _assert_privilege_matrix(db: RolesDatabase) -> None:
    engine = _admin_engine(db)
    try:
        with engine.connect() as conn:
            for role, expected in (
                (db.roles.worker, EXPECTED_WORKER),
                (db.roles.app, EXPECTED_APP),
            ):
                for table in TABLES:
                    held = {
                        p
                        for p in TABLE_PRIVILEGES
                        if conn.execute(
                            text("SELECT has_table_privilege(:r, :t, :p)"),
                            {"r": role, "t": f"public.{table}", "p": p},
                        ).scalar_one()
                    }
                    assert held == expected[table], (role, table)
            sequence = conn.execute(
                text("SELECT pg_get_serial_sequence('public.audit_events', 'id')")
            ).scalar_one()
            for role in (db.roles.worker, db.roles.app):
                usage = conn.execute(
                    text("SELECT has_sequence_privilege(:r, :s, 'USAGE')"),
                    {"r": role, "s": sequence},
                ).scalar_one()
                assert usage is True, role
            can_prune = {
                role: conn.execute(
                    text(
                        "SELECT has_function_privilege(:r,"
                        " 'public.grantkeeper_prune_audit(timestamptz)', 'EXECUTE')"
                    ),
                    {"r": role},
                ).scalar_one()
                for role in (db.roles.worker, db.roles.app)
            }
            assert can_prune == {db.roles.worker: True, db.roles.app: False}
    finally:
        engine.dispose()


def test_privileges_are_exactly_the_documented_ones(roles_db: RolesDatabase) -> None:
    """Per table and privilege: the worker has DML on the working tables, SELECT+INSERT on
    audit_events and SELECT on alembic_version; the app SELECT on providers and connections
    and INSERT on audit_events; both USAGE on the audit id sequence; only the worker may
    run the retention function."""
    _assert_privilege_matrix(roles_db)


def test_migration_role_owns_everything_and_the_runtime_roles_nothing(
    roles_db: RolesDatabase,
) -> None:
    """After the migration every table, sequence and function is the migration role's; the
    worker and app roles own nothing, cannot create in the schema or the database (not even
    temporary tables), and have no dangerous attributes."""
    names = roles_db.roles
    engine = _admin_engine(roles_db)
    try:
        with engine.connect() as conn:
            assert current_revision(engine) == _head_revision()
            owners = conn.execute(
                text(
                    "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S', 'i', 'v')"
                )
            ).all()
            assert {owner for _, owner in owners} == {names.migrator}
            assert {name for name, _ in owners} >= set(TABLES)
            functions = conn.execute(
                text(
                    "SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p"
                    " WHERE p.proname LIKE 'grantkeeper%'"
                )
            ).all()
            assert dict(functions) == {
                "grantkeeper_audit_append_only": names.migrator,
                "grantkeeper_prune_audit": names.migrator,
            }
            for role in (names.worker, names.app):
                row = conn.execute(
                    text(
                        "SELECT has_schema_privilege(:r, 'public', 'CREATE'),"
                        " has_database_privilege(:r, current_database(), 'CREATE'),"
                        " has_database_privilege(:r, current_database(), 'TEMPORARY'),"
                        " has_database_privilege(:r, current_database(), 'CONNECT'),"
                        " (SELECT count(*) FROM pg_class WHERE relowner = CAST(:r AS regrole)),"
                        " (SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls"
                        "  FROM pg_roles WHERE rolname = :r)"
                    ),
                    {"r": role},
                ).one()
                assert tuple(row) == (False, False, False, True, 0, False), role
            assert conn.execute(
                text("SELECT has_schema_privilege(:r, 'public', 'CREATE')"), {"r": names.migrator}
            ).scalar_one()
    finally:
        engine.dispose()


def test_worker_role_cannot_rewrite_audit_rows_or_change_the_schema(
    roles_db: RolesDatabase, worker_rt: Runtime
) -> None:
    """The worker role may not UPDATE, DELETE or TRUNCATE audit rows, write alembic_version,
    nor CREATE, ALTER or DROP anything; retention through the definer function keeps 30 days."""
    worker_rt.auditor.emit("test.worker_can_append", "ok")
    for statement in (
        "UPDATE audit_events SET outcome = 'rewritten'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "UPDATE alembic_version SET version_num = '0001'",
        "CREATE TABLE worker_made (id int)",
        "CREATE TEMPORARY TABLE worker_tmp (id int)",
        "CREATE SCHEMA worker_schema",
        "ALTER TABLE connections ADD COLUMN worker_column int",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
        "DROP TABLE providers",
        "DROP FUNCTION grantkeeper_prune_audit(timestamptz)",
    ):
        _assert_denied(worker_rt.engine, statement)
    with worker_rt.engine.connect() as conn:
        events = conn.execute(select(audit_events.c.event)).scalars().all()
    assert "test.worker_can_append" in events


def test_retention_runs_as_the_worker_through_the_definer_function(
    roles_db: RolesDatabase, worker_rt: Runtime
) -> None:
    """The worker deletes old audit rows only through grantkeeper_prune_audit, which refuses
    to delete anything younger than 30 days."""
    now = datetime.now(UTC)
    with worker_rt.engine.begin() as conn:
        conn.execute(
            insert(audit_events).inline(),
            [
                {
                    "at": now - timedelta(days=90),
                    "event": "t.old",
                    "outcome": "ok",
                    "actor": "t",
                    "details": {},
                },
                {
                    "at": now - timedelta(days=5),
                    "event": "t.recent",
                    "outcome": "ok",
                    "actor": "t",
                    "details": {},
                },
            ],
        )
    with worker_rt.engine.begin() as conn:
        assert repository.prune_audit_events(conn, now - timedelta(days=31)) == 1
    with pytest.raises(DBAPIError) as caught, worker_rt.engine.begin() as conn:
        repository.prune_audit_events(conn, now - timedelta(days=1))
    assert isinstance(caught.value.orig, psycopg.errors.InvalidParameterValue)
    with worker_rt.engine.connect() as conn:
        events = set(conn.execute(select(audit_events.c.event)).scalars())
    assert "t.recent" in events
    assert "t.old" not in events


def test_app_role_reads_tokens_and_appends_audit_rows_only(
    roles_db: RolesDatabase,
    worker_rt: Runtime,
    app_rt: Runtime,
    devserver: DevOAuthServer,
    provider: str,
) -> None:
    """The app role reads connections and providers and appends audit rows; it cannot
    UPDATE or DELETE audit rows (nor read them), write connections or providers, read
    pending revocations, prune, or create tables."""
    connection_id, _ = import_grant(worker_rt, devserver, provider, "app-reads")
    assert _record(app_rt, connection_id).id == connection_id
    with app_rt.engine.connect() as conn:
        assert repository.get_provider_by_name(conn, provider) is not None
    app_rt.auditor.emit("test.app_can_append", "ok", connection_id=connection_id)
    for statement in (
        "UPDATE audit_events SET outcome = 'rewritten'",
        "DELETE FROM audit_events",
        "SELECT count(*) FROM audit_events",
        "UPDATE connections SET status = 'revoked'",
        "DELETE FROM connections",
        "UPDATE providers SET client_id = 'x'",
        "INSERT INTO pending_revocations (id) VALUES ('x')",
        "SELECT count(*) FROM pending_revocations",
        "SELECT grantkeeper_prune_audit(now() - interval '400 days')",
        "CREATE TABLE app_made (id int)",
        "CREATE TEMPORARY TABLE app_tmp (id int)",
    ):
        _assert_denied(app_rt.engine, statement)
    with worker_rt.engine.connect() as conn:
        appended = (
            conn.execute(
                select(audit_events.c.actor).where(audit_events.c.event == "test.app_can_append")
            )
            .scalars()
            .all()
        )
    assert appended == ["test-app-role"]


# -- the refresh path under the roles ----------------------------------------------------------


def test_worker_role_refreshes_a_due_connection(
    worker_rt: Runtime, devserver: DevOAuthServer, provider: str
) -> None:
    """RefreshService, as the worker role, refreshes a due connection through the lock and
    the fenced write, and audits it."""
    connection_id, grant = _import_due(worker_rt, devserver, provider, "worker-refresh")
    before = _record(worker_rt, connection_id)
    soon = datetime.now(UTC) + timedelta(seconds=15)  # inside the (lifetime-capped) margin
    result = RefreshService(worker_rt, clock=lambda: soon).refresh(
        connection_id, reason="scheduled"
    )
    assert result.outcome is Outcome.REFRESHED
    after = _record(worker_rt, connection_id)
    assert after.version == before.version + 1
    assert after.refresh_count == before.refresh_count + 1
    token = TokenReader(worker_rt).get(connection_id, audit=False)
    assert token != grant["access_token"]
    assert devserver.is_active(token)
    with worker_rt.engine.connect() as conn:
        events = (
            conn.execute(
                select(audit_events.c.event).where(audit_events.c.connection_id == connection_id)
            )
            .scalars()
            .all()
        )
    assert "refresh.succeeded" in events


def _wait_until_ready(rt: Runtime, worker: subprocess.Popen[bytes], node: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.poll() is None, log.read_text()[-3000:]
        if rt.celery.control.ping(destination=[node], timeout=1.0):
            return
    pytest.fail("the celery worker did not answer a ping within 60 s:\n" + log.read_text()[-3000:])


def test_app_role_gets_a_due_token_refreshed_by_a_worker_process(
    roles_db: RolesDatabase,
    worker_rt: Runtime,
    app_rt: Runtime,
    devserver: DevOAuthServer,
    provider: str,
    queue: str,
    tmp_path: Path,
) -> None:
    """Under the app role with api_refresh=worker, get_access_token on a due connection asks
    a real `celery worker` (running as the worker role) to refresh it, waits, and returns the
    new token; the app role itself wrote nothing but audit rows."""
    connection_id, grant = _import_due(worker_rt, devserver, provider, "app-due")
    before = _record(app_rt, connection_id)
    node = f"gkroles{uuid.uuid4().hex[:6]}@test"
    log = tmp_path / "worker.log"
    worker = start_celery(
        "worker",
        settings_env(worker_rt.settings),
        log,
        "--without-mingle",
        "--without-gossip",
        "-n",
        node,
    )
    try:
        _wait_until_ready(app_rt, worker, node, log)
        token = get_access_token(connection_id, runtime=app_rt)
        again = get_access_token(connection_id, runtime=app_rt)  # now from the cache
    finally:
        stop(worker)
        _drop_queue(worker_rt, queue)
    assert token != grant["access_token"]
    assert again == token
    assert devserver.is_active(token)
    after = _record(app_rt, connection_id)
    assert after.version == before.version + 1
    assert after.refresh_count == before.refresh_count + 1
    app_rt.read_audit.flush()
    with worker_rt.engine.connect() as conn:
        rows = conn.execute(
            select(audit_events.c.event, audit_events.c.actor, audit_events.c.details).where(
                audit_events.c.connection_id == connection_id
            )
        ).all()
    refreshes = [r for r in rows if r.event == "refresh.succeeded"]
    assert len(refreshes) == 1
    assert refreshes[0].details["reason"] == "on_demand"
    assert refreshes[0].actor.startswith("worker:")
    reads = [r for r in rows if r.event == "token.read"]
    assert reads
    assert {r.actor for r in reads} == {"test-app-role"}
    assert "worker" in json.dumps([r.details for r in reads])


def test_app_role_times_out_when_no_worker_refreshes(
    worker_rt: Runtime,
    app_rt: Runtime,
    devserver: DevOAuthServer,
    provider: str,
    queue: str,
) -> None:
    """With no worker on the queue, the app role's read ends after lock_wait_seconds with a
    classified error saying the worker did not refresh in time; the row is untouched."""
    connection_id, _ = _import_due(worker_rt, devserver, provider, "app-timeout")
    before = _record(app_rt, connection_id)
    quick = Runtime(app_rt.settings.model_copy(update={"lock_wait_seconds": 1.0}), actor="t-app")
    started = time.monotonic()
    try:
        with pytest.raises(WorkerRefreshTimeout, match="did not refresh") as caught:
            get_access_token(connection_id, runtime=quick)
    finally:
        quick.close()
        _drop_queue(worker_rt, queue)
    assert 1.0 <= time.monotonic() - started < 10
    assert caught.value.error_class == "worker_refresh_timeout"
    assert _record(app_rt, connection_id) == before


def test_app_role_reports_a_failed_worker_refresh(
    worker_rt: Runtime, app_rt: Runtime, devserver: DevOAuthServer, provider: str
) -> None:
    """When the worker's refresh fails (the provider answers 503), the waiting reader stops
    at once with a classified error naming the failure, instead of waiting for the timeout."""
    connection_id, _ = _import_due(worker_rt, devserver, provider, "app-failed")
    seen = _record(app_rt, connection_id)
    devserver.state.script(ScriptedResponse.html_error(503, consume=False))
    reader = TokenReader(app_rt)

    def refresh_in_the_worker_role(cid: str, seen_version: int) -> None:
        # The body of the task the worker runs, in this process, as the worker role.
        set_runtime(worker_rt)
        try:
            refresh_connection(cid, "on_demand", seen_version)
        finally:
            set_runtime(None)

    waiter = WorkerRefresh(
        app_rt,
        reader.clock,
        open_token=reader._open,
        from_cache=reader._from_cache,
        dispatch=refresh_in_the_worker_role,
    )
    started = time.monotonic()
    with pytest.raises(WorkerRefreshFailed, match=r"failed \((transient|malformed_response)\)"):
        waiter.token(seen)
    assert time.monotonic() - started < app_rt.settings.lock_wait_seconds


def test_script_hands_a_schema_migrated_by_another_role_to_the_migration_role(
    roles_db: RolesDatabase,
) -> None:
    """An existing install migrated as the superuser: running the script makes the migration
    role the owner of every grantkeeper table, sequence and function, and grants as usual."""
    name = f"{roles_db.name}_adopt"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        adopted = RolesDatabase(name, roles_db.roles, ())
        engine = create_db_engine(make_settings(database_url=adopted.url("postgres")))
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        _run_script(adopted.admin_dsn(), roles_sql(roles_db.roles))
        engine = _admin_engine(adopted)
        try:
            with engine.connect() as conn:
                owners = set(
                    conn.execute(
                        text(
                            "SELECT pg_get_userbyid(c.relowner) FROM pg_class c"
                            " JOIN pg_namespace n ON n.oid = c.relnamespace"
                            " WHERE n.nspname = 'public'"
                            " UNION SELECT pg_get_userbyid(proowner) FROM pg_proc"
                            " WHERE proname LIKE 'grantkeeper%'"
                        )
                    ).scalars()
                )
        finally:
            engine.dispose()
        assert owners == {roles_db.roles.migrator}
        _assert_privilege_matrix(adopted)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_app_role_reports_an_unreachable_broker(
    worker_rt: Runtime, app_rt: Runtime, devserver: DevOAuthServer, provider: str
) -> None:
    """If the task cannot be sent, the read fails at once with a classified error, and the
    per-version request marker is removed so the next reader asks again."""
    connection_id, _ = _import_due(worker_rt, devserver, provider, "app-no-broker")
    seen = _record(app_rt, connection_id)
    reader = TokenReader(app_rt)

    def broker_down(_cid: str, _version: int) -> None:
        raise ConnectionRefusedError("broker down")

    waiter = WorkerRefresh(
        app_rt,
        reader.clock,
        open_token=reader._open,
        from_cache=reader._from_cache,
        dispatch=broker_down,
    )
    with pytest.raises(WorkerRefreshError, match="ConnectionRefusedError") as caught:
        waiter.token(seen)
    assert type(caught.value) is WorkerRefreshError
    marker = f"{app_rt.cache.prefix}ondemand:{connection_id}:{seen.version}"
    assert app_rt.redis.exists(marker) == 0
