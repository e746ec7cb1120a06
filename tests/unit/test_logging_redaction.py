"""Log redaction: secret-named keys, registered secret values, and the rendered line."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog

from config import logging as gk_logging
from config.logging import REDACTED, SecretRegistry, redact, scrub_rendered

SECRET = "ya29.registered-secret-0f9e8d7c"


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> SecretRegistry:
    """A fresh process-wide secret registry per test, holding SECRET."""
    fresh = SecretRegistry()
    fresh.add(SECRET)
    monkeypatch.setattr(gk_logging, "secrets_held", fresh)
    return fresh


def _redact(**event: Any) -> MutableMapping[str, Any]:
    return redact(None, "info", {"event": "test.event", **event})


@pytest.mark.parametrize(
    "key",
    [
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "client_secret",
        "password",
        "db_passwd",
        "authorization",
        "Authorization",
        "proxy_authorization",
        "code",
        "auth_code",
        "api_key",
        "x-api-key",
        "cookie",
        "set_cookie",
        "credentials",
    ],
)
def test_secret_named_keys_are_redacted(key: str) -> None:
    """A string under a key that names a secret is replaced."""
    assert _redact(**{key: "plain-value-123"})[key] == REDACTED


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("connection_id", "conn-1234"),
        ("error_class", "permanent"),
        ("access_fp", "a1b2c3d4e5f6"),
        ("refresh_fp", "a1b2c3d4e5f6"),
        ("token_url", "https://idp.example/oauth/token"),
        ("expires_at", "2025-01-01T12:00:00+00:00"),
        ("access_expires_at", "2025-01-01T12:00:00+00:00"),
        ("token_type", "Bearer"),
        ("key_id", "k20250101ab12"),
        ("provider", "google"),
        ("event", "refresh.succeeded"),
        ("outcome", "ok"),
    ],
)
def test_safe_keys_are_untouched(key: str, value: str) -> None:
    """Operational fields (ids, classes, fingerprints, URLs, timestamps) stay readable."""
    assert _redact(**{key: value})[key] == value


@pytest.mark.parametrize("value", [42, 3.5, True, None])
def test_scalars_under_secret_keys_keep_counts_and_flags(value: object) -> None:
    """Numbers, booleans and None under secret-looking keys are not secrets and are kept."""
    assert _redact(refresh_token=value)["refresh_token"] == value


def test_bytes_under_secret_key_are_redacted() -> None:
    """A non-string, non-numeric value under a secret key is replaced."""
    assert _redact(client_secret=b"raw-bytes-secret")["client_secret"] == REDACTED


@pytest.mark.parametrize("key", ["detail", "value", "note", "connection_id", "token_url"])
def test_registered_secret_under_innocent_key_is_redacted(key: str) -> None:
    """A value equal to a secret the process holds is replaced whatever its key."""
    assert _redact(**{key: SECRET})[key] == REDACTED


def test_short_values_are_not_registered(registry: SecretRegistry) -> None:
    """Values under 8 characters are not registered (they would shred ordinary text)."""
    registry.add("abc")
    registry.add(None)
    registry.add("")
    assert "abc" not in registry
    assert _redact(detail="abc")["detail"] == "abc"


def test_nested_dicts_and_lists() -> None:
    """Redaction reaches into nested dicts and lists, by key and by registered value."""
    event = _redact(
        headers={"Authorization": "Bearer abc", "Accept": "application/json"},
        form={"grant_type": "refresh_token", "refresh_token": "rt-plain", "client_id": "app"},
        items=[{"access_token": "at-plain", "connection_id": "c1"}, SECRET, "harmless"],
        refresh_tokens=["rt-1-plain", "rt-2-plain"],
        deep={"a": {"b": [{"c": SECRET, "password": "pw-plain"}]}},
        pair=("ok", SECRET),
    )
    assert event["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
    assert event["form"] == {
        "grant_type": "refresh_token",
        "refresh_token": REDACTED,
        "client_id": "app",
    }
    assert event["items"] == [
        {"access_token": REDACTED, "connection_id": "c1"},
        REDACTED,
        "harmless",
    ]
    assert event["refresh_tokens"] == [REDACTED, REDACTED]
    assert event["deep"] == {"a": {"b": [{"c": REDACTED, "password": REDACTED}]}}
    assert event["pair"] == ["ok", REDACTED]


@pytest.mark.parametrize(
    "value",
    [
        {"user": "alice", "pass": "hunter2-plain"},
        [{"value": "hunter2-plain"}],
        {"google": "hunter2-plain"},
    ],
)
def test_container_under_secret_key_is_redacted_whole(value: object) -> None:
    """A dict under a secret-named key is secret as a whole, even with innocent inner keys."""
    event = _redact(credentials=value, tokens=value)
    assert "hunter2-plain" not in repr(event)


def test_redact_leaves_event_dict_shape() -> None:
    """redact returns the same mapping with every key preserved."""
    event = {"event": "x", "access_token": "t-plain", "connection_id": "c"}
    result = redact(None, "info", event)
    assert result is event
    assert set(result) == {"event", "access_token", "connection_id"}


def test_scrub_rendered_removes_embedded_secret() -> None:
    """A registered secret inside a longer rendered line (e.g. an exception text) is removed."""
    line = f'{{"event": "x", "exception": "HTTPError: GET /?token={SECRET}&x=1 failed"}}'
    scrubbed = scrub_rendered(None, "info", line)
    assert SECRET not in scrubbed
    assert (
        scrubbed == f'{{"event": "x", "exception": "HTTPError: GET /?token={REDACTED}&x=1 failed"}}'
    )


def test_scrub_rendered_leaves_clean_lines_alone() -> None:
    """A line holding no registered secret is returned unchanged."""
    line = '{"event": "refresh.succeeded", "connection_id": "c1"}'
    assert scrub_rendered(None, "info", line) == line


@pytest.mark.parametrize("secret", ['pa"ss\\word-9876', "sécret-token-123", "tab\tsecret-42"])
def test_scrub_catches_secret_escaped_by_json_rendering(
    registry: SecretRegistry, secret: str
) -> None:
    """A secret with quotes, backslashes or non-ASCII is removed after JSON escaping too."""
    registry.add(secret)
    event = redact(None, "info", {"event": "x", "error": f"failed near {secret} here"})
    rendered = structlog.processors.JSONRenderer()(None, "info", event)
    scrubbed = scrub_rendered(None, "info", rendered)
    assert secret not in scrubbed
    assert json.dumps(secret)[1:-1] not in scrubbed
    assert REDACTED in scrubbed


def test_full_pipeline_renders_no_secret() -> None:
    """redact then JSON render then scrub: no secret survives in the final line."""
    event = redact(
        None,
        "info",
        {
            "event": "refresh.failed",
            "refresh_token": "rt-plain-value",
            "detail": SECRET,
            "error": f"provider said no to {SECRET}",
            "connection_id": "c1",
        },
    )
    line = scrub_rendered(None, "info", structlog.processors.JSONRenderer()(None, "info", event))
    assert SECRET not in line
    assert "rt-plain-value" not in line
    assert '"connection_id": "c1"' in line


def test_registry_is_bounded() -> None:
    """The registry forgets the oldest secrets beyond its capacity."""
    small = SecretRegistry(capacity=3)
    for i in range(5):
        small.add(f"secret-value-{i}")
    assert "secret-value-0" not in small
    assert "secret-value-1" not in small
    assert all(f"secret-value-{i}" in small for i in (2, 3, 4))


def test_evicted_secret_is_no_longer_scrubbed_but_held_ones_are() -> None:
    """Eviction removes a secret from the scan index too; the ones still held stay found."""
    small = SecretRegistry(capacity=2)
    for i in range(3):
        small.add(f"secret-value-{i}")
    line = small.scrub("a secret-value-0 b secret-value-1 c secret-value-2")
    assert line == f"a secret-value-0 b {REDACTED} c {REDACTED}"


def test_secrets_sharing_a_prefix_are_all_found() -> None:
    """Several secrets that start alike share one probe bucket; each is still replaced."""
    reg = SecretRegistry()
    reg.add("ya29.AAAAAAAA-first")
    reg.add("ya29.AAAAAAAA-second")
    line = reg.scrub("x ya29.AAAAAAAA-second y ya29.AAAAAAAA-first z")
    assert line == f"x {REDACTED} y {REDACTED} z"


def test_secret_containing_another_is_replaced_whole() -> None:
    """When one secret contains another, the longer one goes first, so nothing is left over."""
    reg = SecretRegistry()
    reg.add("inner-secret")
    reg.add("outer-inner-secret-tail")
    assert reg.scrub("[outer-inner-secret-tail]") == f"[{REDACTED}]"
    assert reg.scrub("[inner-secret]") == f"[{REDACTED}]"


def test_re_adding_refreshes_recency() -> None:
    """A secret seen again counts as recent: it outlives newer ones at eviction."""
    small = SecretRegistry(capacity=2)
    small.add("secret-value-a")
    small.add("secret-value-b")
    small.add("secret-value-a")
    small.add("secret-value-c")
    assert "secret-value-a" in small
    assert "secret-value-b" not in small


def test_scrub_with_many_secrets_finds_the_one_in_the_line() -> None:
    """A full registry (20,000 secrets) still finds the one secret that appears in a line."""
    reg = SecretRegistry()
    for i in range(20000):
        reg.add(f"tok-{i:08d}-padding")
    line = json.dumps({"event": "x", "detail": "got tok-00012345-padding back"})
    assert "tok-00012345-padding" not in reg.scrub(line)
    assert reg.scrub('{"event": "clean"}') == '{"event": "clean"}'
