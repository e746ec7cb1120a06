"""Parsing and classifying token endpoint responses: a table of real-world answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from grantkeeper.errors import (
    MalformedResponse,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from grantkeeper.token_response import TokenSet, parse_retry_after, parse_token_response

SENT = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
DEFAULT_TTL = timedelta(seconds=600)
SKEW = timedelta(seconds=30)
ACCESS = "at-FIXTURE-access-9f8e7d6c5b4a"
REFRESH = "rt-FIXTURE-refresh-1a2b3c4d5e6f"
EXPIRY_3600 = SENT + timedelta(seconds=3570)  # 3600 s lifetime minus 30 s skew
EXPIRY_DEFAULT = SENT + timedelta(seconds=570)  # 600 s default TTL minus 30 s skew


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _parse(status: int, raw: bytes, retry_after: float | None = None) -> TokenSet:
    return parse_token_response(
        status, raw, sent_at=SENT, default_ttl=DEFAULT_TTL, skew=SKEW, retry_after=retry_after
    )


# (body, expected refresh_token, expected expires_at, expiry_was_defaulted, expected scope)
SUCCESS_CASES = [
    pytest.param(
        _json(
            access_token=ACCESS,
            refresh_token=REFRESH,
            expires_in=3600,
            token_type="Bearer",
            scope="openid email",
        ),
        REFRESH,
        EXPIRY_3600,
        False,
        "openid email",
        id="normal",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in="3600", token_type="Bearer"),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="expires_in-as-string",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=" 3600.0 "),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="expires_in-as-padded-float-string",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, token_type="Bearer"),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="missing-expires_in-defaults",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_at=SENT.timestamp() + 3600),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="expires_at-epoch",
    ),
    pytest.param(
        _json(
            access_token=ACCESS, refresh_token=REFRESH, expires_at=str(int(SENT.timestamp()) + 3600)
        ),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="expires_at-epoch-as-string",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_at=SENT.timestamp() - 60),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="expires_at-in-the-past-defaults",
    ),
    pytest.param(
        _json(
            access_token=ACCESS,
            refresh_token=REFRESH,
            expires_in=3600,
            token_type="Bearer",
            id_token="eyJhbGciOiJSUzI1NiJ9.e30.sig",
            refresh_expires_in=86400,
            not_before_policy=0,
            session_state={"nested": [1, 2, 3]},
        ),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="extra-fields-ignored",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600, token_type="bearer"),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="token_type-lowercase",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600, token_type="BEARER"),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="token_type-uppercase",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600, token_type=" BeArEr "),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="token_type-mixed-case-padded",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="token_type-missing",
    ),
    pytest.param(
        _json(access_token=ACCESS, expires_in=3600),
        None,
        EXPIRY_3600,
        False,
        None,
        id="refresh_token-missing-keeps-stored",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=None, expires_in=3600),
        None,
        EXPIRY_3600,
        False,
        None,
        id="refresh_token-null-keeps-stored",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token="", expires_in=3600),
        None,
        EXPIRY_3600,
        False,
        None,
        id="refresh_token-empty-keeps-stored",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=0),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="expires_in-zero-defaults",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=True),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="expires_in-boolean-defaults",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in="soon"),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="expires_in-garbage-string-defaults",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in="inf"),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="expires_in-infinite-defaults",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=1e12),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="expires_in-beyond-datetime-defaults",
    ),
    pytest.param(
        _json(
            access_token=ACCESS,
            refresh_token=REFRESH,
            expires_at=int(SENT.timestamp() + 3600) * 1000,
        ),
        REFRESH,
        EXPIRY_DEFAULT,
        True,
        None,
        id="expires_at-in-milliseconds-defaults",
    ),
    pytest.param(
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600, scope=["a", "b"]),
        REFRESH,
        EXPIRY_3600,
        False,
        None,
        id="non-string-scope-ignored",
    ),
]


@pytest.mark.parametrize(("raw", "refresh", "expires_at", "defaulted", "scope"), SUCCESS_CASES)
def test_success_responses(
    raw: bytes, refresh: str | None, expires_at: datetime, defaulted: bool, scope: str | None
) -> None:
    """Each tolerated 200 answer parses to the expected token set."""
    tokens = _parse(200, raw)
    assert tokens.access_token == ACCESS
    assert tokens.refresh_token == refresh
    assert tokens.expires_at == expires_at
    assert tokens.expiry_was_defaulted is defaulted
    assert tokens.token_type == "Bearer"
    assert tokens.scope == scope


def test_token_set_repr_hides_tokens() -> None:
    """A TokenSet's repr never shows the access or refresh token."""
    tokens = _parse(200, _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600))
    assert ACCESS not in repr(tokens)
    assert REFRESH not in repr(tokens)


HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway"
    b"</h1></center><hr><center>nginx</center></body></html>"
)

# (status, body, retry_after passed in, expected class, http_status, oauth_error)
ERROR_CASES = [
    pytest.param(
        200,
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600, token_type="mac"),
        None,
        MalformedResponse,
        200,
        None,
        id="non-bearer-token-type",
    ),
    pytest.param(
        200,
        _json(access_token=ACCESS, refresh_token=REFRESH, token_type="DPoP"),
        None,
        MalformedResponse,
        200,
        None,
        id="dpop-token-type",
    ),
    pytest.param(502, HTML_502, None, TransientProviderError, 502, None, id="html-502"),
    pytest.param(
        503,
        b"Service Unavailable " + ACCESS.encode(),
        None,
        TransientProviderError,
        503,
        None,
        id="plain-503",
    ),
    pytest.param(
        429,
        _json(error="slow_down"),
        120.0,
        TransientProviderError,
        429,
        "slow_down",
        id="429-with-retry-after",
    ),
    pytest.param(429, b"", 30.0, TransientProviderError, 429, None, id="429-empty-body"),
    pytest.param(
        200,
        _json(error="invalid_grant", refresh_token=REFRESH),
        None,
        PermanentProviderError,
        200,
        "invalid_grant",
        id="200-with-invalid_grant",
    ),
    pytest.param(
        200,
        _json(error="temporarily_unavailable", access_token=ACCESS),
        None,
        TransientProviderError,
        200,
        "temporarily_unavailable",
        id="200-with-temporarily_unavailable",
    ),
    pytest.param(
        400,
        _json(error="invalid_grant", error_description="Token has been expired or revoked."),
        None,
        PermanentProviderError,
        400,
        "invalid_grant",
        id="400-invalid_grant",
    ),
    pytest.param(
        401, b"", None, PermanentProviderError, 401, "invalid_client", id="401-without-body"
    ),
    pytest.param(
        401,
        b"Unauthorized",
        None,
        PermanentProviderError,
        401,
        "invalid_client",
        id="401-text-body",
    ),
    pytest.param(
        400,
        _json(error="invalid_request", error_description="missing parameter"),
        None,
        PermanentProviderError,
        400,
        "invalid_request",
        id="400-invalid_request",
    ),
    pytest.param(
        400,
        _json(error="temporarily_unavailable"),
        None,
        TransientProviderError,
        400,
        "temporarily_unavailable",
        id="400-temporarily_unavailable",
    ),
    pytest.param(
        503,
        _json(error="temporarily_unavailable"),
        None,
        TransientProviderError,
        503,
        "temporarily_unavailable",
        id="503-temporarily_unavailable",
    ),
    pytest.param(
        500,
        _json(error="invalid_grant"),
        None,
        TransientProviderError,
        500,
        "invalid_grant",
        id="5xx-wins-over-permanent-code",
    ),
    pytest.param(
        400,
        b"<html>Bad Request " + REFRESH.encode() + b"</html>",
        None,
        MalformedResponse,
        400,
        None,
        id="400-html-not-an-oauth-error",
    ),
    pytest.param(
        200,
        b"<html>Welcome " + ACCESS.encode() + b"</html>",
        None,
        MalformedResponse,
        200,
        None,
        id="200-not-json",
    ),
    pytest.param(200, b"", None, MalformedResponse, 200, None, id="200-empty"),
    pytest.param(
        200,
        json.dumps([{"access_token": ACCESS}]).encode(),
        None,
        MalformedResponse,
        200,
        None,
        id="200-json-array",
    ),
    pytest.param(200, b"null", None, MalformedResponse, 200, None, id="200-json-null"),
    pytest.param(
        200,
        _json(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)[:-20],
        None,
        MalformedResponse,
        200,
        None,
        id="200-truncated-json",
    ),
    pytest.param(200, b"\xff\xfe{\x00}", None, MalformedResponse, 200, None, id="200-not-utf8"),
    pytest.param(
        200,
        _json(refresh_token=REFRESH, expires_in=3600, token_type="Bearer"),
        None,
        MalformedResponse,
        200,
        None,
        id="200-without-access_token",
    ),
    pytest.param(
        200,
        _json(access_token="", refresh_token=REFRESH),
        None,
        MalformedResponse,
        200,
        None,
        id="200-empty-access_token",
    ),
    pytest.param(
        200,
        _json(access_token=None, refresh_token=REFRESH),
        None,
        MalformedResponse,
        200,
        None,
        id="200-null-access_token",
    ),
    pytest.param(
        200,
        _json(access_token={"value": ACCESS}, refresh_token=REFRESH),
        None,
        MalformedResponse,
        200,
        None,
        id="200-non-string-access_token",
    ),
]


@pytest.mark.parametrize(
    ("status", "raw", "retry_after", "expected", "http_status", "oauth_error"), ERROR_CASES
)
def test_error_responses_are_classified(
    status: int,
    raw: bytes,
    retry_after: float | None,
    expected: type[ProviderError],
    http_status: int,
    oauth_error: str | None,
) -> None:
    """Each unusable answer raises exactly the expected class with status and OAuth code."""
    with pytest.raises(ProviderError) as info:
        _parse(status, raw, retry_after)
    exc = info.value
    assert type(exc) is expected
    assert exc.http_status == http_status
    assert exc.oauth_error == oauth_error
    assert exc.permanent is (expected is PermanentProviderError)
    assert exc.retry_after == retry_after


@pytest.mark.parametrize(
    ("status", "raw", "retry_after", "expected", "http_status", "oauth_error"), ERROR_CASES
)
def test_error_messages_never_contain_tokens_or_body(
    status: int,
    raw: bytes,
    retry_after: float | None,
    expected: type[ProviderError],
    http_status: int,
    oauth_error: str | None,
) -> None:
    """No error message quotes the fixture's access/refresh token or the response body."""
    with pytest.raises(ProviderError) as info:
        _parse(status, raw, retry_after)
    message = str(info.value)
    assert ACCESS not in message
    assert REFRESH not in message
    if len(raw) >= 16:
        assert raw.decode("utf-8", "replace") not in message


def test_429_retry_after_seconds_reaches_the_error() -> None:
    """A 429 carries the Retry-After (in seconds) into the transient error."""
    retry_after = parse_retry_after("120", SENT)
    with pytest.raises(TransientProviderError) as info:
        _parse(429, b"Too Many Requests", retry_after)
    assert info.value.retry_after == 120.0
    assert info.value.http_status == 429


def test_429_retry_after_http_date_reaches_the_error() -> None:
    """A 429 with an HTTP-date Retry-After carries the seconds until that date."""
    header = format_datetime(SENT + timedelta(seconds=90), usegmt=True)
    retry_after = parse_retry_after(header, SENT)
    with pytest.raises(TransientProviderError) as info:
        _parse(429, b"", retry_after)
    assert info.value.retry_after == 90.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        ("  7 ", 7.0),
        ("0", 0.0),
        (format_datetime(SENT + timedelta(seconds=45), usegmt=True), 45.0),
        ("Wed, 01 Jan 2025 12:02:00 GMT", 120.0),
        ("Wed, 01 Jan 2025 12:02:00 -0000", 120.0),  # naive date read as UTC
        ("Wed, 01 Jan 2025 11:00:00 GMT", 0.0),  # in the past: retry now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("\u00b2", None),  # a superscript two: str.isdigit() is True but it is no number
        ("\u0663\u0660", None),  # Arabic-Indic digits
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    """Retry-After in delay-seconds or HTTP-date form becomes seconds from now; junk is None."""
    assert parse_retry_after(header, SENT) == expected
