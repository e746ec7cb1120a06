"""(Re-)authorization: the OAuth 2.0 authorization-code flow with PKCE (RFC 6749 4.1, RFC 7636).

For applications that handle the provider's redirect in their own web routes::

    request = begin_authorization(rt, "teamleader", redirect_uri=CALLBACK, account="12345")
    # send the user's browser to request.url; the provider redirects back to CALLBACK
    connection_id = complete_authorization(rt, dict(callback_query_parameters))

``grantkeeper connections authorize`` (:mod:`grantkeeper.loopback`) does the same with a
loopback redirect for operators.

Safety:

- The pending request lives in Redis for :data:`PENDING_TTL_SECONDS` under
  ``{prefix}authz:{sha256(state)}``: Redis never sees the state itself, and the PKCE verifier is
  stored encrypted, bound to that hash.
- :func:`complete_authorization` deletes the pending request atomically (GETDEL) before it
  exchanges the code, so a callback is honoured at most once and a code is presented to the
  token endpoint at most once. A failed exchange is reported, never retried: codes are
  single-use and providers revoke what a replayed code issued.
- A connection that exists already is re-activated under its refresh lock with a fenced write
  (``version = version + 1``), like a refresh.
- Neither the state, the verifier nor the code is ever logged or audited; audit events carry
  ``request_id``, the first 12 hex digits of sha256(state), to tie begin and completion.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import structlog
from redis.exceptions import LockError
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from config.logging import secrets_held
from grantkeeper import repository, sealing
from grantkeeper.crypto import associated_data
from grantkeeper.errors import (
    ConfigurationError,
    ConnectionNotFound,
    FencedWrite,
    GrantkeeperError,
    LockNotAcquired,
    ProviderError,
)
from grantkeeper.models import ACTIVE
from grantkeeper.refresh import endpoint_for
from grantkeeper.repository import ConnectionRecord, ProviderRecord
from grantkeeper.runtime import Runtime
from grantkeeper.token_response import TokenSet

log = structlog.get_logger("grantkeeper.authorize")

PENDING_TTL_SECONDS = 600
# Associated data of the encrypted verifier: (table, row, column) = ("authz", sha256(state), ...)
PENDING_SCOPE = "authz"
VERIFIER_FIELD = "code_verifier"
_STORE_ATTEMPTS = 3


class AuthorizationRefused(GrantkeeperError):
    """A callback grantkeeper will not act on: no or unknown state, or the provider's error.

    ``reason`` is one of ``missing_state``, ``state_mismatch``, ``unknown_state``,
    ``malformed_request``, ``malformed_callback``, ``provider_refused``, ``missing_code``,
    ``provider_gone``, ``connection_gone``. ``oauth_error`` is the provider's ``error`` code,
    if it sent one.
    """

    error_class = "authorize_refused"

    def __init__(self, message: str, *, reason: str, oauth_error: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.oauth_error = oauth_error


class AuthorizationFailed(GrantkeeperError):
    """The code was exchanged but the result cannot be kept (e.g. no refresh token)."""

    error_class = "authorize_failed"


@dataclass(frozen=True)
class AuthorizationRequest:
    """Where to send the user's browser. ``url`` and ``state`` are bearer secrets of this
    request until it completes: hand them to the browser, never to a log."""

    url: str = field(repr=False)
    state: str = field(repr=False)
    expires_at: datetime


@dataclass(frozen=True)
class _Pending:
    provider_id: str
    redirect_uri: str
    account: str | None
    connection_id: str | None
    verifier_ct: str

    @classmethod
    def parse(cls, raw: bytes | str) -> _Pending:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("unknown pending request format")
        return cls(
            provider_id=str(data["provider_id"]),
            redirect_uri=str(data["redirect_uri"]),
            account=None if data.get("account") is None else str(data["account"]),
            connection_id=(
                None if data.get("connection_id") is None else str(data["connection_id"])
            ),
            verifier_ct=str(data["code_verifier_ct"]),
        )


def _now() -> datetime:
    return datetime.now(UTC)


def _state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def _pending_key(rt: Runtime, state_hash: str) -> str:
    return f"{rt.cache.prefix}authz:{state_hash}"


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _printable(value: str, limit: int) -> str:
    """An OAuth error code or description, as RFC 6749 allows it (printable ASCII, no quote or
    backslash), bounded: it comes from a URL anyone can craft and ends up in logs."""
    return "".join(c for c in value if " " <= c <= "~" and c not in '"\\')[:limit]


def _with_query(base: str, params: Mapping[str, str]) -> str:
    """``base`` with ``params`` added to its query; a query ``base`` has is kept (RFC 6749
    3.1), except for the parameters grantkeeper sets itself."""
    parts = urlsplit(base)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urlencode([*kept, *params.items()]), "")
    )


def _check_url(what: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"https", "http"} or not parts.netloc or parts.fragment:
        raise ConfigurationError(f"{what} must be an absolute http(s) URL without a fragment")


def begin_authorization(
    runtime: Runtime,
    provider_name: str,
    *,
    redirect_uri: str,
    account: str | None = None,
    connection_id: str | None = None,
    clock: Callable[[], datetime] = _now,
) -> AuthorizationRequest:
    """Start an authorization: the provider's authorization URL, and the pending request.

    Give ``account`` to connect an account (a new connection, or re-activate the account's
    existing one), or ``connection_id`` to re-authorize that connection. ``redirect_uri``
    must be registered at the provider; the callback it receives goes to
    :func:`complete_authorization` within :data:`PENDING_TTL_SECONDS`.
    """
    if (account is None) == (connection_id is None):
        raise ConfigurationError("give exactly one of account or connection_id")
    if account is not None and not account.strip():
        raise ConfigurationError("account is empty")
    _check_url("redirect URI", redirect_uri)
    with runtime.engine.connect() as conn:
        provider = repository.get_provider_by_name(conn, provider_name)
        if provider is None:
            raise ConnectionNotFound(f"no provider named {provider_name!r}")
        if connection_id is not None:
            record = repository.get_connection(conn, connection_id)
            if record is None:
                raise ConnectionNotFound(f"no connection {connection_id}")
            if record.provider_id != provider.id:
                raise ConfigurationError(
                    f"connection {connection_id} is not a connection of {provider_name!r}"
                )
    if not provider.authorization_url:
        raise ConfigurationError(
            f"provider {provider_name!r} has no authorization URL; register the provider with"
            " --authorization-url"
        )
    _check_url("authorization URL", provider.authorization_url)

    state = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)  # 86 characters of [A-Za-z0-9_-]: RFC 7636 4.1
    secrets_held.add(state)
    secrets_held.add(verifier)
    state_hash = _state_hash(state)
    params = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": redirect_uri,
        **({"scope": provider.scopes} if provider.scopes else {}),
        "state": state,
        "code_challenge": _s256(verifier),
        "code_challenge_method": "S256",
        # Servers ignore parameters they do not know (RFC 6749 3.1); some (oidc-provider)
        # grant offline_access, hence a refresh token, only when consent is prompted.
        "prompt": "consent",
    }
    now = clock()
    expires_at = now + timedelta(seconds=PENDING_TTL_SECONDS)
    pending = {
        "v": 1,
        "provider_id": provider.id,
        "redirect_uri": redirect_uri,
        "account": account,
        "connection_id": connection_id,
        "code_verifier_ct": runtime.keyring.encrypt(
            verifier, associated_data(PENDING_SCOPE, state_hash, VERIFIER_FIELD)
        ),
        "created_at": now.isoformat(),
    }
    stored = runtime.cache.client.set(
        _pending_key(runtime, state_hash), json.dumps(pending), ex=PENDING_TTL_SECONDS, nx=True
    )
    if not stored:  # 256 random bits collided: never in practice, but never overwrite either
        raise GrantkeeperError("could not store the pending authorization request")
    runtime.auditor.emit(
        "connection.authorize_started",
        "ok",
        connection_id=connection_id,
        provider=provider.name,
        account=account,
        request_id=state_hash[:12],
        redirect_uri=redirect_uri,
        expires_at=expires_at.isoformat(),
    )
    return AuthorizationRequest(
        url=_with_query(provider.authorization_url, params), state=state, expires_at=expires_at
    )


def cancel_authorization(runtime: Runtime, state: str) -> bool:
    """Forget a pending request (the operator gave up). False if it was used or expired."""
    state_hash = _state_hash(state)
    removed = bool(runtime.cache.client.delete(_pending_key(runtime, state_hash)))
    if removed:
        runtime.auditor.emit("connection.authorize_cancelled", "ok", request_id=state_hash[:12])
    return removed


@dataclass
class _Context:
    """What the audit events of one completion carry."""

    request_id: str | None = None
    provider: str | None = None
    connection_id: str | None = None
    account: str | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "connection_id": self.connection_id,
            "provider": self.provider,
            "account": self.account,
            "request_id": self.request_id,
        }


def _refuse(
    rt: Runtime, ctx: _Context, reason: str, message: str, oauth_error: str | None = None
) -> NoReturn:
    details: dict[str, Any] = {"reason": reason}
    if oauth_error is not None:
        details["oauth_error"] = oauth_error
    rt.auditor.emit("connection.authorize_refused", "refused", **ctx.fields(), **details)
    raise AuthorizationRefused(message, reason=reason, oauth_error=oauth_error)


def _failed(rt: Runtime, ctx: _Context, stage: str, exc: GrantkeeperError) -> None:
    details: dict[str, Any] = {
        "stage": stage,
        "error_class": exc.error_class,
        "error": str(exc),
    }
    if isinstance(exc, ProviderError):
        details["http_status"] = exc.http_status
        details["oauth_error"] = exc.oauth_error
    rt.auditor.emit("connection.authorize_failed", "failed", **ctx.fields(), **details)


def _take_pending(
    runtime: Runtime,
    ctx: _Context,
    params: Mapping[str, str],
    expected_state: str | None,
    oauth_error: str | None,
) -> tuple[_Pending, str]:
    """The pending request the callback's state names, deleted from Redis; its state hash."""
    state = params.get("state") or ""
    if not state:
        _refuse(runtime, ctx, "missing_state", "the callback has no state", oauth_error)
    if expected_state is not None and not hmac.compare_digest(
        state.encode(), expected_state.encode()
    ):
        _refuse(
            runtime,
            ctx,
            "state_mismatch",
            "the callback's state is not the one this authorization sent",
            oauth_error,
        )
    state_hash = _state_hash(state)
    ctx.request_id = state_hash[:12]
    # The one step that makes a callback count at most once: whoever deletes it, owns it.
    raw = runtime.cache.client.getdel(_pending_key(runtime, state_hash))
    if raw is None:
        _refuse(
            runtime,
            ctx,
            "unknown_state",
            "the callback's state is unknown, expired or already used: start again",
            oauth_error,
        )
    try:
        pending = _Pending.parse(raw)
    except (ValueError, KeyError, TypeError):
        _refuse(runtime, ctx, "malformed_request", "the pending request is unreadable")
    return pending, state_hash


def complete_authorization(
    runtime: Runtime,
    params: Mapping[str, str],
    *,
    expected_state: str | None = None,
    clock: Callable[[], datetime] = _now,
) -> str:
    """Finish an authorization from the callback's query parameters; the connection id.

    Refuses (:class:`AuthorizationRefused`, audited ``connection.authorize_refused``) a
    callback without a state, with a state that is unknown, expired or already used, or
    with the provider's ``error``. ``expected_state``: the state the caller began with (the
    loopback CLI knows it); a different one is refused without touching any pending request.
    Otherwise exchanges the code exactly once and stores the tokens, audited
    ``connection.authorized``; a failed exchange raises its classified error (audited
    ``connection.authorize_failed``) and is never retried: begin again.
    """
    ctx = _Context()
    error = params.get("error")
    oauth_error = _printable(error, 64) if error is not None else None
    pending, state_hash = _take_pending(runtime, ctx, params, expected_state, oauth_error)
    ctx.connection_id = pending.connection_id
    ctx.account = pending.account
    with runtime.engine.connect() as conn:
        provider = repository.get_provider(conn, pending.provider_id)
        target = (
            repository.get_connection(conn, pending.connection_id)
            if pending.connection_id is not None
            else None
        )
    ctx.provider = provider.name if provider is not None else None
    if error is not None:
        description = params.get("error_description")
        detail = f" ({_printable(description, 200)})" if description else ""
        _refuse(
            runtime,
            ctx,
            "provider_refused",
            f"the provider refused the authorization: error={oauth_error}{detail}",
            oauth_error,
        )
    if provider is None:
        _refuse(runtime, ctx, "provider_gone", "the provider was removed during the authorization")
    code = params.get("code")
    if not code:
        _refuse(runtime, ctx, "missing_code", "the callback has neither a code nor an error")
    secrets_held.add(code)
    if pending.connection_id is not None and (target is None or target.provider_id != provider.id):
        _refuse(
            runtime,
            ctx,
            "connection_gone",
            f"connection {pending.connection_id} was removed during the authorization",
        )

    tokens = _exchange(runtime, ctx, provider, pending, state_hash, code)

    try:
        connection_id, version, previous_status = _store(
            runtime, provider, pending, target, tokens, clock()
        )
    except GrantkeeperError as exc:
        _failed(runtime, ctx, "store", exc)
        raise
    except (SQLAlchemyError, redis.RedisError) as exc:
        _failed(runtime, ctx, "store", GrantkeeperError(type(exc).__name__))
        raise
    ctx.connection_id = connection_id
    runtime.auditor.emit(
        "connection.authorized",
        "ok",
        **ctx.fields(),
        key_id=runtime.keyring.primary_id,
        version=version,
        mode="new" if previous_status is None else "reactivated",
        previous_status=previous_status,
        access_expires_at=tokens.expires_at.isoformat(),
        expiry_defaulted=tokens.expiry_was_defaulted,
        scope=tokens.scope,
    )
    return connection_id


def _exchange(
    runtime: Runtime,
    ctx: _Context,
    provider: ProviderRecord,
    pending: _Pending,
    state_hash: str,
    code: str,
) -> TokenSet:
    """The one token request for this code. Never retried: a code is single-use."""
    try:
        verifier = runtime.keyring.decrypt(
            pending.verifier_ct, associated_data(PENDING_SCOPE, state_hash, VERIFIER_FIELD)
        )
        secrets_held.add(verifier)
        endpoint = endpoint_for(runtime, provider)
        tokens = runtime.oauth.exchange_code(endpoint, code, pending.redirect_uri, verifier)
    except GrantkeeperError as exc:
        _failed(runtime, ctx, "exchange", exc)
        raise
    secrets_held.add(tokens.access_token)
    secrets_held.add(tokens.refresh_token)
    if tokens.refresh_token is None:
        missing = AuthorizationFailed(
            "the provider issued no refresh token: nothing to keep alive (check the provider's"
            " scopes, e.g. offline_access)"
        )
        _failed(runtime, ctx, "exchange", missing)
        raise missing
    return tokens


def _store(
    rt: Runtime,
    provider: ProviderRecord,
    pending: _Pending,
    target: ConnectionRecord | None,
    tokens: TokenSet,
    now: datetime,
) -> tuple[str, int, str | None]:
    """(connection id, its new version, its status before: None for a new connection)."""
    if target is None:
        assert pending.account is not None  # noqa: S101 - begin_authorization sets one of them
        with rt.engine.connect() as conn:
            target = repository.find_connection(conn, provider.id, pending.account)
        if target is None:
            connection_id = str(uuid.uuid4())
            try:
                with rt.engine.begin() as conn:
                    repository.insert_connection(
                        conn, _new_connection(rt, connection_id, provider, pending, tokens, now)
                    )
            except IntegrityError:
                # Connected concurrently by someone else: re-activate that row instead.
                with rt.engine.connect() as conn:
                    target = repository.find_connection(conn, provider.id, pending.account)
                if target is None:
                    raise
            else:
                return connection_id, 1, None
    return _reactivate(rt, target.id, tokens, now)


def _new_connection(
    rt: Runtime,
    connection_id: str,
    provider: ProviderRecord,
    pending: _Pending,
    tokens: TokenSet,
    now: datetime,
) -> dict[str, Any]:
    assert tokens.refresh_token is not None  # noqa: S101 - checked by the caller
    return {
        "id": connection_id,
        "provider_id": provider.id,
        "account": pending.account,
        "status": ACTIVE,
        "version": 1,
        "access_token_ct": sealing.seal(
            rt.keyring,
            sealing.CONNECTIONS,
            connection_id,
            sealing.ACCESS_TOKEN,
            tokens.access_token,
        ),
        "refresh_token_ct": sealing.seal(
            rt.keyring,
            sealing.CONNECTIONS,
            connection_id,
            sealing.REFRESH_TOKEN,
            tokens.refresh_token,
        ),
        "access_expires_at": tokens.expires_at,
        "access_issued_at": now,
        "refresh_issued_at": now,
        "created_at": now,
        "updated_at": now,
    }


def _reactivate(
    rt: Runtime, connection_id: str, tokens: TokenSet, now: datetime
) -> tuple[str, int, str | None]:
    """New tokens for an existing connection, under its refresh lock, fenced on the version
    read under that lock: no refresh can interleave, and a writer that does not take the lock
    (a revocation) makes us re-read instead of being overwritten blindly."""
    assert tokens.refresh_token is not None  # noqa: S101 - checked by the caller
    settings = rt.settings
    # Wait out a refresh in flight: it ends within the lock's TTL. Giving up would lose the
    # tokens just issued.
    wait = max(settings.lock_wait_seconds, settings.lock_ttl_seconds)
    lock = rt.cache.lock(connection_id, settings.lock_ttl_seconds, wait)
    if not lock.acquire(blocking=True):
        raise LockNotAcquired(f"connection {connection_id} stayed locked for {wait:g} s")
    try:
        for _ in range(_STORE_ATTEMPTS):
            with rt.engine.connect() as conn:
                record = repository.get_connection(conn, connection_id)
            if record is None:
                raise ConnectionNotFound(f"connection {connection_id} was removed")
            keyring = rt.keyring
            with rt.engine.begin() as conn:
                written = repository.reauthorize_connection(
                    conn,
                    connection_id,
                    record.version,
                    access_token_ct=sealing.seal(
                        keyring,
                        sealing.CONNECTIONS,
                        connection_id,
                        sealing.ACCESS_TOKEN,
                        tokens.access_token,
                    ),
                    refresh_token_ct=sealing.seal(
                        keyring,
                        sealing.CONNECTIONS,
                        connection_id,
                        sealing.REFRESH_TOKEN,
                        tokens.refresh_token,
                    ),
                    access_expires_at=tokens.expires_at,
                    now=now,
                )
            if written:
                try:
                    rt.cache.drop(connection_id)
                except redis.RedisError:
                    log.warning("cache.drop_failed", connection_id=connection_id)
                return connection_id, record.version + 1, record.status
        raise FencedWrite(f"connection {connection_id} kept changing under the lock")
    finally:
        try:
            lock.release()
        except LockError:
            log.warning("authorize.lock_lost", connection_id=connection_id)
