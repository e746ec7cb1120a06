"""The HTTP side: calls to providers' token endpoints. Only this module talks to providers.

The client secret and refresh token appear in exactly one place, the request that needs them.
Responses are read with a size limit (a provider answering with megabytes is an error, not a
memory problem) and classified by :mod:`grantkeeper.token_response`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import httpx

from config.logging import REDACTED, secrets_held
from grantkeeper.errors import MalformedResponse, ProviderError, TransientProviderError
from grantkeeper.token_response import (
    TokenSet,
    classify_error_response,
    parse_retry_after,
    parse_token_response,
)

AUTH_METHODS = ("client_secret_basic", "client_secret_post")


@dataclass(frozen=True)
class ProviderEndpoint:
    """What a token request needs of a provider; the secret already decrypted."""

    token_url: str
    auth_method: str
    client_id: str
    client_secret: str
    default_access_ttl: timedelta


def basic_auth_header(client_id: str, client_secret: str) -> str:
    """RFC 6749 2.3.1: id and secret are form-urlencoded before base64."""
    pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def build_http_client(
    connect_timeout: float, read_timeout: float, max_connections: int
) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        follow_redirects=False,
        headers={"Accept": "application/json", "User-Agent": "grantkeeper/0.1"},
    )


class OAuthClient:
    def __init__(self, http: httpx.Client, *, max_response_bytes: int, skew: timedelta):
        self.http = http
        self.max_response_bytes = max_response_bytes
        self.skew = skew

    def _authenticated(
        self, endpoint: ProviderEndpoint, form: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if endpoint.auth_method == "client_secret_basic":
            headers["Authorization"] = basic_auth_header(endpoint.client_id, endpoint.client_secret)
        else:
            form = {
                **form,
                "client_id": endpoint.client_id,
                "client_secret": endpoint.client_secret,
            }
        return headers, form

    def _post(
        self, url: str, headers: dict[str, str], form: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            with self.http.stream("POST", url, data=form, headers=headers) as response:
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise MalformedResponse(
                            f"response larger than {self.max_response_bytes} bytes",
                            http_status=response.status_code,
                        )
                    chunks.append(chunk)
                return response.status_code, dict(response.headers), b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise TransientProviderError(
                f"token endpoint timed out ({type(exc).__name__})"
            ) from None
        except httpx.RemoteProtocolError:
            raise MalformedResponse("response cut short or not valid HTTP") from None
        except httpx.TransportError as exc:
            raise TransientProviderError(f"network error ({type(exc).__name__})") from None

    def refresh(self, endpoint: ProviderEndpoint, refresh_token: str) -> TokenSet:
        """One refresh_token grant. Raises a classified ProviderError on any failure."""
        return self._grant(
            endpoint, {"grant_type": "refresh_token", "refresh_token": refresh_token}
        )

    def exchange_code(
        self, endpoint: ProviderEndpoint, code: str, redirect_uri: str, code_verifier: str
    ) -> TokenSet:
        """One authorization_code grant (RFC 6749 4.1.3, PKCE RFC 7636 4.5).

        Called exactly once per code: codes are single-use, and presenting one twice makes
        providers revoke everything issued for it. A failure is raised, never retried.
        """
        return self._grant(
            endpoint,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": code_verifier,
            },
        )

    def _grant(self, endpoint: ProviderEndpoint, grant: dict[str, str]) -> TokenSet:
        headers, form = self._authenticated(endpoint, grant)
        sent_at = datetime.now(UTC)
        status, response_headers, raw = self._post(endpoint.token_url, headers, form)
        retry_after = parse_retry_after(response_headers.get("retry-after"), datetime.now(UTC))
        return parse_token_response(
            status,
            raw,
            sent_at=sent_at,
            default_ttl=endpoint.default_access_ttl,
            skew=self.skew,
            retry_after=retry_after,
        )


@dataclass(frozen=True)
class RevocationAnswer:
    """What a provider said to an RFC 7009 revocation request."""

    done: bool  # the provider no longer honours the token (or never knew it)
    http_status: int | None
    oauth_error: str | None
    detail: str


def revoke_token(
    client: OAuthClient, revocation_url: str, endpoint: ProviderEndpoint, token: str, hint: str
) -> RevocationAnswer:
    """RFC 7009: 200 means revoked (also for unknown tokens); ``unsupported_token_type`` means
    the provider cannot revoke that kind, which is final too; anything else is retried."""
    headers, form = client._authenticated(endpoint, {"token": token, "token_type_hint": hint})
    try:
        status, _, raw = client._post(revocation_url, headers, form)
    except ProviderError as exc:
        return RevocationAnswer(False, exc.http_status, None, str(exc))
    if status == 200:
        return RevocationAnswer(True, status, None, "revoked")
    error = classify_error_response(status, raw, None)
    if error.oauth_error == "unsupported_token_type":
        return RevocationAnswer(True, status, error.oauth_error, "provider cannot revoke this type")
    # The detail quotes the provider's error_description, which may quote the token it was
    # sent; it goes on to the CLI, the audit trail and pending_revocations.last_error.
    detail = secrets_held.scrub(str(error).replace(token, REDACTED))
    return RevocationAnswer(False, status, error.oauth_error, detail)
