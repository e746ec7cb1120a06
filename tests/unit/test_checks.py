"""The security checklist rules, evaluated on plain facts (no services)."""

from __future__ import annotations

import base64
import os
import stat
from datetime import UTC, datetime

import pytest

from grantkeeper.checks import CheckResult, Facts, evaluate, failed

GOOD_KEY = os.urandom(32)


def _facts(**overrides: object) -> Facts:
    base: dict[str, object] = {
        "production": True,
        "redis_url": "rediss://:" + "p" * 24 + "@redis:6379/0?ssl_ca_certs=/ca.pem",
        "broker_url": "rediss://:" + "p" * 24 + "@redis:6379/0?ssl_ca_certs=/ca.pem",
        "redis_reachable": True,
        "maxmemory_policy": "noeviction",
        "keys": {"k20261201ab": GOOD_KEY},
        "key_id_entries": ["k20261201ab"],
        "primary_id": "k20261201ab",
        "database_url": "postgresql://gk@db/gk?sslmode=verify-full",
        "is_sqlite": False,
        "db_can_create": False,
        "db_owns_tables": False,
        "db_can_rewrite_audit": False,
        "file_modes": {".env": stat.S_IFREG | 0o600},
        "env_tracked_by_git": False,
        "accept_content": ["json"],
        "provider_urls": {"acme": ["https://acme.example/oauth/token"]},
        "now": datetime(2026, 12, 3, tzinfo=UTC),
    }
    base.update(overrides)
    return Facts(**base)  # type: ignore[arg-type]


def _by_check(results: list[CheckResult]) -> dict[str, str]:
    return {r.check: r.status for r in results}


def test_a_hardened_production_setup_passes() -> None:
    """Every automated check passes on a hardened set-up; only the manual items remain."""
    results = evaluate(_facts())
    assert not failed(results)
    assert {r.status for r in results} <= {"pass", "manual"}


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ({"redis_url": "redis://:" + "p" * 24 + "@redis:6379/0"}, "redis.tls"),
        ({"broker_url": "rediss://:" + "p" * 24 + "@r:6379/0?ssl_cert_reqs=none"}, "broker.tls"),
        ({"redis_url": "rediss://:short@redis:6379/0"}, "redis.password"),
        ({"broker_url": "memory://"}, "redis.backend"),
        ({"maxmemory_policy": "allkeys-lru"}, "redis.eviction"),
        ({"redis_reachable": False, "redis_error": "ConnectionError"}, "redis.reachable"),
        ({"keys": {}, "keyring_error": "no encryption key configured"}, "keyring.present"),
        (
            {"keys": {"k1": bytes(32)}, "primary_id": "k1", "key_id_entries": ["k1"]},
            "keyring.randomness",
        ),
        (
            {
                "keys": {"a": GOOD_KEY, "b": GOOD_KEY},
                "key_id_entries": ["a", "b"],
                "primary_id": "a",
            },
            "keyring.unique",
        ),
        ({"is_sqlite": True}, "database.engine"),
        ({"database_url": "postgresql://gk@db/gk?sslmode=require"}, "database.tls"),
        ({"db_can_create": True}, "database.role_ddl"),
        ({"db_owns_tables": True}, "database.role_ddl"),
        ({"db_can_rewrite_audit": True}, "database.audit_append_only"),
        ({"file_modes": {".env": stat.S_IFREG | 0o644}}, "files.permissions"),
        ({"file_modes": {"var": stat.S_IFDIR | 0o775}}, "files.permissions"),
        ({"env_tracked_by_git": True}, "files.env_untracked"),
        ({"accept_content": ["json", "pickle"]}, "celery.json_only"),
        ({"log_http_bodies": True}, "logging.http_bodies"),
        ({"provider_urls": {"acme": ["http://acme.example/oauth/token"]}}, "providers.https"),
        (
            {"provider_urls": {"a": ["https://a.example/t", "http://10.1.2.3/revoke"]}},
            "providers.https",
        ),
    ],
)
def test_each_unsafe_setting_fails_in_production(override: dict[str, object], check: str) -> None:
    """One unsafe fact makes its check fail (and the whole run fail) in production."""
    results = evaluate(_facts(**override))
    assert any(r.check == check and r.status == "fail" for r in results), _by_check(results)
    assert failed(results)
    assert all(r.fix for r in results if r.status == "fail")


def test_development_downgrades_deployment_rules_to_warnings() -> None:
    """Outside production, plain Redis and SQLite warn instead of failing."""
    results = evaluate(
        _facts(
            production=False,
            redis_url="redis://localhost:6379/0",
            broker_url="redis://localhost:6379/0",
            is_sqlite=True,
        )
    )
    statuses = _by_check(results)
    assert statuses["redis.tls"] == "warn"
    assert statuses["database.engine"] == "warn"
    assert not failed(results)


def test_documented_example_key_fails() -> None:
    """A key that has been printed in documentation is public, whatever its bytes look like."""
    example = base64.urlsafe_b64decode("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    results = evaluate(_facts(keys={"k1": example}, key_id_entries=["k1"], primary_id="k1"))
    assert _by_check(results)["keyring.randomness"] == "fail"


def test_old_primary_key_warns() -> None:
    """A primary key more than a year old is a warning to rotate."""
    results = evaluate(_facts(now=datetime(2028, 6, 1, tzinfo=UTC)))
    assert _by_check(results)["keyring.age"] == "warn"


def test_loopback_http_provider_passes() -> None:
    """Plain HTTP to a loopback address (the dev server, a local sidecar) never leaves the
    host, so it passes; no providers at all pass too."""
    for urls in (
        {"dev": ["http://127.0.0.1:8765/token", "http://localhost:8765/revoke"]},
        {"dev6": ["http://[::1]:8765/token"]},
        {},
    ):
        assert _by_check(evaluate(_facts(provider_urls=urls)))["providers.https"] == "pass"
