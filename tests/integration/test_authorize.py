"""Re-authorization (authorization code + PKCE) against the real oidc-provider peer.

The library path (``begin_authorization`` / ``complete_authorization``) and the operator CLI
(``grantkeeper connections authorize``, with its loopback callback) are driven through the
peer's real login and consent pages; the peer's counters prove how many codes were
exchanged. ``providers set-secret`` is checked at the peer too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy import text

from config.settings import Settings
from grantkeeper import repository, sealing
from grantkeeper.authorize import (
    PENDING_SCOPE,
    PENDING_TTL_SECONDS,
    VERIFIER_FIELD,
    AuthorizationRefused,
    begin_authorization,
    complete_authorization,
)
from grantkeeper.connections import ProviderSpec, add_provider, import_connection
from grantkeeper.crypto import associated_data
from grantkeeper.errors import ConfigurationError, PermanentProviderError
from grantkeeper.refresh import Outcome, RefreshService
from grantkeeper.runtime import Runtime
from tests.support.oidc_peer import ClientSpec, OidcPeer, free_port, play_browser
from tests.support.processes import settings_env

pytestmark = pytest.mark.timeout(180)

GRANTKEEPER = Path(sys.executable).parent / "grantkeeper"
PORT = free_port()
REDIRECT_URI = f"http://127.0.0.1:{PORT}/callback"
BASIC = ClientSpec(
    "gk-authz-basic", "authz-basic-secret-7Hq:/+", "client_secret_basic", REDIRECT_URI
)
POST = ClientSpec("gk-authz-post", "authz-post-secret-Lm2", "client_secret_post", REDIRECT_URI)
SCOPES = "openid offline_access"


@pytest.fixture(scope="module")
def peer() -> Iterator[OidcPeer]:
    with OidcPeer.start([BASIC, POST], access_ttl=120) as running:
        yield running


def _add_provider(
    runtime: Runtime, peer: OidcPeer, client: ClientSpec, secret: str | None = None
) -> str:
    add_provider(
        runtime,
        ProviderSpec(
            name="oidc",
            token_url=peer.token_url,
            revocation_url=peer.revocation_url,
            authorization_url=peer.authorization_url,
            scopes=SCOPES,
            client_id=client.client_id,
            client_secret=secret or client.client_secret,
            auth_method=client.token_endpoint_auth_method,
        ),
    )
    return "oidc"


def _params(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def _with_params(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True)) | changes
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def _connection(runtime: Runtime, connection_id: str) -> repository.ConnectionRecord:
    with runtime.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    return record


def _connection_count(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM connections")).scalar_one())


def _unseal(runtime: Runtime, record: repository.ConnectionRecord, column: str) -> str:
    ciphertext = getattr(record, column)
    assert ciphertext is not None
    return sealing.unseal(runtime.keyring, sealing.CONNECTIONS, record.id, column, ciphertext)


def _events(runtime: Runtime, event: str) -> list[dict[str, Any]]:
    with runtime.engine.connect() as conn:
        return repository.list_audit_events(conn, event=event)


def _pending_keys(runtime: Runtime) -> list[bytes]:
    return list(runtime.cache.client.scan_iter(match=f"{runtime.cache.prefix}authz:*"))


def _mark_revoked(runtime: Runtime, connection_id: str) -> None:
    """What a revocation leaves behind: status revoked, no tokens, a new version. Plain SQL,
    so this test does not depend on the revoke service."""
    with runtime.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE connections SET status = 'revoked', access_token_ct = NULL,"
                " refresh_token_ct = NULL, access_expires_at = NULL, version = version + 1"
                " WHERE id = :id"
            ),
            {"id": connection_id},
        )


# -- the library path --------------------------------------------------------------------------


@pytest.mark.parametrize("client", [BASIC, POST], ids=lambda c: c.token_endpoint_auth_method)
def test_revoked_connection_is_reauthorized(
    runtime: Runtime, peer: OidcPeer, client: ClientSpec
) -> None:
    """A revoked connection (grant revoked at the peer, tokens gone locally) goes through
    begin -> the peer's login and consent pages -> complete: it is active again, on the same
    row with a higher version and fresh tokens, and a forced refresh then works at the peer.
    The authorization URL carries PKCE S256, the provider's scopes and prompt=consent; the
    pending request in Redis holds the verifier encrypted, never the state or the verifier."""
    provider = _add_provider(runtime, peer, client)
    old = peer.obtain_tokens(client, account="alice")
    connection_id = import_connection(runtime, provider, "alice", json.dumps(old).encode())
    assert peer.revoke(client, old["refresh_token"], "refresh_token") == 200
    _mark_revoked(runtime, connection_id)
    before = _connection(runtime, connection_id)
    peer.reset_stats()

    request = begin_authorization(
        runtime, provider, redirect_uri=REDIRECT_URI, connection_id=connection_id
    )

    query = _params(request.url)
    assert request.url.startswith(peer.authorization_url + "?")
    assert query["response_type"] == "code"
    assert query["client_id"] == client.client_id
    assert query["redirect_uri"] == REDIRECT_URI
    assert query["scope"] == SCOPES
    assert query["state"] == request.state
    assert len(request.state) >= 43
    assert query["code_challenge_method"] == "S256"
    assert query["prompt"] == "consent"
    assert repr(request).count(request.state) == 0
    [key] = _pending_keys(runtime)
    state_hash = hashlib.sha256(request.state.encode()).hexdigest()
    assert key.decode() == f"{runtime.cache.prefix}authz:{state_hash}"
    assert PENDING_TTL_SECONDS - 10 < runtime.cache.client.ttl(key) <= PENDING_TTL_SECONDS
    raw = runtime.cache.client.get(key)
    assert raw is not None
    stored = json.loads(raw)
    verifier = runtime.keyring.decrypt(
        stored["code_verifier_ct"], associated_data(PENDING_SCOPE, state_hash, VERIFIER_FIELD)
    )
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    assert challenge.decode() == query["code_challenge"]
    assert verifier.encode() not in raw
    assert request.state.encode() not in raw
    assert stored["connection_id"] == connection_id

    callback = play_browser(request.url, REDIRECT_URI, account="alice")
    assert complete_authorization(runtime, _params(callback)) == connection_id

    after = _connection(runtime, connection_id)
    assert after.status == "active"
    assert after.version == before.version + 1
    assert after.failure_count == 0
    assert after.last_error_class is None
    assert after.access_expires_at is not None
    assert after.refresh_issued_at is not None
    assert after.refresh_issued_at > before.updated_at
    assert _connection_count(runtime) == 1
    assert peer.stats()["code_grants_ok"] == 1
    assert _pending_keys(runtime) == []
    new_refresh = _unseal(runtime, after, "refresh_token_ct")
    assert new_refresh != old["refresh_token"]
    assert peer.introspect(client, _unseal(runtime, after, "access_token_ct"))["active"] is True

    [authorized] = _events(runtime, "connection.authorized")
    assert authorized["connection_id"] == connection_id
    assert authorized["version"] == after.version
    assert authorized["details"]["mode"] == "reactivated"
    assert authorized["details"]["previous_status"] == "revoked"
    with runtime.engine.connect() as conn:
        trail = json.dumps(repository.list_audit_events(conn), default=str)
    assert request.state not in trail
    assert verifier not in trail
    assert _params(callback)["code"] not in trail

    result = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert result.outcome is Outcome.REFRESHED, result.error
    refreshed = _connection(runtime, connection_id)
    assert refreshed.version == after.version + 1
    assert peer.introspect(client, _unseal(runtime, refreshed, "access_token_ct"))["active"]
    assert peer.introspect(client, _unseal(runtime, refreshed, "refresh_token_ct"))["active"]
    assert peer.stats()["refresh_grants_ok"] == 1


def test_authorizing_a_new_account_creates_an_active_connection(
    runtime: Runtime, peer: OidcPeer
) -> None:
    """With ``account`` and no existing row, completion inserts a new active connection at
    version 1 whose tokens the peer honours; a second authorization of the same account
    re-activates that row (no duplicate)."""
    provider = _add_provider(runtime, peer, BASIC)

    request = begin_authorization(runtime, provider, redirect_uri=REDIRECT_URI, account="dora")
    connection_id = complete_authorization(
        runtime, _params(play_browser(request.url, REDIRECT_URI, account="dora"))
    )

    record = _connection(runtime, connection_id)
    assert (record.account, record.status, record.version) == ("dora", "active", 1)
    assert peer.introspect(BASIC, _unseal(runtime, record, "access_token_ct"))["sub"] == "dora"
    [event] = _events(runtime, "connection.authorized")
    assert event["details"]["mode"] == "new"

    again = begin_authorization(runtime, provider, redirect_uri=REDIRECT_URI, account="dora")
    assert (
        complete_authorization(
            runtime, _params(play_browser(again.url, REDIRECT_URI, account="dora"))
        )
        == connection_id
    )
    assert _connection(runtime, connection_id).version == 2
    assert _connection_count(runtime) == 1


def test_wrong_or_missing_state_is_refused_and_nothing_is_stored(
    runtime: Runtime, peer: OidcPeer
) -> None:
    """A callback whose state is not a pending one (or has none) is refused and audited,
    the code is not sent to the peer and nothing is stored; the forged callback does not use
    up the genuine pending request, which still completes afterwards."""
    provider = _add_provider(runtime, peer, BASIC)
    request = begin_authorization(runtime, provider, redirect_uri=REDIRECT_URI, account="bob")
    callback = _params(play_browser(request.url, REDIRECT_URI, account="bob"))
    peer.reset_stats()

    with pytest.raises(AuthorizationRefused) as wrong:
        complete_authorization(runtime, callback | {"state": secrets.token_urlsafe(32)})
    assert wrong.value.reason == "unknown_state"
    assert wrong.value.error_class == "authorize_refused"
    with pytest.raises(AuthorizationRefused) as missing:
        complete_authorization(runtime, {k: v for k, v in callback.items() if k != "state"})
    assert missing.value.reason == "missing_state"
    with pytest.raises(AuthorizationRefused) as mismatch:
        complete_authorization(runtime, callback, expected_state=secrets.token_urlsafe(32))
    assert mismatch.value.reason == "state_mismatch"

    assert _connection_count(runtime) == 0
    assert peer.stats()["token_requests"] == 0
    refused = _events(runtime, "connection.authorize_refused")
    assert [e["details"]["reason"] for e in refused] == [
        "unknown_state",
        "missing_state",
        "state_mismatch",
    ]
    assert all(e["outcome"] == "refused" for e in refused)

    connection_id = complete_authorization(runtime, callback, expected_state=request.state)
    assert _connection(runtime, connection_id).status == "active"


def test_replayed_callback_is_refused_and_the_code_exchanged_once(
    runtime: Runtime, peer: OidcPeer
) -> None:
    """The same callback twice: the first completes, the second is refused as an unknown
    state; the peer saw exactly one token request and one code grant, and the connection was
    not written again."""
    provider = _add_provider(runtime, peer, BASIC)
    request = begin_authorization(runtime, provider, redirect_uri=REDIRECT_URI, account="eve")
    callback = _params(play_browser(request.url, REDIRECT_URI, account="eve"))
    peer.reset_stats()

    connection_id = complete_authorization(runtime, callback)
    version = _connection(runtime, connection_id).version
    with pytest.raises(AuthorizationRefused) as replay:
        complete_authorization(runtime, callback)

    assert replay.value.reason == "unknown_state"
    stats = peer.stats()
    assert stats["code_grants_ok"] == 1
    assert stats["token_requests"] == 1
    assert stats["grants_revoked"] == 0
    assert _connection(runtime, connection_id).version == version


def test_access_denied_is_refused_with_its_code(runtime: Runtime, peer: OidcPeer) -> None:
    """The user cancels at the peer: the callback carries error=access_denied with our state.
    It is refused with that OAuth error code, audited, nothing is exchanged or stored, and the
    pending request is used up."""
    provider = _add_provider(runtime, peer, BASIC)
    request = begin_authorization(runtime, provider, redirect_uri=REDIRECT_URI, account="fay")
    callback = _params(play_browser(request.url, REDIRECT_URI, cancel=True))
    assert callback["error"] == "access_denied"
    assert callback["state"] == request.state
    peer.reset_stats()

    with pytest.raises(AuthorizationRefused) as denied:
        complete_authorization(runtime, callback)

    assert denied.value.reason == "provider_refused"
    assert denied.value.oauth_error == "access_denied"
    assert "error=access_denied" in str(denied.value)
    [event] = _events(runtime, "connection.authorize_refused")
    assert event["provider"] == "oidc"
    assert event["details"]["oauth_error"] == "access_denied"
    assert peer.stats()["token_requests"] == 0
    assert _connection_count(runtime) == 0
    assert _pending_keys(runtime) == []


def test_failed_exchange_is_reported_not_retried(runtime: Runtime, peer: OidcPeer) -> None:
    """A code the peer rejects (invalid_grant) raises the classified provider error after one
    token request, audited ``connection.authorize_failed``; the pending request is used up, so
    the same callback cannot trigger a second exchange."""
    provider = _add_provider(runtime, peer, BASIC)
    request = begin_authorization(runtime, provider, redirect_uri=REDIRECT_URI, account="gus")
    peer.reset_stats()
    callback = {"state": request.state, "code": "not-a-code-the-peer-issued"}

    with pytest.raises(PermanentProviderError) as failed:
        complete_authorization(runtime, callback)
    with pytest.raises(AuthorizationRefused) as again:
        complete_authorization(runtime, callback)

    assert failed.value.oauth_error == "invalid_grant"
    assert again.value.reason == "unknown_state"
    assert peer.stats()["token_requests"] == 1
    [event] = _events(runtime, "connection.authorize_failed")
    assert event["details"]["stage"] == "exchange"
    assert event["details"]["oauth_error"] == "invalid_grant"
    assert _connection_count(runtime) == 0


def test_expired_pending_request_is_refused(runtime: Runtime, peer: OidcPeer) -> None:
    """Once the pending request's TTL has run out, its callback is refused like an unknown
    state, without any token request."""
    provider = _add_provider(runtime, peer, BASIC)
    request = begin_authorization(runtime, provider, redirect_uri=REDIRECT_URI, account="hal")
    [key] = _pending_keys(runtime)
    runtime.cache.client.pexpire(key, 1)
    time.sleep(0.05)
    peer.reset_stats()

    with pytest.raises(AuthorizationRefused) as expired:
        complete_authorization(runtime, {"state": request.state, "code": "whatever-code"})

    assert expired.value.reason == "unknown_state"
    assert peer.stats()["token_requests"] == 0


def test_begin_needs_an_authorization_url_and_one_target(runtime: Runtime, peer: OidcPeer) -> None:
    """A provider without an authorization URL cannot be authorized, and exactly one of
    account and connection id is required: configuration errors, nothing pending."""
    add_provider(
        runtime,
        ProviderSpec(
            name="no-authz",
            token_url=peer.token_url,
            client_id=BASIC.client_id,
            client_secret=BASIC.client_secret,
        ),
    )
    with pytest.raises(ConfigurationError, match="authorization URL"):
        begin_authorization(runtime, "no-authz", redirect_uri=REDIRECT_URI, account="a")
    with pytest.raises(ConfigurationError, match="exactly one"):
        begin_authorization(runtime, "no-authz", redirect_uri=REDIRECT_URI)
    assert _pending_keys(runtime) == []


# -- the CLI -----------------------------------------------------------------------------------


def _start_authorize(settings: Settings, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    with (tmp_path / "authorize.stderr").open("w") as stderr:
        return subprocess.Popen(
            [
                str(GRANTKEEPER),
                "connections",
                "authorize",
                "--provider",
                "oidc",
                "--port",
                str(PORT),
                "--timeout",
                "60",
                "--no-browser",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=settings_env(settings),
            cwd=tmp_path,
        )


def _printed_url(process: subprocess.Popen[str], tmp_path: Path, prefix: str) -> str:
    """The authorization URL the CLI prints on stderr (waits for it)."""
    deadline = time.monotonic() + 30
    log = tmp_path / "authorize.stderr"
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line.strip()
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no authorization URL printed:\n{log.read_text()}")


def test_cli_authorize_end_to_end(
    runtime: Runtime, peer: OidcPeer, settings: Settings, tmp_path: Path
) -> None:
    """``grantkeeper connections authorize --provider oidc --account x --port P`` prints the
    URL, receives the peer's redirect on its loopback callback (really fetched here), answers
    the browser with a plain page, and prints the id of a new, active connection."""
    _add_provider(runtime, peer, BASIC)
    process = _start_authorize(settings, tmp_path, "--account", "x")
    try:
        url = _printed_url(process, tmp_path, peer.authorization_url)
        callback = play_browser(url, REDIRECT_URI, account="x")
        page = httpx.get(callback, timeout=30)
        stdout, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = (tmp_path / "authorize.stderr").read_text()

    assert process.returncode == 0, stderr
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain")
    assert "You can close this window" in page.text
    connection_id = stdout.strip()
    record = _connection(runtime, connection_id)
    assert (record.account, record.status) == ("x", "active")
    assert peer.introspect(BASIC, _unseal(runtime, record, "access_token_ct"))["active"] is True
    assert _params(callback)["code"] not in stderr
    assert _pending_keys(runtime) == []


def test_cli_refuses_a_callback_with_a_wrong_state(
    runtime: Runtime, peer: OidcPeer, settings: Settings, tmp_path: Path
) -> None:
    """The loopback callback with a state that is not the one the CLI sent gets a 400 page;
    the command exits 1 with a classified one-line error, exchanges nothing, stores nothing
    and drops its own pending request."""
    _add_provider(runtime, peer, BASIC)
    peer.reset_stats()
    process = _start_authorize(settings, tmp_path, "--account", "mallory")
    try:
        url = _printed_url(process, tmp_path, peer.authorization_url)
        callback = play_browser(url, REDIRECT_URI, account="mallory")
        page = httpx.get(_with_params(callback, state=secrets.token_urlsafe(32)), timeout=30)
        stdout, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = (tmp_path / "authorize.stderr").read_text()

    assert process.returncode == 1, stderr
    assert stdout == ""
    assert page.status_code == 400
    assert "refused" in page.text
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error (authorize_refused)"), stderr
    assert "state" in last
    assert _connection_count(runtime) == 0
    assert peer.stats()["token_requests"] == 0
    assert _pending_keys(runtime) == []
    [refused] = _events(runtime, "connection.authorize_refused")
    assert refused["details"]["reason"] == "state_mismatch"


# -- providers ---------------------------------------------------------------------------------


def _cli(
    settings: Settings, tmp_path: Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRANTKEEPER), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=settings_env(settings),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def test_providers_set_secret_rotates_the_client_secret(
    runtime: Runtime, peer: OidcPeer, settings: Settings, tmp_path: Path
) -> None:
    """``providers set-secret NAME --client-secret-stdin`` replaces a (compromised) client
    secret: stored encrypted under the primary key, audited without the secret, and the next
    refresh authenticates at the peer with it. Without ``--client-secret-stdin`` it is a
    usage error, and an unknown provider a classified error."""
    _add_provider(runtime, peer, BASIC, secret="old-compromised-secret")
    tokens = peer.obtain_tokens(BASIC, account="carol")
    connection_id = import_connection(runtime, "oidc", "carol", json.dumps(tokens).encode())

    result = _cli(
        settings,
        tmp_path,
        "providers",
        "set-secret",
        "oidc",
        "--client-secret-stdin",
        stdin=BASIC.client_secret + "\n",
    )

    assert result.returncode == 0, result.stderr
    assert BASIC.client_secret not in result.stdout + result.stderr
    with runtime.engine.connect() as conn:
        provider = repository.get_provider_by_name(conn, "oidc")
    assert provider is not None
    assert provider.client_secret_ct.startswith(f"gk1.{runtime.keyring.primary_id}.")
    secret = sealing.unseal(
        runtime.keyring,
        sealing.PROVIDERS,
        provider.id,
        sealing.CLIENT_SECRET,
        provider.client_secret_ct,
    )
    assert secret == BASIC.client_secret
    [event] = _events(runtime, "provider.secret_rotated")
    assert event["provider"] == "oidc"
    assert event["key_id"] == runtime.keyring.primary_id
    assert BASIC.client_secret not in json.dumps(event, default=str)
    refreshed = RefreshService(runtime).refresh(connection_id, reason="manual", force=True)
    assert refreshed.outcome is Outcome.REFRESHED, refreshed.error

    usage = _cli(settings, tmp_path, "providers", "set-secret", "oidc", stdin="x\n")
    assert usage.returncode == 2
    unknown = _cli(
        settings, tmp_path, "providers", "set-secret", "nope", "--client-secret-stdin", stdin="y\n"
    )
    assert unknown.returncode == 1
    assert "no provider named 'nope'" in unknown.stderr


def test_providers_add_takes_scopes(
    runtime: Runtime, peer: OidcPeer, settings: Settings, tmp_path: Path
) -> None:
    """``providers add --scopes "a b"`` stores the scopes that authorization URLs then ask
    for."""
    result = _cli(
        settings,
        tmp_path,
        "providers",
        "add",
        "scoped",
        "--token-url",
        peer.token_url,
        "--authorization-url",
        peer.authorization_url,
        "--scopes",
        SCOPES,
        "--client-id",
        BASIC.client_id,
        "--client-secret-stdin",
        stdin=BASIC.client_secret + "\n",
    )

    assert result.returncode == 0, result.stderr
    with runtime.engine.connect() as conn:
        provider = repository.get_provider_by_name(conn, "scoped")
    assert provider is not None
    assert provider.scopes == SCOPES
    request = begin_authorization(runtime, "scoped", redirect_uri=REDIRECT_URI, account="s")
    assert _params(request.url)["scope"] == SCOPES
