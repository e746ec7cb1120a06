"""Ciphertexts copied to another row or field, or with a flipped bit, are refused, audited as
tampering, never returned and never overwritten."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from grantkeeper import repository
from grantkeeper.api import TokenReader
from grantkeeper.devserver import DevOAuthServer
from grantkeeper.errors import DecryptionError
from grantkeeper.models import audit_events, connections
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime
from tests.support.dev import import_grant


def _flip(ciphertext: str) -> str:
    head, _, body = ciphertext.rpartition(".")
    middle = len(body) // 2
    swapped = "A" if body[middle] != "A" else "B"
    return f"{head}.{body[:middle]}{swapped}{body[middle + 1 :]}"


def _events(runtime: Runtime, name: str) -> list[dict[str, object]]:
    with runtime.engine.connect() as conn:
        rows = conn.execute(
            select(audit_events.c.connection_id, audit_events.c.details).where(
                audit_events.c.event == name
            )
        ).all()
    return [{"connection_id": r.connection_id, **r.details} for r in rows]


def _set(runtime: Runtime, connection_id: str, **values: object) -> None:
    with runtime.engine.begin() as conn:
        conn.execute(update(connections).where(connections.c.id == connection_id).values(**values))


def _get(runtime: Runtime, connection_id: str) -> repository.ConnectionRecord:
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    return record


def test_ciphertext_copied_to_another_row_is_refused(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """B's row holding A's access-token ciphertext does not decrypt: B's read fails with a
    classified error and a token.tampered event; A's token is never handed out for B."""
    a, grant_a = import_grant(runtime, devserver, provider_name, "a")
    b, _ = import_grant(runtime, devserver, provider_name, "b")
    _set(runtime, b, access_token_ct=_get(runtime, a).access_token_ct)
    with pytest.raises(DecryptionError) as excinfo:
        TokenReader(runtime).get(b)
    assert grant_a["access_token"] not in str(excinfo.value)
    events = _events(runtime, "token.tampered")
    assert [e["connection_id"] for e in events] == [b]


def test_ciphertext_moved_to_another_field_is_refused(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """The access-token ciphertext placed in the refresh-token column of the same row does not
    decrypt as a refresh token: the refresh fails closed without calling the provider."""
    a, _ = import_grant(runtime, devserver, provider_name, "a")
    moved = _get(runtime, a).access_token_ct
    _set(runtime, a, refresh_token_ct=moved)
    result = RefreshService(runtime).refresh(a, reason="manual", force=True)
    assert result.outcome is Outcome.FAILED
    assert result.error is not None
    assert result.error.error_class == "decryption_failed"
    assert devserver.stats()["token_requests"] == 0
    assert _get(runtime, a).refresh_token_ct == moved  # evidence kept, never overwritten
    assert [e["connection_id"] for e in _events(runtime, "token.tampered")] == [a]


def test_flipped_bit_in_database_and_cache_is_refused(
    runtime: Runtime, devserver: DevOAuthServer, provider_name: str
) -> None:
    """A flipped bit in the stored refresh token stops the refresh; a flipped bit in the
    cached access token is dropped from the cache, audited, and the valid database copy is
    served instead."""
    a, grant = import_grant(runtime, devserver, provider_name, "a")
    reader = TokenReader(runtime)
    assert reader.get(a) == grant["access_token"]  # fills the cache
    cached = runtime.cache.get(a)
    assert cached is not None
    runtime.cache.client.set(
        runtime.cache.access_key(a),
        f"{cached.version}|{int(cached.expires_at.timestamp())}|{_flip(cached.ciphertext)}",
    )
    assert reader.get(a) == grant["access_token"]
    assert [e["source"] for e in _events(runtime, "token.tampered")] == ["cache"]

    flipped = _flip(_get(runtime, a).refresh_token_ct or "")
    _set(runtime, a, refresh_token_ct=flipped)
    result = RefreshService(runtime).refresh(a, reason="manual", force=True)
    assert result.outcome is Outcome.FAILED
    assert devserver.stats()["token_requests"] == 0
    assert _get(runtime, a).refresh_token_ct == flipped
    assert len(_events(runtime, "token.tampered")) == 2
