"""Settings: unknown variables refused, lock TTL validated, secrets never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import ENV_PREFIX, Settings, describe_validation_error

DB_PASSWORD = "dbPw-6d1f0c2a9e"
REDIS_PASSWORD = "redisPw-83b7e4d0c1"
BROKER_PASSWORD = "brokerPw-5a9c2e7f14"
KEYRING = "k1:3q2-7wAAAAC8Yl1Iq3aTQeJ3pz7nV9kXm0fXk4T2h1Q"
DATABASE_URL = f"postgresql+psycopg://gk:{DB_PASSWORD}@db.internal:5432/grantkeeper"
REDIS_URL = f"redis://:{REDIS_PASSWORD}@cache.internal:6379/0"
BROKER_URL = f"redis://:{BROKER_PASSWORD}@broker.internal:6379/1"
SECRETS = (DB_PASSWORD, REDIS_PASSWORD, BROKER_PASSWORD, KEYRING, KEYRING.split(":", 1)[1])


def make(**overrides: object) -> Settings:
    """Settings that never read a developer's .env."""
    return Settings(_env_file=None, **overrides)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GRANTKEEPER_* variable from the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_defaults_construct() -> None:
    """With nothing configured, settings build from defaults."""
    settings = make()
    assert settings.lock_ttl_seconds == 60.0
    assert settings.redis_key_prefix == "gk:"


def test_known_environment_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GRANTKEEPER_<FIELD> variable sets that field."""
    monkeypatch.setenv("GRANTKEEPER_LOCK_TTL_SECONDS", "90")
    monkeypatch.setenv("GRANTKEEPER_REFRESH_MARGIN_SECONDS", "120")
    settings = make()
    assert settings.lock_ttl_seconds == 90.0
    assert settings.refresh_margin_seconds == 120


@pytest.mark.parametrize(
    "name", ["GRANTKEEPER_FOO", "GRANTKEEPER_LOCK_TTL_SECOND", "GRANTKEEPER_", "grantkeeper_foo"]
)
def test_unknown_environment_variable_is_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """An unknown GRANTKEEPER_* variable (a typo, in any case) fails with its name."""
    monkeypatch.setenv(name, "1")
    with pytest.raises(ValidationError, match=f"unknown setting\\(s\\) {name}\\b"):
        make()


def test_a_typo_names_the_closest_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal suggests the setting that was probably meant, instead of listing all."""
    monkeypatch.setenv("GRANTKEEPER_SCAN_INTERVL_SECONDS", "3")
    with pytest.raises(ValidationError, match="did you mean GRANTKEEPER_SCAN_INTERVAL_SECONDS"):
        make()


def test_invalid_values_are_reported_by_variable_name_without_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each bad value is named by its environment variable; the value itself (it may be a
    secret) is never quoted."""
    monkeypatch.setenv("GRANTKEEPER_LOCK_TTL_SECONDS", "not-a-number-s3cr3t")
    monkeypatch.setenv("GRANTKEEPER_API_REFRESH", "sometimes")
    with pytest.raises(ValidationError) as refused:
        make()
    text = describe_validation_error(refused.value)
    assert "GRANTKEEPER_LOCK_TTL_SECONDS: Input should be a valid number" in text
    assert "GRANTKEEPER_API_REFRESH: Input should be 'inline' or 'worker'" in text
    assert "s3cr3t" not in text
    assert "sometimes" not in text


def test_unrelated_environment_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables without the GRANTKEEPER_ prefix are none of our business."""
    monkeypatch.setenv("MY_GRANTKEEPER_FOO", "1")
    monkeypatch.setenv("GRANTKEEPERFOO", "1")
    make()


def test_unknown_keyword_is_rejected() -> None:
    """An unknown field passed directly is refused too."""
    with pytest.raises(ValidationError, match="lock_ttl"):
        make(lock_ttl=90)


@pytest.mark.parametrize(
    ("connect", "read", "lock_ttl", "ok"),
    [
        (5.0, 15.0, 60.0, True),
        (5.0, 15.0, 40.0, True),  # exactly twice the worst call
        (5.0, 15.0, 39.9, False),
        (5.0, 15.0, 20.0, False),  # once the worst call is not enough
        (2.0, 5.0, 14.0, True),
        (2.0, 5.0, 13.0, False),
        (10.0, 50.0, 60.0, False),  # default TTL with slow timeouts
    ],
)
def test_lock_ttl_must_be_twice_worst_provider_call(
    connect: float, read: float, lock_ttl: float, ok: bool
) -> None:
    """lock_ttl_seconds below 2 x (connect + read timeout) is refused."""
    kwargs = {
        "http_connect_timeout_seconds": connect,
        "http_read_timeout_seconds": read,
        "lock_ttl_seconds": lock_ttl,
    }
    if ok:
        assert make(**kwargs).lock_ttl_seconds == lock_ttl
    else:
        with pytest.raises(ValidationError, match="at least twice the worst-case"):
            make(**kwargs)


def test_lock_ttl_from_environment_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock TTL check also applies to values read from the environment."""
    monkeypatch.setenv("GRANTKEEPER_LOCK_TTL_SECONDS", "10")
    with pytest.raises(ValidationError, match="lock_ttl_seconds"):
        make()


def test_short_redis_key_prefix_is_rejected() -> None:
    """A one-character key prefix is too unspecific for a shared Redis."""
    with pytest.raises(ValidationError, match="redis_key_prefix"):
        make(redis_key_prefix="g")


def _secret_settings() -> Settings:
    return make(
        database_url=DATABASE_URL,
        redis_url=REDIS_URL,
        broker_url=BROKER_URL,
        encryption_keys=KEYRING,
    )


def test_secrets_not_in_repr_or_str() -> None:
    """repr, str and JSON dumps of Settings never show URL passwords or the keyring."""
    settings = _secret_settings()
    for text in (repr(settings), str(settings), f"{settings}", settings.model_dump_json()):
        for secret in SECRETS:
            assert secret not in text


def test_secrets_still_available_to_code() -> None:
    """The masked values are intact behind get_secret_value()."""
    settings = _secret_settings()
    assert settings.effective_database_url == DATABASE_URL
    assert settings.redis_url.get_secret_value() == REDIS_URL
    assert settings.encryption_keys is not None
    assert settings.encryption_keys.get_secret_value() == KEYRING


@pytest.mark.parametrize(
    ("field", "value", "secret"),
    [
        ("database_url", f"postgresql://gk:{DB_PASSWORD}@db/gk", DB_PASSWORD),
        ("redis_url", f"redis://:{REDIS_PASSWORD}@r/0", REDIS_PASSWORD),
        ("broker_url", f"redis://:{BROKER_PASSWORD}@b/1", BROKER_PASSWORD),
        ("encryption_keys", KEYRING, KEYRING.split(":", 1)[1]),
    ],
)
def test_secrets_not_in_validation_errors(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str, secret: str
) -> None:
    """A refused configuration's error message does not echo a secret from its input."""
    with pytest.raises(ValidationError) as from_kwargs:
        make(**{field: value, "lock_ttl_seconds": 1})
    monkeypatch.setenv(ENV_PREFIX + field.upper(), value)
    monkeypatch.setenv("GRANTKEEPER_TYPO", "1")
    with pytest.raises(ValidationError) as from_env:
        make()
    for info in (from_kwargs, from_env):
        assert secret not in str(info.value)
        assert secret not in repr(info.value)


def test_effective_broker_url_falls_back_to_redis_url() -> None:
    """Without broker_url the Celery broker is redis_url; with it, broker_url."""
    assert make(redis_url=REDIS_URL).effective_broker_url == REDIS_URL
    assert make(redis_url=REDIS_URL, broker_url=BROKER_URL).effective_broker_url == BROKER_URL


def test_sqlite_default_under_data_dir(tmp_path: Path) -> None:
    """Without database_url the database is grantkeeper.db under data_dir."""
    settings = make(data_dir=tmp_path)
    assert settings.sqlite_path == tmp_path / "grantkeeper.db"
    assert settings.effective_database_url == f"sqlite:///{tmp_path}/grantkeeper.db"
    assert settings.is_sqlite


def test_sqlite_default_data_dir() -> None:
    """The default data_dir is ./var."""
    assert make().effective_database_url == "sqlite:///var/grantkeeper.db"


def test_database_url_overrides_sqlite() -> None:
    """An explicit database_url is used and is not SQLite."""
    settings = make(database_url=DATABASE_URL)
    assert settings.effective_database_url == DATABASE_URL
    assert not settings.is_sqlite
