"""Parsing and classifying token endpoint responses. Pure: bytes and status in, a
:class:`TokenSet` or a classified :class:`~grantkeeper.errors.ProviderError` out.

Tolerant of what real providers send (numbers as strings, ``expires_at`` instead of
``expires_in``, ``token_type`` in any case, extra fields), strict about what matters (an access
token must be a non-empty string). Error messages carry the HTTP status and the OAuth error
code, never the body, which may hold a token.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from grantkeeper.errors import (
    MalformedResponse,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from grantkeeper.timing import compute_expiry

# Errors that mean the grant or the client is dead: retrying cannot help.
PERMANENT_OAUTH_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
    }
)
# Errors a provider uses to say "later".
TRANSIENT_OAUTH_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})


@dataclass(frozen=True)
class TokenSet:
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)  # None: the provider kept the old one
    expires_at: datetime
    token_type: str
    scope: str | None
    expiry_was_defaulted: bool


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After in seconds or as an HTTP date (RFC 9110), as seconds from ``now``."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also accepts '²', '٣'...
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _oauth_error(body: Any) -> tuple[str | None, str | None]:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        description = body.get("error_description")
        return body["error"], description if isinstance(description, str) else None
    return None, None


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None  # RecursionError: absurdly nested JSON is not a token response either


def classify_error_response(
    status: int, raw: bytes, retry_after: float | None, *, classify_as: int | None = None
) -> ProviderError:
    """The classified error for a non-success answer. ``classify_as`` decides the class as if
    the answer had that status, while ``status`` is still the one reported."""
    body = _decode_json(raw)
    code, description = _oauth_error(body)
    detail = f"HTTP {status}" + (f", error={code}" if code else "")
    if description:
        detail += f" ({description[:200]})"
    status_for_class = status if classify_as is None else classify_as
    if status_for_class == 429 or status_for_class >= 500 or code in TRANSIENT_OAUTH_ERRORS:
        return TransientProviderError(
            f"token endpoint unavailable: {detail}",
            http_status=status,
            oauth_error=code,
            retry_after=retry_after,
        )
    if code in PERMANENT_OAUTH_ERRORS or status_for_class == 401:
        return PermanentProviderError(
            f"grant refused: {detail}", http_status=status, oauth_error=code or "invalid_client"
        )
    if code is not None:
        return PermanentProviderError(
            f"grant refused: {detail}", http_status=status, oauth_error=code
        )
    return MalformedResponse(
        f"unexpected token endpoint answer: {detail}, body is not an OAuth error",
        http_status=status,
    )


def parse_token_response(
    status: int,
    raw: bytes,
    *,
    sent_at: datetime,
    default_ttl: timedelta,
    skew: timedelta,
    retry_after: float | None = None,
) -> TokenSet:
    """A usable token set, or raise the classified error."""
    if status != 200:
        raise classify_error_response(status, raw, retry_after)
    body = _decode_json(raw)
    if not isinstance(body, dict):
        raise MalformedResponse(
            f"HTTP {status} with a body that is not a JSON object ({len(raw)} bytes)",
            http_status=status,
        )
    code, _ = _oauth_error(body)
    if code is not None:
        raise classify_error_response(
            status, raw, None, classify_as=400 if code in PERMANENT_OAUTH_ERRORS else 503
        )
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise MalformedResponse("HTTP 200 without an access_token", http_status=status)
    refresh = body.get("refresh_token")
    if not isinstance(refresh, str) or not refresh:
        refresh = None  # a missing, null or empty refresh token keeps the stored one
    token_type = body.get("token_type")
    token_type = token_type.strip() if isinstance(token_type, str) and token_type else "Bearer"
    if token_type.lower() != "bearer":
        raise MalformedResponse(f"unsupported token_type {token_type[:20]!r}", http_status=status)
    expires_at, defaulted = _expiry(body, sent_at, default_ttl, skew)
    scope = body.get("scope") if isinstance(body.get("scope"), str) else None
    return TokenSet(
        access_token=access,
        refresh_token=refresh,
        expires_at=expires_at,
        token_type="Bearer",  # noqa: S106 - the scheme name
        scope=scope,
        expiry_was_defaulted=defaulted,
    )


def _expiry(
    body: dict[str, Any], sent_at: datetime, default_ttl: timedelta, skew: timedelta
) -> tuple[datetime, bool]:
    expires_in = _number(body.get("expires_in"))
    # A value no datetime can hold (infinity, 1e12 s, an epoch in milliseconds) counts as
    # absent: raising here would lose a token set the provider has already issued.
    if expires_in is not None and expires_in > 0:
        with contextlib.suppress(OverflowError, ValueError):
            return compute_expiry(sent_at, timedelta(seconds=expires_in), skew), False
    expires_at = _number(body.get("expires_at"))
    if expires_at is not None and expires_at > 0:
        with contextlib.suppress(OverflowError, ValueError, OSError):
            absolute = datetime.fromtimestamp(expires_at, UTC)
            if absolute > sent_at:
                return compute_expiry(sent_at, absolute - sent_at, skew), False
    return compute_expiry(sent_at, default_ttl, skew), True
