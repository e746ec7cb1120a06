"""Integration tests of the oidc-provider test peer and its Python driver (tests/support)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests` is no package of the project's install; make `tests.support` importable when pytest
# runs without the project root on sys.path (a rootdir `pythonpath = ["."]` makes this moot).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.oidc_peer import STATS_KEYS, ClientSpec, OidcPeer  # noqa: E402

BASIC = ClientSpec("gk-basic", "basic-secret-Zx8:/+", "client_secret_basic")
POST = ClientSpec("gk-post", "post-secret-Qw3", "client_secret_post")

pytestmark = pytest.mark.timeout(120)


def _zero_stats() -> dict[str, int]:
    return dict.fromkeys(STATS_KEYS, 0)


@pytest.fixture(scope="module")
def peer() -> Iterator[OidcPeer]:
    with OidcPeer.start([BASIC, POST], access_ttl=20) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_stats(peer: OidcPeer) -> None:
    peer.reset_stats()


def test_peer_starts_and_reports_its_issuer(peer: OidcPeer) -> None:
    """The peer prints its real issuer, serves discovery for it, and stats start at zero."""
    assert peer.issuer == f"http://127.0.0.1:{peer.port}"
    assert peer.token_url == f"{peer.issuer}/token"
    assert peer.revocation_url == f"{peer.issuer}/token/revocation"
    assert peer.introspection_url == f"{peer.issuer}/token/introspection"
    assert peer.authorization_url == f"{peer.issuer}/auth"
    assert peer.returncode is None
    assert peer.stats() == _zero_stats()


@pytest.mark.parametrize("client", [BASIC, POST], ids=lambda c: c.token_endpoint_auth_method)
def test_obtain_tokens_for_each_auth_method(peer: OidcPeer, client: ClientSpec) -> None:
    """The headless code flow yields access + refresh tokens for basic and post auth,
    with offline_access really granted and the configured access token lifetime."""
    tokens = peer.obtain_tokens(client)

    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 20
    assert set(tokens["scope"].split()) == {"openid", "offline_access"}
    assert tokens["access_token"]
    assert tokens["refresh_token"]
    assert "id_token" in tokens

    access = peer.introspect(client, tokens["access_token"])
    assert access["active"] is True
    assert access["client_id"] == client.client_id
    assert access["sub"] == "alice"
    assert access["token_type"] == "Bearer"
    assert set(access["scope"].split()) == {"openid", "offline_access"}
    refresh = peer.introspect(client, tokens["refresh_token"])
    assert refresh["active"] is True
    assert refresh["client_id"] == client.client_id
    assert "token_type" not in refresh  # oidc-provider omits it for refresh tokens

    expected = _zero_stats() | {"token_requests": 1, "code_grants_ok": 1}
    assert peer.stats() == expected


def test_wrong_client_secret_is_rejected(peer: OidcPeer) -> None:
    """A refresh with a wrong client secret fails with invalid_client and counts as a failed
    refresh grant (not as reuse)."""
    tokens = peer.obtain_tokens(BASIC)
    peer.reset_stats()
    impostor = ClientSpec(BASIC.client_id, "not-the-secret", "client_secret_basic")

    status, body = peer.refresh(impostor, tokens["refresh_token"])

    assert status == 401
    assert body["error"] == "invalid_client"
    assert peer.stats() == _zero_stats() | {"token_requests": 1, "refresh_grants_failed": 1}
    assert peer.introspect(BASIC, tokens["refresh_token"])["active"] is True


@pytest.mark.parametrize("client", [BASIC, POST], ids=lambda c: c.token_endpoint_auth_method)
def test_refresh_rotates_and_old_token_then_fails(peer: OidcPeer, client: ClientSpec) -> None:
    """Each refresh returns a new refresh token; presenting the rotated one fails with
    invalid_grant, and that reuse revokes the whole grant (newest tokens go inactive)."""
    first = peer.obtain_tokens(client)
    peer.reset_stats()

    status, second = peer.refresh(client, first["refresh_token"])
    assert status == 200
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["expires_in"] == 20
    status, third = peer.refresh(client, second["refresh_token"])
    assert status == 200
    assert third["refresh_token"] not in {first["refresh_token"], second["refresh_token"]}

    assert peer.introspect(client, first["refresh_token"])["active"] is False
    assert peer.introspect(client, third["refresh_token"])["active"] is True
    assert peer.introspect(client, third["access_token"])["active"] is True
    assert peer.stats() == _zero_stats() | {"token_requests": 2, "refresh_grants_ok": 2}

    # Reuse of an already rotated refresh token: reuse detection.
    status, error = peer.refresh(client, first["refresh_token"])
    assert status == 400
    assert error["error"] == "invalid_grant"

    assert peer.introspect(client, third["access_token"])["active"] is False
    assert peer.introspect(client, third["refresh_token"])["active"] is False
    assert peer.introspect(client, second["access_token"])["active"] is False
    status, error = peer.refresh(client, third["refresh_token"])
    assert status == 400
    assert error["error"] == "invalid_grant"

    assert peer.stats() == _zero_stats() | {
        "token_requests": 4,
        "refresh_grants_ok": 2,
        "refresh_grants_failed": 2,
        "reuse_detections": 1,
        "grants_revoked": 1,
    }


def test_reuse_detection_leaves_other_grants_alone(peer: OidcPeer) -> None:
    """Reuse on one grant revokes only that grant: another grant of the same client (and
    one of another client) keeps working."""
    victim = peer.obtain_tokens(BASIC, account="bob")
    bystander = peer.obtain_tokens(BASIC, account="carol")
    other_client = peer.obtain_tokens(POST, account="bob")
    status, _ = peer.refresh(BASIC, victim["refresh_token"])
    assert status == 200
    peer.reset_stats()

    status, _ = peer.refresh(BASIC, victim["refresh_token"])
    assert status == 400

    status, fresh = peer.refresh(BASIC, bystander["refresh_token"])
    assert status == 200
    status, _ = peer.refresh(POST, other_client["refresh_token"])
    assert status == 200
    assert peer.introspect(BASIC, fresh["access_token"])["active"] is True
    assert peer.stats() == _zero_stats() | {
        "token_requests": 3,
        "refresh_grants_ok": 2,
        "refresh_grants_failed": 1,
        "reuse_detections": 1,
        "grants_revoked": 1,
    }


def test_revoking_refresh_token_kills_the_grant(peer: OidcPeer) -> None:
    """RFC 7009 revocation of a refresh token makes it and the grant's access token
    inactive, and the refresh then fails with invalid_grant (not counted as reuse)."""
    tokens = peer.obtain_tokens(POST)
    peer.reset_stats()

    assert peer.revoke(POST, tokens["refresh_token"], "refresh_token") == 200

    assert peer.introspect(POST, tokens["refresh_token"])["active"] is False
    assert peer.introspect(POST, tokens["access_token"])["active"] is False
    status, error = peer.refresh(POST, tokens["refresh_token"])
    assert status == 400
    assert error["error"] == "invalid_grant"
    # Revoking it again is a 200 no-op and counts nothing.
    assert peer.revoke(POST, tokens["refresh_token"]) == 200
    assert peer.stats() == _zero_stats() | {
        "token_requests": 1,
        "refresh_grants_failed": 1,
        "revocations": 1,
        "grants_revoked": 1,
    }


def test_revoking_access_token_revokes_the_grants_tokens(peer: OidcPeer) -> None:
    """Revoking an access token makes every token of its grant inactive, refresh token
    included (oidc-provider 9 revokes all tokens by grant id), but the Grant record itself
    survives (default revokeGrantPolicy), so no grant.revoked is counted."""
    tokens = peer.obtain_tokens(BASIC)
    peer.reset_stats()

    assert peer.revoke(BASIC, tokens["access_token"], "access_token") == 200

    assert peer.introspect(BASIC, tokens["access_token"])["active"] is False
    assert peer.introspect(BASIC, tokens["refresh_token"])["active"] is False
    status, error = peer.refresh(BASIC, tokens["refresh_token"])
    assert status == 400
    assert error["error"] == "invalid_grant"
    assert peer.stats() == _zero_stats() | {
        "token_requests": 1,
        "refresh_grants_failed": 1,
        "revocations": 1,
    }


def test_stop_is_clean_and_idempotent() -> None:
    """A second peer starts on its own port, honours access_ttl, exits 0 on SIGTERM, and
    stop() may be called again."""
    peer = OidcPeer.start([BASIC], access_ttl=5)
    try:
        assert peer.obtain_tokens(BASIC)["expires_in"] == 5
    finally:
        peer.stop()
    assert peer.returncode == 0
    peer.stop()  # a second stop is a no-op
