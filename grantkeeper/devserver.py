"""A small, strict, local OAuth 2.0 authorization server for grantkeeper's demo, tests and benches.

Why this exists: grantkeeper's whole job is to survive the sharp edges of real token endpoints,
and a mock that answers ``200`` to everything exercises none of them. This server reproduces the
behaviours that actually lose grants in production:

* **Refresh token rotation** (RFC 6749 section 6 / OAuth 2.1): every successful refresh returns a
  new refresh token and consumes the presented one.
* **Reuse detection**: presenting a consumed refresh token answers ``invalid_grant`` *and revokes
  the whole grant*, exactly like oidc-provider and Teamleader-style providers. A client that
  refreshes the same grant twice concurrently therefore loses the account, which is the failure
  grantkeeper's locking exists to prevent.
* **Client authentication** with ``client_secret_basic`` (RFC 6749 section 2.3.1, including the
  easy-to-forget form-urlencoding of id and secret before base64) or ``client_secret_post``, each
  client pinned to one method, failures answering ``401 invalid_client``.
* **RFC 7009 revocation** and **RFC 7662 introspection**, so tests can assert what the provider
  believes rather than what the client believes.
* **Fault injection**: a fixed latency and a queue of scripted responses (HTML 502 pages, 429 with
  ``Retry-After``, ``200`` bodies that are not JSON or carry ``error``, truncated bodies, timeouts,
  dropped connections), optionally *after* the refresh token was consumed, which models the worst
  real case: "the provider rotated the token but the response never arrived".

Grants are minted directly (``DevOAuthServer.mint_grant`` or ``POST /__admin__/grants``); no
authorization-code flow or browser is involved. Everything lives in memory behind one lock.

The server uses only the standard library (``ThreadingHTTPServer``, one daemon thread per
connection) so it can run anywhere grantkeeper's tests run; a thread per connection is what lets
hundreds of requests sleep through the injected latency at the same time.

Run it standalone (benchmarks do this, to keep the server's CPU out of the client's process)::

    python -m grantkeeper.devserver --port 8765 --client demo:demo-secret --latency 0.2

It prints one JSON line with its URLs and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hmac
import json
import logging
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, ClassVar, Literal, NotRequired, Self, TypedDict, TypeVar, cast
from urllib.parse import parse_qsl, unquote_plus, urlsplit

__all__ = [
    "AuthMethod",
    "DevClient",
    "DevOAuthServer",
    "DevServerState",
    "IntrospectionResponse",
    "ScriptedResponse",
    "TokenResponse",
    "main",
]

logger = logging.getLogger(__name__)

AuthMethod = Literal["client_secret_basic", "client_secret_post"]
_AUTH_METHODS: tuple[AuthMethod, ...] = ("client_secret_basic", "client_secret_post")

#: Request bodies larger than this are refused: no legitimate token request comes close, and an
#: unbounded read would let a buggy client pin a thread and memory.
MAX_BODY_BYTES = 1 << 20

#: How long an idle keep-alive connection may hold its thread before it is dropped.
IDLE_CONNECTION_TIMEOUT = 60.0

_JSON_CONTENT_TYPE = "application/json;charset=UTF-8"
_NO_STORE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Cache-Control", "no-store"),
    ("Pragma", "no-cache"),
)


# --------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevClient:
    """A registered confidential client.

    Each client is pinned to one authentication method because real providers are
    (``token_endpoint_auth_method`` in dynamic registration): a client configured for Basic that
    sends its secret in the body is rejected, and grantkeeper must get that configuration right.
    """

    client_id: str
    client_secret: str
    auth_method: AuthMethod = "client_secret_basic"

    def __post_init__(self) -> None:
        """Reject an unknown method early, not on the first token request."""
        if self.auth_method not in _AUTH_METHODS:
            raise ValueError(f"unsupported auth_method {self.auth_method!r}")


class TokenResponse(TypedDict):
    """The successful token endpoint body (RFC 6749 section 5.1), as returned by ``/token``."""

    access_token: str
    token_type: str
    expires_in: int
    refresh_token: str
    scope: NotRequired[str]


class IntrospectionResponse(TypedDict):
    """The RFC 7662 introspection body; only ``active`` is present for inactive tokens."""

    active: bool
    client_id: NotRequired[str]
    token_type: NotRequired[Literal["access_token", "refresh_token"]]
    grant_id: NotRequired[str]
    exp: NotRequired[int]
    iat: NotRequired[int]
    scope: NotRequired[str]


@dataclass(frozen=True)
class ScriptedResponse:
    """One canned answer served instead of the next ``/token`` call's real processing.

    Why a script rather than flags: provider failures come in a sequence (a 502, then a 429, then
    success) and tests need to pin exactly which request gets which failure.

    Fields:
        status: HTTP status code sent.
        body: raw body bytes sent (nothing is added or re-encoded).
        headers: extra headers, sent verbatim. ``Content-Length`` is computed from ``body`` unless
            given here (a lying ``Content-Length`` is itself a fault worth scripting).
        delay: seconds to wait before answering, on top of the server latency; longer than the
            client timeout models a timed-out request.
        consume: if true the request is *also* processed for real first (the presented refresh
            token is rotated and consumed) and that real answer is thrown away, modelling "the
            provider rotated the token but the response was lost". If false the request failed at
            the provider's edge and nothing changed.
        truncate_at: if set, only ``body[:truncate_at]`` is sent after a ``Content-Length`` of the
            full body, then the connection is closed: a truncated response.
        disconnect: close the connection without sending anything at all.
    """

    status: int = 502
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    consume: bool = False
    truncate_at: int | None = None
    disconnect: bool = False

    def __post_init__(self) -> None:
        """Validate now so a bad script fails in the test that wrote it, not in a handler."""
        if not 100 <= self.status <= 999:
            raise ValueError(f"status must be a three-digit HTTP status, got {self.status}")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")
        if self.truncate_at is not None and not 0 <= self.truncate_at <= len(self.body):
            raise ValueError("truncate_at must be within the body")

    # Convenience constructors for the failures real providers produce.

    @classmethod
    def html_error(
        cls, status: int = 502, *, consume: bool = False, delay: float = 0.0
    ) -> ScriptedResponse:
        """An HTML error page from a load balancer or CDN in front of the provider."""
        phrase = _reason(status)
        page = (
            f"<html><head><title>{status} {phrase}</title></head>"
            f"<body><center><h1>{status} {phrase}</h1></center><hr><center>nginx</center>"
            "</body></html>\n"
        ).encode()
        return cls(
            status=status,
            body=page,
            headers={"Content-Type": "text/html"},
            consume=consume,
            delay=delay,
        )

    @classmethod
    def rate_limited(
        cls, retry_after: int = 30, *, status: int = 429, consume: bool = False
    ) -> ScriptedResponse:
        """A 429 (or 503) with ``Retry-After`` in seconds, as throttling providers send."""
        body = json.dumps({"error": "rate_limited", "error_description": "slow down"}).encode()
        return cls(
            status=status,
            body=body,
            headers={"Content-Type": _JSON_CONTENT_TYPE, "Retry-After": str(retry_after)},
            consume=consume,
        )

    @classmethod
    def json_body(
        cls, payload: object, *, status: int = 200, consume: bool = False
    ) -> ScriptedResponse:
        """Any JSON body, e.g. ``{"error": "invalid_grant"}`` with a 200, as some providers send."""
        return cls(
            status=status,
            body=json.dumps(payload).encode(),
            headers={"Content-Type": _JSON_CONTENT_TYPE, **dict(_NO_STORE_HEADERS)},
            consume=consume,
        )

    @classmethod
    def non_json(
        cls, text: str = "OK", *, status: int = 200, consume: bool = False
    ) -> ScriptedResponse:
        """A success status whose body is not JSON."""
        return cls(
            status=status,
            body=text.encode(),
            headers={"Content-Type": "text/plain"},
            consume=consume,
        )

    @classmethod
    def empty(cls, *, status: int = 200, consume: bool = False) -> ScriptedResponse:
        """A response with no body at all (``Content-Length: 0``)."""
        return cls(status=status, body=b"", consume=consume)

    @classmethod
    def truncated(cls, *, keep: int = 25, consume: bool = True) -> ScriptedResponse:
        """A token response cut after ``keep`` bytes, the connection then closed.

        ``consume`` defaults to true because a truncated success body means the provider did
        rotate: this is the "response lost" case in its most realistic form.
        """
        body = json.dumps(
            {
                "access_token": secrets.token_urlsafe(32),
                "token_type": "Bearer",
                "expires_in": 3600,
                "refresh_token": secrets.token_urlsafe(32),
            }
        ).encode()
        return cls(
            status=200,
            body=body,
            headers={"Content-Type": _JSON_CONTENT_TYPE},
            truncate_at=min(keep, len(body) - 1),
            consume=consume,
        )

    @classmethod
    def timeout(cls, delay: float, *, consume: bool = False) -> ScriptedResponse:
        """A real token answer withheld for ``delay`` seconds, then a 504 page.

        With ``consume=True`` and ``delay`` above the client timeout this is the classic
        "rotated, but the client gave up before the response arrived" case.
        """
        html = cls.html_error(504)
        return cls(status=504, body=html.body, headers=html.headers, delay=delay, consume=consume)

    @classmethod
    def dropped(cls, *, consume: bool = False) -> ScriptedResponse:
        """The connection is closed without a response (a reset at the edge)."""
        return cls(status=502, disconnect=True, consume=consume)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ScriptedResponse:
        """Build from the ``POST /__admin__/faults`` JSON shape.

        ``body`` is UTF-8 text; ``body_b64`` carries arbitrary bytes instead.
        """
        known = {
            "status",
            "headers",
            "body",
            "body_b64",
            "delay",
            "consume",
            "truncate_at",
            "disconnect",
        }
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown scripted response fields: {sorted(unknown)}")
        if "body" in obj and "body_b64" in obj:
            raise ValueError("give body or body_b64, not both")
        if "body_b64" in obj:
            body = base64.b64decode(_expect(obj["body_b64"], str, "body_b64"), validate=True)
        else:
            body = _expect(obj.get("body", ""), str, "body").encode()
        headers_obj = _expect(obj.get("headers", {}), dict, "headers")
        headers = {
            _expect(k, str, "header name"): _expect(v, str, "header value")
            for k, v in headers_obj.items()
        }
        truncate_at = obj.get("truncate_at")
        return cls(
            status=_expect(obj.get("status", 502), int, "status"),
            body=body,
            headers=headers,
            delay=float(_expect(obj.get("delay", 0.0), (int, float), "delay")),
            consume=_expect(obj.get("consume", False), bool, "consume"),
            truncate_at=None if truncate_at is None else _expect(truncate_at, int, "truncate_at"),
            disconnect=_expect(obj.get("disconnect", False), bool, "disconnect"),
        )


_T = TypeVar("_T")


def _expect(value: object, kind: type[_T] | tuple[type[Any], ...], name: str) -> _T:
    """Type-check one admin JSON value; bool is not accepted where a number is expected."""
    if isinstance(value, bool) and kind in (int, (int, float)):
        raise TypeError(f"{name} must be a number")
    if not isinstance(value, kind):
        raise TypeError(f"{name} has the wrong type")
    return cast(_T, value)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# --------------------------------------------------------------------------------------------
# State: grants, tokens, counters and faults, all behind one lock
# --------------------------------------------------------------------------------------------


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error answer; carried up to the handler that renders it."""

    def __init__(
        self,
        error: str,
        description: str,
        *,
        status: int = 400,
        www_authenticate: bool = False,
    ) -> None:
        """Remember what to render; ``www_authenticate`` adds the Basic challenge of a 401."""
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.www_authenticate = www_authenticate


@dataclass(slots=True)
class _Grant:
    grant_id: str
    client_id: str
    scope: str | None
    access_ttl: int
    refresh_token: str
    access_tokens: set[str] = field(default_factory=set)
    consumed: set[str] = field(default_factory=set)


@dataclass(slots=True, frozen=True)
class _AccessRecord:
    grant_id: str
    iat: int
    exp: int
    scope: str | None


_COUNTERS = (
    "token_requests",
    "refresh_ok",
    "refresh_failed",
    "reuse_detections",
    "revocations",
    "grants_revoked",
    "grants_minted",
    "client_auth_failures",
    "introspections",
    "scripted_served",
)


class DevServerState:
    """Everything the server knows, guarded by one lock.

    Why one lock: rotation, reuse detection and revocation each touch several indexes at once and
    must be atomic with respect to each other, precisely because grantkeeper's tests fire
    concurrent refreshes at the same grant. The critical sections are a few dict operations, so
    a single lock costs nothing measurable next to HTTP parsing.

    Only what the protocol needs is stored: the live refresh token of each grant, the consumed
    ones (for reuse detection, dropped when the grant is revoked, as oidc-provider does), and the
    access tokens with their expiry (expired ones are pruned when their grant refreshes).
    """

    def __init__(
        self,
        clients: Sequence[DevClient],
        *,
        access_ttl: int = 3600,
        latency: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Register clients and defaults; ``clock`` is injectable so tests can expire tokens."""
        if access_ttl < 0:
            raise ValueError("access_ttl must be >= 0")
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self._lock = threading.Lock()
        self._clients: dict[str, DevClient] = {}
        for client in clients:
            if client.client_id in self._clients:
                raise ValueError(f"duplicate client_id {client.client_id!r}")
            self._clients[client.client_id] = client
        self._clock = clock
        self._access_ttl = access_ttl
        self._latency = latency
        self._script: deque[ScriptedResponse] = deque()
        self._grants: dict[str, _Grant] = {}
        self._refresh: dict[str, str] = {}  # refresh token (live or consumed) -> grant id
        self._access: dict[str, _AccessRecord] = {}
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._refresh_counts: dict[str, int] = {}

    # -- clients ------------------------------------------------------------------------------

    def client(self, client_id: str) -> DevClient | None:
        """Look a registered client up (clients are immutable after construction)."""
        return self._clients.get(client_id)

    # -- faults -------------------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """Seconds added to every ``/token`` call."""
        with self._lock:
            return self._latency

    def set_latency(self, seconds: float) -> None:
        """Change the ``/token`` latency; requests already sleeping keep their old value."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            self._latency = seconds

    def set_access_ttl(self, seconds: int) -> None:
        """Change the default access token lifetime for grants minted from now on."""
        if seconds < 0:
            raise ValueError("access_ttl must be >= 0")
        with self._lock:
            self._access_ttl = seconds

    def script(self, *responses: ScriptedResponse) -> None:
        """Queue canned answers for the next ``len(responses)`` ``/token`` calls, in order."""
        with self._lock:
            self._script.extend(responses)

    def clear_script(self) -> None:
        """Drop every queued scripted response."""
        with self._lock:
            self._script.clear()

    def scripted_pending(self) -> int:
        """How many scripted responses are still queued (tests assert the script was used)."""
        with self._lock:
            return len(self._script)

    def _take_scripted(self) -> ScriptedResponse | None:
        """Pop the next scripted response on arrival, so concurrent calls get distinct ones."""
        with self._lock:
            self._counters["token_requests"] += 1
            if not self._script:
                return None
            self._counters["scripted_served"] += 1
            return self._script.popleft()

    # -- grants -------------------------------------------------------------------------------

    def mint_grant(
        self, client_id: str, access_ttl: int | None = None, scope: str | None = None
    ) -> TokenResponse:
        """Create a grant as if the user had just completed the authorization-code flow."""
        if access_ttl is not None and access_ttl < 0:
            raise ValueError("access_ttl must be >= 0")
        if client_id not in self._clients:
            raise KeyError(f"unknown client_id {client_id!r}")
        with self._lock:
            ttl = self._access_ttl if access_ttl is None else access_ttl
            grant_id = secrets.token_urlsafe(12)
            grant = _Grant(
                grant_id=grant_id,
                client_id=client_id,
                scope=scope or None,
                access_ttl=ttl,
                refresh_token=_new_token(),
            )
            self._grants[grant_id] = grant
            self._refresh[grant.refresh_token] = grant_id
            self._refresh_counts[grant_id] = 0
            self._counters["grants_minted"] += 1
            return self._issue_access_locked(grant, grant.scope)

    def refresh(self, client_id: str, refresh_token: str, scope: str | None) -> TokenResponse:
        """Run the ``refresh_token`` grant for an authenticated client, with rotation.

        Raises ``OAuthError`` (``invalid_grant`` / ``invalid_scope``) on failure. A consumed
        token revokes its whole grant, which is the behaviour that makes concurrent refreshes of
        one grant fatal.
        """
        with self._lock:
            try:
                return self._refresh_locked(client_id, refresh_token, scope)
            except OAuthError:
                self._counters["refresh_failed"] += 1
                raise

    def _refresh_locked(
        self, client_id: str, refresh_token: str, scope: str | None
    ) -> TokenResponse:
        grant_id = self._refresh.get(refresh_token)
        grant = self._grants.get(grant_id) if grant_id is not None else None
        if grant is None:
            raise OAuthError("invalid_grant", "refresh token not found")
        if grant.client_id != client_id:
            # Not reuse: another client cannot prove possession, so the grant is left alone.
            raise OAuthError("invalid_grant", "client mismatch")
        if refresh_token != grant.refresh_token:
            self._counters["reuse_detections"] += 1
            self._revoke_grant_locked(grant)
            raise OAuthError("invalid_grant", "refresh token already used")
        if scope is not None:
            granted = set((grant.scope or "").split())
            missing = set(scope.split()) - granted
            if missing:
                raise OAuthError(
                    "invalid_scope",
                    f"refresh token missing requested scope {' '.join(sorted(missing))}",
                )
        grant.consumed.add(refresh_token)
        grant.refresh_token = _new_token()
        self._refresh[grant.refresh_token] = grant.grant_id
        self._prune_access_locked(grant)
        self._refresh_counts[grant.grant_id] = self._refresh_counts.get(grant.grant_id, 0) + 1
        self._counters["refresh_ok"] += 1
        return self._issue_access_locked(grant, scope if scope is not None else grant.scope)

    def _issue_access_locked(self, grant: _Grant, scope: str | None) -> TokenResponse:
        now = int(self._clock())
        token = _new_token()
        self._access[token] = _AccessRecord(
            grant_id=grant.grant_id, iat=now, exp=now + grant.access_ttl, scope=scope
        )
        grant.access_tokens.add(token)
        response: TokenResponse = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": grant.access_ttl,
            "refresh_token": grant.refresh_token,
        }
        if scope:
            response["scope"] = scope
        return response

    def _prune_access_locked(self, grant: _Grant) -> None:
        now = self._clock()
        expired = [t for t in grant.access_tokens if self._access[t].exp <= now]
        for token in expired:
            grant.access_tokens.discard(token)
            del self._access[token]

    def _revoke_grant_locked(self, grant: _Grant) -> None:
        for token in grant.access_tokens:
            self._access.pop(token, None)
        for token in (grant.refresh_token, *grant.consumed):
            self._refresh.pop(token, None)
        del self._grants[grant.grant_id]
        self._counters["grants_revoked"] += 1

    def revoke_grant(self, grant_id: str) -> bool:
        """Revoke a grant out of band (the user disconnected the app); false if unknown."""
        with self._lock:
            grant = self._grants.get(grant_id)
            if grant is None:
                return False
            self._revoke_grant_locked(grant)
            return True

    def revoke_token(self, client_id: str, token: str, hint: str | None) -> bool:
        """RFC 7009 revocation by an authenticated client; true if something was revoked.

        Both token kinds revoke the whole grant, as oidc-provider 9 does. A token that belongs to
        another client is refused with ``invalid_request`` (oidc-provider's default policy).
        """
        with self._lock:
            grant_id = self._find_grant_id_locked(token, hint)
            grant = self._grants.get(grant_id) if grant_id is not None else None
            if grant is None:
                return False
            if grant.client_id != client_id:
                raise OAuthError("invalid_request", "client is not authorized to revoke the token")
            self._revoke_grant_locked(grant)
            self._counters["revocations"] += 1
            return True

    def _find_grant_id_locked(self, token: str, hint: str | None) -> str | None:
        # The hint only orders the lookup (RFC 7009 section 2.1): a wrong hint must still work.
        if hint == "refresh_token":
            found = self._refresh.get(token)
            if found is None and token in self._access:
                found = self._access[token].grant_id
            return found
        if token in self._access:
            return self._access[token].grant_id
        return self._refresh.get(token)

    def introspect(self, token: str, hint: str | None = None) -> IntrospectionResponse:
        """RFC 7662 view of a token: live refresh tokens and unexpired access tokens are active."""
        with self._lock:
            self._counters["introspections"] += 1
            return self._introspect_locked(token, hint)

    def _introspect_locked(self, token: str, hint: str | None) -> IntrospectionResponse:
        inactive: IntrospectionResponse = {"active": False}
        # Tokens are unique across both kinds, so the hint cannot change the answer here.
        del hint
        record = self._access.get(token)
        if record is not None:
            grant = self._grants.get(record.grant_id)
            if grant is None or record.exp <= self._clock():
                return inactive
            result: IntrospectionResponse = {
                "active": True,
                "client_id": grant.client_id,
                "token_type": "access_token",
                "grant_id": grant.grant_id,
                "exp": record.exp,
                "iat": record.iat,
            }
            if record.scope:
                result["scope"] = record.scope
            return result
        grant_id = self._refresh.get(token)
        grant = self._grants.get(grant_id) if grant_id is not None else None
        if grant is None or grant.refresh_token != token:
            return inactive
        # Refresh tokens never expire here, so no "exp" is reported for them.
        result = {
            "active": True,
            "client_id": grant.client_id,
            "token_type": "refresh_token",
            "grant_id": grant.grant_id,
        }
        if grant.scope:
            result["scope"] = grant.scope
        return result

    def is_active(self, token: str) -> bool:
        """Whether the provider would accept this access or refresh token right now."""
        return self.introspect_quietly(token)["active"]

    def introspect_quietly(self, token: str) -> IntrospectionResponse:
        """Like ``introspect`` but not counted: for test assertions, not for traffic."""
        with self._lock:
            return self._introspect_locked(token, None)

    def grant_id_of(self, token: str) -> str | None:
        """The grant a token (access, live or consumed refresh) belongs to, if it is not revoked."""
        with self._lock:
            grant_id = self._find_grant_id_locked(token, None)
            return grant_id if grant_id in self._grants else None

    def grant_ids(self) -> list[str]:
        """Ids of every grant that is not revoked."""
        with self._lock:
            return list(self._grants)

    def refresh_count(self, grant_id: str) -> int:
        """Successful refreshes of one grant since it was minted or stats were reset.

        Tests use this to prove "each grant was refreshed exactly once" under concurrency.
        """
        with self._lock:
            return self._refresh_counts.get(grant_id, 0)

    def refresh_counts(self) -> dict[str, int]:
        """Successful refreshes per grant id (revoked grants included)."""
        with self._lock:
            return dict(self._refresh_counts)

    def stats(self) -> dict[str, int]:
        """Counters since the last reset, plus the ``active_grants`` gauge."""
        with self._lock:
            return {**self._counters, "active_grants": len(self._grants)}

    def reset_stats(self) -> None:
        """Zero every counter and per-grant refresh count; grants and tokens are untouched."""
        with self._lock:
            self._counters = dict.fromkeys(_COUNTERS, 0)
            self._refresh_counts = dict.fromkeys(self._refresh_counts, 0)

    def faults(self) -> dict[str, float | int]:
        """The fault configuration as reported by ``/__admin__/faults``."""
        with self._lock:
            return {"latency": self._latency, "scripted_pending": len(self._script)}

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1


def _new_token() -> str:
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` that tracks its connections so ``stop()`` can end them.

    Why: handler threads are daemons and keep-alive connections would otherwise keep a thread
    blocked in ``recv`` after the server is "stopped"; shutting the sockets down lets every
    thread finish, and ``stop()`` waits for that so tests leak neither threads nor sockets.
    """

    daemon_threads = True
    request_queue_size = 1024  # the default of 5 drops connections under a burst of clients
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: DevServerState, ipv6: bool) -> None:
        """Bind immediately (``port=0`` picks a free port) and remember the shared state."""
        if ipv6:
            self.address_family = socket.AF_INET6
        self.state = state
        self.stopping = threading.Event()
        self._conn_lock = threading.Condition()
        self._conns: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Register the connection before its thread starts, so ``stop()`` always sees it."""
        with self._conn_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Close the connection and wake ``stop()`` once the last one is gone."""
        super().shutdown_request(request)
        with self._conn_lock:
            self._conns.discard(request)
            self._conn_lock.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-response are routine here (timeouts are a test scenario)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            logger.debug("connection from %s ended: %r", client_address, exc)
            return
        logger.exception("devserver handler crashed for %s", client_address)

    def close_connections(self, wait: float) -> None:
        """Shut every open connection down and wait up to ``wait`` seconds for their threads."""
        with self._conn_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            deadline = time.monotonic() + wait
            while self._conns:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("%d devserver connections still open", len(self._conns))
                    return
                self._conn_lock.wait(remaining)


class _DropConnectionError(Exception):
    """Raised inside a handler to close the connection without answering."""


class _Handler(BaseHTTPRequestHandler):
    """Routes requests; all protocol decisions live in ``DevServerState``."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients pool connections, as against real providers
    server_version = "grantkeeper-devserver"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = IDLE_CONNECTION_TIMEOUT
    server: _HTTPServer

    _POST_ROUTES: ClassVar[dict[str, str]] = {
        "/token": "_token",
        "/revoke": "_revoke",
        "/introspect": "_introspect",
        "/__admin__/grants": "_admin_grants",
        "/__admin__/faults": "_admin_faults",
        "/__admin__/reset-stats": "_admin_reset_stats",
    }
    _GET_ROUTES: ClassVar[dict[str, str]] = {
        "/__admin__/stats": "_admin_stats",
        "/__admin__/refresh-counts": "_admin_refresh_counts",
        "/__admin__/faults": "_admin_get_faults",
    }

    @property
    def state(self) -> DevServerState:
        """The server's shared state."""
        return self.server.state

    def log_message(self, format: str, *args: Any) -> None:
        """Route the access log to ``logging`` at debug level instead of stderr."""
        logger.debug("%s - %s", self.address_string(), format % args)

    # -- dispatch -----------------------------------------------------------------------------

    def do_POST(self) -> None:
        """Dispatch POST routes."""
        self._dispatch(self._POST_ROUTES, "POST")

    def do_GET(self) -> None:
        """Dispatch GET routes."""
        self._dispatch(self._GET_ROUTES, "GET")

    def _dispatch(self, routes: Mapping[str, str], method: str) -> None:
        path = urlsplit(self.path).path
        name = routes.get(path)
        try:
            if name is None:
                other = self._GET_ROUTES if method == "POST" else self._POST_ROUTES
                if path in other:
                    allowed = "GET" if method == "POST" else "POST"
                    self._drain_body()
                    self._send_json(
                        405,
                        {"error": "invalid_request", "error_description": f"use {allowed}"},
                        extra=(("Allow", allowed),),
                    )
                else:
                    self._drain_body()
                    self._send_json(404, {"error": "not_found"})
                return
            getattr(self, name)()
        except OAuthError as exc:
            self._send_oauth_error(exc)
        except _DropConnectionError:
            self.close_connection = True
        except OSError:
            self.close_connection = True
            raise
        except Exception:
            logger.exception("devserver error on %s %s", method, path)
            self.close_connection = True
            self._send_json(500, {"error": "server_error"}, extra=_NO_STORE_HEADERS)

    # -- request parsing ----------------------------------------------------------------------

    def _read_body(self) -> bytes:
        """Read the body by ``Content-Length`` or chunked transfer coding, bounded."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            self.close_connection = True
            raise OAuthError("invalid_request", "bad Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise OAuthError("invalid_request", "request body too large", status=413)
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise OAuthError("invalid_request", "bad chunked encoding") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # discard trailers
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise OAuthError("invalid_request", "request body too large", status=413)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _drain_body(self) -> None:
        """Consume an unused body so the keep-alive connection stays in sync."""
        with contextlib.suppress(OAuthError):
            self._read_body()

    def _params(self, *, allow_json: bool) -> dict[str, str]:
        """Parse the body into parameters, strictly (RFC 6749 section 3.2).

        Duplicated parameters are an error and empty ones count as absent. JSON objects are
        accepted only where a real provider accepts them (Teamleader's token endpoint).
        """
        body = self._read_body()
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if allow_json and content_type == "application/json":
            return _json_params(body)
        if content_type not in ("application/x-www-form-urlencoded", "") or (
            not content_type and body
        ):
            raise OAuthError(
                "invalid_request", "only application/x-www-form-urlencoded bodies are supported"
            )
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise OAuthError("invalid_request", "body is not UTF-8") from None
        params: dict[str, str] = {}
        for key, value in pairs:
            if key in params:
                raise OAuthError("invalid_request", f"'{key}' parameter must not be repeated")
            params[key] = value
        return {k: v for k, v in params.items() if v != ""}

    def _authenticate(self, params: dict[str, str]) -> DevClient:
        """Authenticate the client with exactly one method, the one it is registered for."""
        header = self.headers.get("Authorization")
        basic: tuple[str, str] | None = None
        if header is not None:
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() == "basic":
                basic = _decode_basic(credentials.strip())
                if basic is None:
                    self._auth_failed()
                    raise OAuthError(
                        "invalid_client",
                        "malformed Basic credentials",
                        status=401,
                        www_authenticate=True,
                    )
        if basic is not None:
            if "client_secret" in params:
                raise OAuthError(
                    "invalid_request",
                    "client authentication must only be provided using one mechanism",
                )
            if params.get("client_id", basic[0]) != basic[0]:
                raise OAuthError("invalid_request", "client_id mismatch")
            client_id, secret, used = basic[0], basic[1], "client_secret_basic"
        else:
            client_id = params.get("client_id", "")
            secret = params.get("client_secret", "")
            used = "client_secret_post"
        client = self.state.client(client_id) if client_id else None
        challenge = (
            basic is not None or client is None or client.auth_method == "client_secret_basic"
        )
        if client is None or not secret:
            self._auth_failed()
            raise OAuthError(
                "invalid_client",
                "client authentication failed",
                status=401,
                www_authenticate=challenge,
            )
        if client.auth_method != used:
            self._auth_failed()
            raise OAuthError(
                "invalid_client",
                f"client is registered for {client.auth_method}, not {used}",
                status=401,
                www_authenticate=challenge,
            )
        if not hmac.compare_digest(secret.encode(), client.client_secret.encode()):
            self._auth_failed()
            raise OAuthError(
                "invalid_client",
                "client authentication failed",
                status=401,
                www_authenticate=challenge,
            )
        return client

    def _auth_failed(self) -> None:
        self.state._count("client_auth_failures")

    # -- OAuth endpoints ----------------------------------------------------------------------

    def _token(self) -> None:
        """``POST /token``: only the ``refresh_token`` grant, with faults and latency applied."""
        scripted = self.state._take_scripted()
        body_error: OAuthError | None = None
        params: dict[str, str] = {}
        try:
            params = self._params(allow_json=True)
        except OAuthError as exc:
            body_error = exc
        self._sleep(self.state.latency)
        if scripted is not None:
            if scripted.consume and body_error is None:
                with contextlib.suppress(OAuthError):
                    self._process_token(params)
            self._sleep(scripted.delay)
            self._send_scripted(scripted)
            return
        if body_error is not None:
            raise body_error
        response = self._process_token(params)
        self._send_json(200, response, extra=_NO_STORE_HEADERS)

    def _process_token(self, params: dict[str, str]) -> TokenResponse:
        client = self._authenticate(params)
        grant_type = params.get("grant_type")
        if grant_type is None:
            raise OAuthError("invalid_request", "missing required parameter 'grant_type'")
        if grant_type != "refresh_token":
            raise OAuthError(
                "unsupported_grant_type", f"unsupported grant_type requested ({grant_type})"
            )
        refresh_token = params.get("refresh_token")
        if refresh_token is None:
            self.state._count("refresh_failed")
            raise OAuthError("invalid_request", "missing required parameter 'refresh_token'")
        return self.state.refresh(client.client_id, refresh_token, params.get("scope"))

    def _revoke(self) -> None:
        """``POST /revoke`` (RFC 7009): 200 with an empty body whether or not the token existed."""
        params = self._params(allow_json=False)
        client = self._authenticate(params)
        token = params.get("token")
        if token is None:
            raise OAuthError("invalid_request", "missing required parameter 'token'")
        self.state.revoke_token(client.client_id, token, params.get("token_type_hint"))
        self._send(200, b"", extra=_NO_STORE_HEADERS)

    def _introspect(self) -> None:
        """``POST /introspect`` (RFC 7662) for any authenticated client."""
        params = self._params(allow_json=False)
        self._authenticate(params)
        token = params.get("token")
        if token is None:
            raise OAuthError("invalid_request", "missing required parameter 'token'")
        result = self.state.introspect(token, params.get("token_type_hint"))
        self._send_json(200, result, extra=_NO_STORE_HEADERS)

    # -- admin endpoints ----------------------------------------------------------------------

    def _admin_json(self) -> dict[str, Any]:
        body = self._read_body()
        try:
            obj = json.loads(body or b"{}")
        except ValueError:
            raise OAuthError("invalid_request", "admin body must be JSON") from None
        if not isinstance(obj, dict):
            raise OAuthError("invalid_request", "admin body must be a JSON object")
        return obj

    def _admin_grants(self) -> None:
        """``POST /__admin__/grants``: mint ``count`` grants, answer their token responses."""
        obj = self._admin_json()
        try:
            client_id, count, ttl, scope = _parse_mint_request(obj)
            minted = [self.state.mint_grant(client_id, ttl, scope) for _ in range(count)]
        except (ValueError, TypeError, KeyError) as exc:
            raise OAuthError("invalid_request", str(exc)) from None
        self._send_json(200, minted, extra=_NO_STORE_HEADERS)

    def _admin_faults(self) -> None:
        """``POST /__admin__/faults``: set latency, clear and/or append scripted responses."""
        obj = self._admin_json()
        try:
            latency, clear, script = _parse_faults_request(obj)
            if latency is not None:
                self.state.set_latency(latency)
        except (ValueError, TypeError) as exc:
            raise OAuthError("invalid_request", str(exc)) from None
        if clear:
            self.state.clear_script()
        self.state.script(*script)
        self._send_json(200, self.state.faults())

    def _admin_get_faults(self) -> None:
        self._send_json(200, self.state.faults())

    def _admin_stats(self) -> None:
        self._send_json(200, self.state.stats())

    def _admin_refresh_counts(self) -> None:
        self._send_json(200, self.state.refresh_counts())

    def _admin_reset_stats(self) -> None:
        self._drain_body()
        self.state.reset_stats()
        self._send_json(200, self.state.stats())

    # -- responses ----------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        """Sleep without blocking ``stop()``: a stopping server drops the connection instead."""
        if seconds > 0 and self.server.stopping.wait(seconds):
            raise _DropConnectionError

    def _send_oauth_error(self, exc: OAuthError) -> None:
        extra: list[tuple[str, str]] = list(_NO_STORE_HEADERS)
        if exc.www_authenticate:
            extra.append(("WWW-Authenticate", 'Basic realm="grantkeeper-devserver"'))
        body = {"error": exc.error, "error_description": exc.description}
        self._send_json(exc.status, body, extra=tuple(extra))

    def _send_json(
        self, status: int, payload: object, *, extra: Sequence[tuple[str, str]] = ()
    ) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, extra=(("Content-Type", _JSON_CONTENT_TYPE), *extra))

    def _send_scripted(self, scripted: ScriptedResponse) -> None:
        if scripted.disconnect:
            raise _DropConnectionError
        if scripted.truncate_at is None:
            self._send(scripted.status, scripted.body, extra=tuple(scripted.headers.items()))
            return
        self._send(
            scripted.status,
            scripted.body,
            extra=tuple(scripted.headers.items()),
            cut=scripted.truncate_at,
        )
        self.close_connection = True

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        extra: Sequence[tuple[str, str]] = (),
        cut: int | None = None,
    ) -> None:
        """Write status line, headers and body in one ``send`` (no Nagle/delayed-ACK stalls)."""
        self.log_request(status, len(body))
        lines = [
            f"HTTP/1.1 {status} {_reason(status)}",
            f"Server: {self.server_version}",
            f"Date: {self.date_time_string()}",
        ]
        has_length = False
        for name, value in extra:
            has_length = has_length or name.lower() == "content-length"
            lines.append(f"{name}: {value}")
        if not has_length:
            lines.append(f"Content-Length: {len(body)}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + (body if cut is None else body[:cut]))


def _decode_basic(credentials: str) -> tuple[str, str] | None:
    """Decode RFC 6749 section 2.3.1 Basic credentials: base64 of urlencoded id ':' secret."""
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    return unquote_plus(client_id), unquote_plus(secret)


def _parse_mint_request(obj: Mapping[str, Any]) -> tuple[str, int, int | None, str | None]:
    """Validate ``{"client_id", "count", "access_ttl"?, "scope"?}``."""
    unknown = set(obj) - {"client_id", "count", "access_ttl", "scope"}
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)}")
    client_id = _expect(obj.get("client_id"), str, "client_id")
    count = _expect(obj.get("count", 1), int, "count")
    if not 0 <= count <= 100_000:
        raise ValueError("count must be between 0 and 100000")
    ttl_obj = obj.get("access_ttl")
    ttl = None if ttl_obj is None else _expect(ttl_obj, int, "access_ttl")
    scope_obj = obj.get("scope")
    scope = None if scope_obj is None else _expect(scope_obj, str, "scope")
    return client_id, count, ttl, scope


def _parse_faults_request(
    obj: Mapping[str, Any],
) -> tuple[float | None, bool, list[ScriptedResponse]]:
    """Validate ``{"latency"?, "clear_script"?, "script"?: [...]}``."""
    unknown = set(obj) - {"latency", "script", "clear_script"}
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)}")
    script_obj = _expect(obj.get("script", []), list, "script")
    script = [ScriptedResponse.from_json(_expect(s, dict, "script entry")) for s in script_obj]
    latency_obj = obj.get("latency")
    latency = None if latency_obj is None else float(_expect(latency_obj, (int, float), "latency"))
    clear = _expect(obj.get("clear_script", False), bool, "clear_script")
    return latency, clear, script


def _json_params(body: bytes) -> dict[str, str]:
    try:
        obj = json.loads(body)
    except ValueError:
        raise OAuthError("invalid_request", "body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise OAuthError("invalid_request", "JSON body must be an object")
    params: dict[str, str] = {}
    for key, value in obj.items():
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise OAuthError("invalid_request", f"'{key}' must be a string")
        params[key] = value
    return params


# --------------------------------------------------------------------------------------------
# Public server object
# --------------------------------------------------------------------------------------------


class DevOAuthServer:
    """The local authorization server: bind, serve in a background thread, stop.

    Usage::

        with DevOAuthServer([DevClient("app", "s3cret")], latency=0.2) as server:
            grant = server.mint_grant("app")
            ...  # point grantkeeper at server.token_url
    """

    def __init__(
        self,
        clients: Sequence[DevClient],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_ttl: int = 3600,
        latency: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure only; nothing binds until ``start()`` so construction never fails on ports."""
        self.state = DevServerState(clients, access_ttl=access_ttl, latency=latency, clock=clock)
        self._host = host
        self._requested_port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns self for ``server = X(...).start()``."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        httpd = _HTTPServer((self._host, self._requested_port), self.state, ":" in self._host)
        self._httpd = httpd
        # A short poll interval keeps stop() fast; the cost is ~20 idle wakeups per second.
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"devserver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, wait: float = 5.0) -> None:
        """Stop accepting, end open connections and in-flight sleeps, close the socket.

        Idempotent. Waits up to ``wait`` seconds for handler threads so nothing outlives it.
        """
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.stopping.set()
        httpd.shutdown()
        thread.join()
        httpd.server_close()
        httpd.close_connections(wait)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        """Start if not yet started."""
        if self._httpd is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Always stop, even when the test body failed."""
        self.stop()

    # -- addresses ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with ``port=0``)."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://host:port`` without a trailing slash."""
        host = self._host
        if host in ("", "0.0.0.0"):  # noqa: S104 - compared, not bound
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def token_url(self) -> str:
        """RFC 6749 token endpoint."""
        return f"{self.base_url}/token"

    @property
    def revocation_url(self) -> str:
        """RFC 7009 revocation endpoint."""
        return f"{self.base_url}/revoke"

    @property
    def introspection_url(self) -> str:
        """RFC 7662 introspection endpoint."""
        return f"{self.base_url}/introspect"

    @property
    def admin_url(self) -> str:
        """Prefix of the ``/__admin__`` endpoints."""
        return f"{self.base_url}/__admin__"

    # -- in-process conveniences (thin wrappers over ``state``) -------------------------------

    def mint_grant(
        self, client_id: str, access_ttl: int | None = None, scope: str | None = None
    ) -> TokenResponse:
        """Create one grant and return its token response, as ``/token`` would."""
        return self.state.mint_grant(client_id, access_ttl, scope)

    def mint_grants(
        self, client_id: str, count: int, access_ttl: int | None = None, scope: str | None = None
    ) -> list[TokenResponse]:
        """Create ``count`` grants (benchmarks need thousands)."""
        return [self.state.mint_grant(client_id, access_ttl, scope) for _ in range(count)]

    def set_latency(self, seconds: float) -> None:
        """Change the latency added to every ``/token`` call."""
        self.state.set_latency(seconds)

    def script(self, *responses: ScriptedResponse) -> None:
        """Queue scripted responses for the next ``/token`` calls."""
        self.state.script(*responses)

    def stats(self) -> dict[str, int]:
        """Counters (see ``GET /__admin__/stats``)."""
        return self.state.stats()

    def reset_stats(self) -> None:
        """Zero counters and per-grant refresh counts."""
        self.state.reset_stats()

    def is_active(self, token: str) -> bool:
        """Whether an access or refresh token is currently accepted."""
        return self.state.is_active(token)

    def refresh_count(self, grant_id: str) -> int:
        """Successful refreshes of one grant."""
        return self.state.refresh_count(grant_id)

    def grant_id_of(self, token: str) -> str | None:
        """The (non-revoked) grant a token belongs to."""
        return self.state.grant_id_of(token)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_client(spec: str) -> DevClient:
    """``ID:SECRET[:METHOD]`` where METHOD is basic, post or the full RFC 7591 name."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"expected ID:SECRET[:METHOD], got {spec!r}")
    method = parts[2] if len(parts) == 3 else "basic"
    aliases: dict[str, AuthMethod] = {
        "basic": "client_secret_basic",
        "post": "client_secret_post",
        "client_secret_basic": "client_secret_basic",
        "client_secret_post": "client_secret_post",
    }
    if method not in aliases:
        raise argparse.ArgumentTypeError(f"unknown auth method {method!r} (basic or post)")
    return DevClient(parts[0], parts[1], aliases[method])


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, after printing one JSON line with the URLs on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m grantkeeper.devserver", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--client",
        action="append",
        type=_parse_client,
        metavar="ID:SECRET[:METHOD]",
        help="register a client (repeatable); METHOD is basic (default) or post",
    )
    parser.add_argument("--access-ttl", type=int, default=3600)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    clients: list[DevClient] = args.client or [DevClient("demo", "demo-secret")]
    server = DevOAuthServer(
        clients,
        host=args.host,
        port=args.port,
        access_ttl=args.access_ttl,
        latency=args.latency,
    )
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server.start()
    try:
        print(
            json.dumps(
                {
                    "base_url": server.base_url,
                    "token_url": server.token_url,
                    "revocation_url": server.revocation_url,
                    "introspection_url": server.introspection_url,
                    "admin_url": server.admin_url,
                    "port": server.port,
                    "clients": [c.client_id for c in clients],
                }
            ),
            flush=True,
        )
        while not done.wait(1.0):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
