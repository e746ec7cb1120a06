"""Redis TLS options: one parser (config/redis_tls.py) for the URL's ``ssl_*`` parameters, and
the options every client is given from it (grantkeeper's client, kombu's broker_use_ssl,
RedBeat's redbeat_redis_use_ssl). No server needed; tests/e2e/test_redis_tls.py runs them
against a real TLS Redis."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from urllib.parse import quote

import pytest
from pydantic import ValidationError
from redis.connection import SSLConnection, parse_url

from config.redis_tls import (
    RedisTls,
    RedisUrlError,
    parse_redis_tls,
    redis_endpoint,
    without_tls_params,
)
from config.settings import ENV_PREFIX, Settings
from grantkeeper.errors import RedisTlsError
from grantkeeper.redisconn import VerifiedSSLConnection, connect_redis
from tests.support.tls import make_tls_material
from worker.app import celery_config

PASSWORD = "s3cret-redis-pw-6c1d9e"
BASE = f"rediss://:{PASSWORD}@redis.internal:6380/0"
CA = "/run/secrets/redis ca+1.pem"  # a space and a '+': both must survive the URL
CA_Q = quote(CA, safe="")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def make(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[arg-type]


def test_plain_redis_url_has_no_tls() -> None:
    """redis:// (and unix://) URLs carry no TLS options."""
    assert parse_redis_tls("redis://:pw@127.0.0.1:6379/0") is None
    assert parse_redis_tls("unix:///run/redis.sock?db=1") is None


def test_rediss_without_parameters_verifies_against_the_system_store() -> None:
    """A bare rediss:// URL verifies the certificate and the host name by default."""
    tls = parse_redis_tls(BASE)
    assert tls == RedisTls(cert_reqs="required", check_hostname=True)
    assert tls.verifies
    assert tls.redis_kwargs() == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}


def test_every_supported_parameter_is_read() -> None:
    """ssl_cert_reqs, ssl_ca_certs (percent-encoded path), ssl_certfile, ssl_keyfile and
    ssl_check_hostname all reach the options."""
    url = (
        f"{BASE}?ssl_cert_reqs=optional&ssl_ca_certs={CA_Q}&ssl_certfile=%2Fc.pem"
        "&ssl_keyfile=%2Fk.pem&ssl_check_hostname=false"
    )
    tls = parse_redis_tls(url)
    assert tls == RedisTls("optional", CA, "/c.pem", "/k.pem", check_hostname=False)
    assert tls.redis_kwargs() == {
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_check_hostname": False,
        "ssl_ca_certs": CA,
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
    }


def test_cert_reqs_none_turns_hostname_checking_off() -> None:
    """Verification off is explicit only, and then there is no host name to check either."""
    tls = parse_redis_tls(f"{BASE}?ssl_cert_reqs=none")
    assert tls is not None
    assert not tls.verifies
    assert tls.redis_kwargs()["ssl_cert_reqs"] == ssl.CERT_NONE
    assert tls.redis_kwargs()["ssl_check_hostname"] is False


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ssl_ca_cert=%2Fca.pem", "unknown Redis TLS parameter"),
        ("ssl_cert_reqs=CERT_REQUIRED", "ssl_cert_reqs must be one of required, optional, none"),
        ("ssl_cert_reqs=Required", "ssl_cert_reqs must be one of"),
        ("ssl_check_hostname=maybe", "ssl_check_hostname must be true or false"),
        ("ssl_keyfile=%2Fk.pem", "ssl_keyfile needs ssl_certfile"),
        ("ssl_ca_certs=", "without a value"),
        ("ssl_ca_certs=%2Fa&ssl_ca_certs=%2Fb", "more than once"),
    ],
)
def test_wrong_tls_parameters_are_refused(query: str, message: str) -> None:
    """A typo never silently weakens TLS; the message names the problem, not the URL."""
    with pytest.raises(RedisUrlError, match=message) as info:
        parse_redis_tls(f"{BASE}?{query}")
    assert PASSWORD not in str(info.value)


def test_tls_parameters_on_a_plain_url_are_refused() -> None:
    """ssl_* on redis:// would be ignored by a client: refused, pointing at rediss://."""
    with pytest.raises(RedisUrlError, match="TLS needs the rediss:// scheme"):
        parse_redis_tls(f"redis://:{PASSWORD}@h:6379/0?ssl_cert_reqs=required")


def test_settings_refuse_a_wrong_redis_or_broker_url_without_echoing_it() -> None:
    """Start-up stops on a wrong TLS parameter in either URL, and the password stays hidden."""
    for field in ("redis_url", "broker_url"):
        with pytest.raises(ValidationError, match="unknown Redis TLS parameter") as info:
            make(**{field: f"{BASE}?ssl_verify=yes"})
        assert PASSWORD not in str(info.value)


def test_without_tls_params_keeps_everything_else() -> None:
    """Only the ssl_* parameters go; credentials, host, db and other parameters stay."""
    url = f"{BASE}?ssl_cert_reqs=required&socket_timeout=3&ssl_ca_certs={CA_Q}"
    assert without_tls_params(url) == f"{BASE}?socket_timeout=3"
    assert without_tls_params(f"{BASE}?ssl_cert_reqs=required") == BASE
    assert without_tls_params(BASE) == BASE


def test_redis_endpoint_names_host_and_port_only() -> None:
    assert redis_endpoint(f"{BASE}?ssl_cert_reqs=required") == "redis.internal:6380"
    assert redis_endpoint("rediss://cache") == "cache:6379"


def test_redis_py_reads_the_same_url_the_same_way() -> None:
    """The accepted values are redis-py's own, so health checks and redis-cli wrappers that
    call redis.Redis.from_url on the raw URL get the same TLS behaviour."""
    url = f"{BASE}?ssl_cert_reqs=required&ssl_ca_certs={CA_Q}&ssl_check_hostname=false"
    raw = parse_url(url)
    assert raw["connection_class"] is SSLConnection
    assert (raw["ssl_cert_reqs"], raw["ssl_ca_certs"], raw["ssl_check_hostname"]) == (
        "required",
        CA,
        False,
    )


def test_celery_config_derives_broker_and_redbeat_tls_from_one_url() -> None:
    """One rediss:// URL (cache, locks, broker, RedBeat): kombu's broker_use_ssl and RedBeat's
    redbeat_redis_use_ssl are the parsed options, and the URLs Celery sees carry none."""
    url = f"{BASE}?ssl_cert_reqs=required&ssl_ca_certs={CA_Q}"
    config = celery_config(make(redis_url=url))
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, "ssl_ca_certs": CA}
    assert config["broker_use_ssl"] == expected
    assert config["redbeat_redis_use_ssl"] == expected
    assert config["broker_url"] == BASE
    assert config["redbeat_redis_url"] == BASE


def test_celery_config_with_a_separate_tls_broker() -> None:
    """A TLS broker next to a plain cache Redis: only the broker gets TLS options."""
    broker = f"rediss://:{PASSWORD}@broker:6380/1?ssl_ca_certs=%2Fbroker-ca.pem"
    config = celery_config(make(redis_url="redis://cache:6379/0", broker_url=broker))
    assert config["broker_use_ssl"]["ssl_ca_certs"] == "/broker-ca.pem"
    assert config["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert "redbeat_redis_use_ssl" not in config
    assert config["redbeat_redis_url"] == "redis://cache:6379/0"


def test_celery_config_without_tls_sets_no_tls_options() -> None:
    config = celery_config(make())
    assert "broker_use_ssl" not in config
    assert "redbeat_redis_use_ssl" not in config


def test_grantkeeper_client_gets_the_parsed_options(tmp_path: Path) -> None:
    """grantkeeper's client: the classifying SSL connection class and the parsed options (the
    URL it is built from has no ssl_* parameters left to override them)."""
    ca = make_tls_material(tmp_path).ca_cert
    client = connect_redis(f"{BASE}?ssl_ca_certs={quote(str(ca), safe='')}")
    try:
        pool = client.connection_pool
        assert pool.connection_class is VerifiedSSLConnection
        kwargs = pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == str(ca)
        assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert kwargs["ssl_check_hostname"] is True
    finally:
        client.close()


def test_missing_ca_file_is_a_classified_error(tmp_path: Path) -> None:
    """A CA path that does not exist stops the client from being built, naming the parameter,
    the path and the Redis endpoint (not the password)."""
    missing = tmp_path / "nope.pem"
    with pytest.raises(RedisTlsError, match=r"redis\.internal:6380: ssl_ca_certs") as info:
        connect_redis(f"{BASE}?ssl_ca_certs={quote(str(missing), safe='')}")
    assert str(missing) in str(info.value)
    assert PASSWORD not in str(info.value)
    assert info.value.error_class == "redis_tls"
