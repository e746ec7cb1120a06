"""Registering providers and importing connections: the write paths that create rows."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from grantkeeper import repository, sealing
from grantkeeper.errors import (
    ConfigurationError,
    ConnectionNotFound,
    GrantkeeperError,
    ProviderError,
)
from grantkeeper.models import ACTIVE
from grantkeeper.oauth import AUTH_METHODS
from grantkeeper.runtime import Runtime
from grantkeeper.token_response import parse_token_response


class ImportError_(GrantkeeperError):  # noqa: N801 - avoid shadowing the builtin ImportError
    error_class = "import_refused"


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    token_url: str
    client_id: str
    client_secret: str
    auth_method: str = "client_secret_basic"
    revocation_url: str | None = None
    authorization_url: str | None = None
    scopes: str | None = None
    default_access_ttl: int | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def add_provider(rt: Runtime, spec: ProviderSpec, clock: Callable[[], datetime] = _now) -> str:
    if spec.auth_method not in AUTH_METHODS:
        raise ConfigurationError(f"auth method must be one of {', '.join(AUTH_METHODS)}")
    if not spec.token_url.startswith(("https://", "http://")):
        raise ConfigurationError("token URL must be an http(s) URL")
    if not spec.client_secret:
        raise ConfigurationError("client secret is empty")
    provider_id = str(uuid.uuid4())
    values = {
        "id": provider_id,
        "name": spec.name,
        "token_url": spec.token_url,
        "revocation_url": spec.revocation_url,
        "authorization_url": spec.authorization_url,
        "scopes": spec.scopes,
        "auth_method": spec.auth_method,
        "client_id": spec.client_id,
        "client_secret_ct": sealing.seal(
            rt.keyring, sealing.PROVIDERS, provider_id, sealing.CLIENT_SECRET, spec.client_secret
        ),
        "default_access_ttl": spec.default_access_ttl,
        "created_at": clock(),
    }
    with rt.engine.begin() as conn:
        if repository.get_provider_by_name(conn, spec.name) is not None:
            raise ConfigurationError(f"a provider named {spec.name!r} exists already")
        repository.insert_provider(conn, values)
    rt.auditor.emit(
        "provider.added",
        "ok",
        provider=spec.name,
        key_id=rt.keyring.primary_id,
        token_url=spec.token_url,
        auth_method=spec.auth_method,
        has_revocation=spec.revocation_url is not None,
    )
    return provider_id


def set_client_secret(rt: Runtime, provider_name: str, client_secret: str) -> None:
    """Replace a provider's client secret (rotated at the provider, e.g. after a compromise).

    Encrypted under the primary key, bound to the provider's row; the next token request
    uses it. Audited ``provider.secret_rotated`` (never the secret).
    """
    if not client_secret:
        raise ConfigurationError("client secret is empty")
    with rt.engine.begin() as conn:
        provider = repository.get_provider_by_name(conn, provider_name)
        if provider is None:
            raise ConnectionNotFound(f"no provider named {provider_name!r}")
        ciphertext = sealing.seal(
            rt.keyring, sealing.PROVIDERS, provider.id, sealing.CLIENT_SECRET, client_secret
        )
        if not repository.update_provider_secret(conn, provider.id, ciphertext):
            raise ConnectionNotFound(f"provider {provider_name!r} was removed")
    rt.auditor.emit(
        "provider.secret_rotated",
        "ok",
        provider=provider.name,
        key_id=rt.keyring.primary_id,
        previous_key_id=provider.client_secret_ct.split(".", 2)[1]
        if provider.client_secret_ct.count(".") >= 2
        else None,
    )


def import_connection(
    rt: Runtime,
    provider_name: str,
    account: str,
    token_response: bytes,
    clock: Callable[[], datetime] = _now,
) -> str:
    """Store the token pair of one connected account, as its token endpoint returned it.

    The response is parsed by the same code as a refresh response: the expiry is counted from
    now (the best we know about when it was issued), minus the skew allowance.
    """
    now = clock()
    with rt.engine.connect() as conn:
        provider = repository.get_provider_by_name(conn, provider_name)
    if provider is None:
        raise ConnectionNotFound(f"no provider named {provider_name!r}")
    settings = rt.settings
    ttl = provider.default_access_ttl or settings.default_access_ttl_seconds
    try:
        tokens = parse_token_response(
            200,
            token_response,
            sent_at=now,
            default_ttl=timedelta(seconds=ttl),
            skew=timedelta(seconds=settings.clock_skew_seconds),
        )
    except ProviderError as exc:
        # Same parser as for refresh responses, but no HTTP happened here: say what is wrong
        # with the input instead.
        detail = str(exc).replace("HTTP 200 with a body", "a body").replace("HTTP 200 ", "")
        raise ImportError_(f"not a usable token response: {detail}") from None
    if tokens.refresh_token is None:
        raise ImportError_("the token response has no refresh_token: nothing to keep alive")
    connection_id = str(uuid.uuid4())
    seal = rt.keyring
    values = {
        "id": connection_id,
        "provider_id": provider.id,
        "account": account,
        "status": ACTIVE,
        "version": 1,
        "access_token_ct": sealing.seal(
            seal, sealing.CONNECTIONS, connection_id, sealing.ACCESS_TOKEN, tokens.access_token
        ),
        "refresh_token_ct": sealing.seal(
            seal, sealing.CONNECTIONS, connection_id, sealing.REFRESH_TOKEN, tokens.refresh_token
        ),
        "access_expires_at": tokens.expires_at,
        "access_issued_at": now,
        "refresh_issued_at": now,
        "created_at": now,
        "updated_at": now,
    }
    with rt.engine.begin() as conn:
        if repository.find_connection(conn, provider.id, account) is not None:
            raise ImportError_(f"account {account!r} of {provider_name!r} is connected already")
        repository.insert_connection(conn, values)
    rt.auditor.emit(
        "connection.imported",
        "ok",
        connection_id=connection_id,
        provider=provider.name,
        key_id=seal.primary_id,
        version=1,
        account=account,
        access_expires_at=tokens.expires_at.isoformat(),
        expiry_defaulted=tokens.expiry_was_defaulted,
    )
    return connection_id


def reactivate_connection(
    rt: Runtime, connection_id: str, clock: Callable[[], datetime] = _now
) -> int:
    """Return a ``reauth_required`` connection to service with the tokens it still holds, after
    the cause was fixed elsewhere (typically a wrong client secret: ``invalid_client`` marks
    grants for re-authorization although the grants themselves are fine). Returns the new
    version; the caller refreshes it next, which proves (or disproves) the grant."""
    with rt.engine.begin() as conn:
        record = repository.get_connection(conn, connection_id)
        if record is None:
            raise ConnectionNotFound(f"no connection {connection_id}")
        provider = repository.get_provider(conn, record.provider_id)
        if not repository.reactivate(conn, connection_id, record.version, clock()):
            raise ImportError_(
                f"connection {connection_id} is {record.status}"
                + (" without a refresh token" if record.refresh_token_ct is None else "")
                + ": only a reauth_required connection that still holds its tokens can be"
                " reactivated; otherwise use `grantkeeper connections authorize`"
            )
    rt.auditor.emit(
        "connection.reactivated",
        "ok",
        connection_id=connection_id,
        provider=provider.name if provider else None,
        version=record.version + 1,
        previous_error_class=record.last_error_class,
    )
    return record.version + 1
