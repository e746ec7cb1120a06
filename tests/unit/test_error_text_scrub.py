"""A provider whose error_description quotes the token it was sent: the revocation answer and a
``partial`` audit event with nested details never pass the token on (found by the no-leak
end-to-end test, tests/e2e/test_no_secret_leaks.py)."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import httpx
from sqlalchemy import create_engine, select

from config.logging import secrets_held
from grantkeeper.audit import Auditor
from grantkeeper.models import audit_events, metadata
from grantkeeper.oauth import OAuthClient, ProviderEndpoint, revoke_token


def _careless_provider(request: httpx.Request) -> httpx.Response:
    token = dict(httpx.QueryParams(request.content.decode()))["token"]
    body = {"error": "invalid_request", "error_description": f"cannot revoke {token}"}
    return httpx.Response(400, json=body)


def test_revocation_answer_does_not_quote_the_token() -> None:
    """The detail keeps the provider's words but not the token, registered or not."""
    token = secrets.token_urlsafe(32)
    endpoint = ProviderEndpoint(
        token_url="https://provider.example/token",
        auth_method="client_secret_basic",
        client_id="client",
        client_secret=secrets.token_urlsafe(16),
        default_access_ttl=timedelta(seconds=600),
    )
    with httpx.Client(transport=httpx.MockTransport(_careless_provider)) as http:
        client = OAuthClient(http, max_response_bytes=65536, skew=timedelta(seconds=30))
        answer = revoke_token(
            client, "https://provider.example/revoke", endpoint, token, "refresh_token"
        )
    assert not answer.done
    assert "cannot revoke" in answer.detail
    assert token not in answer.detail


def test_partial_event_scrubs_nested_details() -> None:
    """A revocation's per-token answers are nested in the details of a ``partial`` event."""
    token = secrets.token_urlsafe(32)
    secrets_held.add(token)
    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    try:
        Auditor(engine, "test").emit(
            "connection.revoked",
            "partial",
            provider_answers={"refresh_token": f"HTTP 503: quoting {token}"},
            notes=[f"also {token}"],
        )
        with engine.connect() as conn:
            details = conn.execute(select(audit_events.c.details)).scalar_one()
    finally:
        engine.dispose()
    assert "quoting" in json.dumps(details)
    assert token not in json.dumps(details)
