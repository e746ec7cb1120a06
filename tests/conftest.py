"""Fixtures shared by every test layer: real PostgreSQL and Redis, fresh per test session.

Each session creates its own PostgreSQL database (dropped at the end) and uses its own Redis
key prefix on a Redis database reserved for tests, so runs never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text

from config.settings import Settings
from grantkeeper.connections import ProviderSpec, add_provider
from grantkeeper.crypto import generate_key_entry
from grantkeeper.db import create_db_engine, upgrade
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.runtime import Runtime, set_runtime
from tests.support.dev import CLIENT

PG_ADMIN_DSN = os.environ.get(
    "GK_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_HOST = os.environ.get("GK_TEST_PG_HOST", "127.0.0.1:5432")
REDIS_TEST_URL = os.environ.get("GK_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    name = f"gk_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@{PG_HOST}/{name}"
    try:
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def keyring_spec() -> str:
    return generate_key_entry()


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return f"gkt{uuid.uuid4().hex[:8]}:"


def make_settings(**overrides: object) -> Settings:
    """Settings for tests: never read a developer's .env."""
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


@pytest.fixture
def settings(pg_database: str, keyring_spec: str, redis_prefix: str) -> Settings:
    return make_settings(
        database_url=pg_database,
        redis_url=REDIS_TEST_URL,
        redis_key_prefix=redis_prefix,
        encryption_keys=keyring_spec,
        refresh_margin_seconds=60,
        clock_skew_seconds=2,
        http_connect_timeout_seconds=2,
        http_read_timeout_seconds=5,
        lock_ttl_seconds=20,
        lock_wait_seconds=15,
    )


@pytest.fixture(scope="session")
def _migrated(pg_database: str) -> None:
    engine = create_db_engine(make_settings(database_url=pg_database))
    upgrade(engine)
    engine.dispose()


@pytest.fixture
def runtime(settings: Settings, _migrated: None) -> Iterator[Runtime]:
    """A runtime on clean tables and an empty key prefix."""
    rt = Runtime(settings, actor="test")
    with rt.engine.begin() as conn:
        conn.execute(text("TRUNCATE providers, connections, audit_events, pending_revocations"))
    rt.cache.delete_all()
    set_runtime(rt)
    try:
        yield rt
    finally:
        set_runtime(None)
        rt.cache.delete_all()
        rt.close()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    yield client
    client.close()


@pytest.fixture
def sqlite_settings(tmp_path: Path, keyring_spec: str, redis_prefix: str) -> Settings:
    return make_settings(
        data_dir=tmp_path / "data",
        redis_url=REDIS_TEST_URL,
        redis_key_prefix=redis_prefix,
        encryption_keys=keyring_spec,
        refresh_margin_seconds=60,
        clock_skew_seconds=2,
        http_connect_timeout_seconds=2,
        http_read_timeout_seconds=5,
        lock_ttl_seconds=20,
    )


@pytest.fixture
def devserver() -> Iterator[DevOAuthServer]:
    server = DevOAuthServer([CLIENT], access_ttl=3600).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def provider_name(runtime: Runtime, devserver: DevOAuthServer) -> str:
    add_provider(
        runtime,
        ProviderSpec(
            name="dev",
            token_url=devserver.token_url,
            revocation_url=devserver.revocation_url,
            client_id=CLIENT.client_id,
            client_secret=CLIENT.client_secret,
            auth_method=CLIENT.auth_method,
        ),
    )
    return "dev"
