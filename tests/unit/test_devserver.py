"""Tests for grantkeeper.devserver, the local OAuth 2.0 authorization server.

Everything goes over real HTTP with httpx: the point of the devserver is to behave like a strict
provider on the wire, so the tests check status codes, headers and bodies as a client sees them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import pytest

from grantkeeper.devserver import (
    DevClient,
    DevOAuthServer,
    ScriptedResponse,
    TokenResponse,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

BASIC = DevClient("app", "s3cret")
POST = DevClient("poster", "p0st-secret", "client_secret_post")
# Characters that RFC 6749 2.3.1 requires to be form-urlencoded before base64.
ODD = DevClient("odd:id", "s3 cr%t+/=")


class FakeClock:
    """A settable clock so access token expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[DevOAuthServer]:
    with DevOAuthServer([BASIC, POST, ODD], access_ttl=600, clock=clock) as srv:
        yield srv


@pytest.fixture
def http(server: DevOAuthServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        yield client


def basic_header(client: DevClient) -> dict[str, str]:
    """Authorization header built the RFC 6749 2.3.1 way (urlencode, then base64)."""
    raw = f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret)}"
    return {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()}


def refresh(
    http: httpx.Client, refresh_token: str, client: DevClient = BASIC, **extra: str
) -> httpx.Response:
    """One refresh_token grant request with the client's registered auth method."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    if client.auth_method == "client_secret_post":
        data |= {"client_id": client.client_id, "client_secret": client.client_secret}
        return http.post("/token", data=data)
    return http.post("/token", data=data, headers=basic_header(client))


def tokens(response: httpx.Response) -> TokenResponse:
    assert response.status_code == 200, response.text
    body: TokenResponse = response.json()
    return body


# --------------------------------------------------------------------------------------------
# Rotation and reuse detection
# --------------------------------------------------------------------------------------------


def test_refresh_rotates_both_tokens_and_consumes_the_presented_one(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """A successful refresh returns a new access and refresh token; the old refresh token dies."""
    grant = server.mint_grant("app")
    grant_id = server.grant_id_of(grant["refresh_token"])
    assert grant_id is not None

    response = refresh(http, grant["refresh_token"])
    new = tokens(response)

    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(new) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert new["token_type"] == "Bearer"
    assert new["expires_in"] == 600
    assert new["refresh_token"] != grant["refresh_token"]
    assert new["access_token"] != grant["access_token"]
    assert not server.is_active(grant["refresh_token"])
    assert server.is_active(new["refresh_token"])
    assert server.is_active(new["access_token"])
    assert server.refresh_count(grant_id) == 1
    assert server.stats()["refresh_ok"] == 1


def test_reusing_a_consumed_refresh_token_revokes_the_whole_grant(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Presenting a consumed token answers invalid_grant and kills even the newest tokens."""
    grant = server.mint_grant("app")
    first = tokens(refresh(http, grant["refresh_token"]))
    second = tokens(refresh(http, first["refresh_token"]))

    reused = refresh(http, grant["refresh_token"])

    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    for token in (second["access_token"], second["refresh_token"], first["access_token"]):
        assert not server.is_active(token)
    assert refresh(http, second["refresh_token"]).json()["error"] == "invalid_grant"
    stats = server.stats()
    assert stats["reuse_detections"] == 1
    assert stats["refresh_failed"] == 2
    assert stats["active_grants"] == 0


def test_concurrent_refreshes_of_one_grant_lose_the_grant(server: DevOAuthServer) -> None:
    """Two in-flight refreshes with the same token: one wins, the other triggers revocation.

    This is the race grantkeeper's per-grant lock exists to prevent, so the devserver must make it
    fatal, whichever request the server happens to process first.
    """
    grant = server.mint_grant("app")
    server.set_latency(0.1)  # both requests are in flight before either is processed

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0) as client:
            data = {"grant_type": "refresh_token", "refresh_token": grant["refresh_token"]}
            return list(
                await asyncio.gather(
                    *(
                        client.post("/token", data=data, headers=basic_header(BASIC))
                        for _ in range(2)
                    )
                )
            )

    statuses = sorted(r.status_code for r in asyncio.run(race()))

    assert statuses == [200, 400]
    assert server.stats()["reuse_detections"] == 1
    assert server.stats()["active_grants"] == 0


# --------------------------------------------------------------------------------------------
# Client authentication and request validation
# --------------------------------------------------------------------------------------------


def test_client_secret_basic_credentials_are_form_urlencoded_before_base64(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Ids and secrets with ':' '%' '+' ' ' work only when urlencoded per RFC 6749 2.3.1."""
    grant = server.mint_grant("odd:id")

    assert refresh(http, grant["refresh_token"], ODD).status_code == 200


def test_client_secret_basic_rejects_wrong_or_missing_credentials_with_a_challenge(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Wrong secret, unknown client and no credentials all answer 401 invalid_client + Basic."""
    grant = server.mint_grant("app")
    data = {"grant_type": "refresh_token", "refresh_token": grant["refresh_token"]}

    attempts = [
        http.post("/token", data=data, auth=("app", "wrong")),
        http.post("/token", data=data, auth=("nobody", "s3cret")),
        http.post("/token", data=data),
        http.post("/token", data=data, headers={"Authorization": "Basic !!not-base64!!"}),
    ]

    for response in attempts:
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert response.headers["Cache-Control"] == "no-store"
    assert server.is_active(grant["refresh_token"])  # failed auth never touches the grant
    assert server.stats()["client_auth_failures"] == 4


def test_client_secret_post_works_and_each_client_is_pinned_to_its_method(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """A post client authenticates in the body; using the other method is invalid_client."""
    post_grant = server.mint_grant("poster")
    basic_grant = server.mint_grant("app")

    assert refresh(http, post_grant["refresh_token"], POST).status_code == 200

    wrong_secret = http.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": basic_grant["refresh_token"],
            "client_id": "poster",
            "client_secret": "nope",
        },
    )
    basic_client_using_post = http.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": basic_grant["refresh_token"],
            "client_id": "app",
            "client_secret": "s3cret",
        },
    )
    post_client_using_basic = http.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": "x"},
        headers=basic_header(POST),
    )
    for response in (wrong_secret, basic_client_using_post, post_client_using_basic):
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"


def test_using_two_authentication_mechanisms_at_once_is_invalid_request(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """RFC 6749 2.3: a client must not use more than one authentication method per request."""
    grant = server.mint_grant("app")

    response = http.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": grant["refresh_token"],
            "client_secret": "s3cret",
        },
        headers=basic_header(BASIC),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_json_request_body_is_accepted_on_the_token_endpoint(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Teamleader-style clients send JSON; the token endpoint accepts it like a form."""
    grant = server.mint_grant("poster")

    response = http.post(
        "/token",
        json={
            "grant_type": "refresh_token",
            "refresh_token": grant["refresh_token"],
            "client_id": "poster",
            "client_secret": "p0st-secret",
        },
    )

    assert tokens(response)["refresh_token"] != grant["refresh_token"]


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        ({"refresh_token": "x"}, 400, "invalid_request"),
        ({"grant_type": "authorization_code", "code": "x"}, 400, "unsupported_grant_type"),
        ({"grant_type": "refresh_token"}, 400, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "unknown"}, 400, "invalid_grant"),
    ],
)
def test_token_endpoint_validates_parameters(
    http: httpx.Client, data: dict[str, str], status: int, error: str
) -> None:
    """Missing grant_type/refresh_token, other grants and unknown tokens get RFC 6749 errors."""
    response = http.post("/token", data=data, headers=basic_header(BASIC))

    assert response.status_code == status
    assert response.json()["error"] == error
    assert response.headers["Cache-Control"] == "no-store"


def test_repeated_parameters_are_rejected(server: DevOAuthServer, http: httpx.Client) -> None:
    """RFC 6749 3.2: request parameters must not be included more than once."""
    grant = server.mint_grant("app")
    body = f"grant_type=refresh_token&refresh_token={grant['refresh_token']}&refresh_token=x"

    response = http.post(
        "/token",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded", **basic_header(BASIC)},
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_requested_scope_must_be_within_the_grant(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """A narrower scope is granted on the access token; a wider one is invalid_scope."""
    grant = server.mint_grant("app", scope="read write")
    assert grant["scope"] == "read write"

    narrowed = tokens(refresh(http, grant["refresh_token"], scope="read"))
    widened = refresh(http, narrowed["refresh_token"], scope="read admin")

    assert narrowed["scope"] == "read"
    assert widened.status_code == 400
    assert widened.json()["error"] == "invalid_scope"
    assert server.is_active(narrowed["refresh_token"])


# --------------------------------------------------------------------------------------------
# Revocation and introspection
# --------------------------------------------------------------------------------------------


def test_revoking_a_refresh_token_revokes_the_grant(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """RFC 7009: the refresh token and every access token of its grant stop working."""
    grant = server.mint_grant("app")

    response = http.post(
        "/revoke",
        data={"token": grant["refresh_token"], "token_type_hint": "refresh_token"},
        headers=basic_header(BASIC),
    )

    assert response.status_code == 200
    assert not server.is_active(grant["refresh_token"])
    assert not server.is_active(grant["access_token"])
    assert server.stats()["revocations"] == 1
    assert refresh(http, grant["refresh_token"]).json()["error"] == "invalid_grant"


def test_revoking_an_access_token_also_revokes_its_refresh_token(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Like oidc-provider 9, revoking an access token revokes its grant, refresh token included."""
    grant = server.mint_grant("poster")

    response = http.post(
        "/revoke",
        data={
            "token": grant["access_token"],
            "client_id": "poster",
            "client_secret": "p0st-secret",
        },
    )

    assert response.status_code == 200
    assert not server.is_active(grant["access_token"])
    assert not server.is_active(grant["refresh_token"])


def test_revocation_of_unknown_or_foreign_tokens(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Unknown tokens answer 200 (RFC 7009 2.2); another client's token is refused untouched."""
    foreign = server.mint_grant("poster")

    unknown = http.post("/revoke", data={"token": "never-issued"}, headers=basic_header(BASIC))
    other = http.post(
        "/revoke", data={"token": foreign["refresh_token"]}, headers=basic_header(BASIC)
    )
    unauthenticated = http.post("/revoke", data={"token": foreign["refresh_token"]})

    assert unknown.status_code == 200
    assert other.status_code == 400
    assert other.json()["error"] == "invalid_request"
    assert unauthenticated.status_code == 401
    assert server.is_active(foreign["refresh_token"])
    assert server.stats()["revocations"] == 0


def test_introspection_reports_token_kind_client_grant_and_expiry(
    server: DevOAuthServer, http: httpx.Client, clock: FakeClock
) -> None:
    """RFC 7662 shapes for access, refresh, consumed and expired tokens."""
    grant = server.mint_grant("app", access_ttl=60)
    grant_id = server.grant_id_of(grant["access_token"])

    def introspect(token: str) -> dict[str, object]:
        response = http.post("/introspect", data={"token": token}, headers=basic_header(BASIC))
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-store"
        result: dict[str, object] = response.json()
        return result

    access = introspect(grant["access_token"])
    assert access == {
        "active": True,
        "client_id": "app",
        "token_type": "access_token",
        "grant_id": grant_id,
        "exp": int(clock.now) + 60,
        "iat": int(clock.now),
    }
    assert introspect(grant["refresh_token"]) == {
        "active": True,
        "client_id": "app",
        "token_type": "refresh_token",
        "grant_id": grant_id,
    }
    clock.now += 61
    assert introspect(grant["access_token"]) == {"active": False}
    tokens(refresh(http, grant["refresh_token"]))
    assert introspect(grant["refresh_token"]) == {"active": False}
    assert introspect("garbage") == {"active": False}
    assert http.post("/introspect", data={"token": "x"}).status_code == 401


# --------------------------------------------------------------------------------------------
# Scripted faults
# --------------------------------------------------------------------------------------------


def test_scripted_error_responses_are_served_verbatim_and_consume_nothing(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """HTML 502, 429 + Retry-After, 200 with error, empty and non-JSON bodies leave the grant."""
    grant = server.mint_grant("app")
    server.script(
        ScriptedResponse.html_error(502),
        ScriptedResponse.rate_limited(retry_after=7),
        ScriptedResponse.json_body({"error": "invalid_grant"}, status=200),
        ScriptedResponse.empty(),
        ScriptedResponse.non_json("<html>maintenance</html>"),
    )

    bad_gateway = refresh(http, grant["refresh_token"])
    throttled = refresh(http, grant["refresh_token"])
    error_200 = refresh(http, grant["refresh_token"])
    empty = refresh(http, grant["refresh_token"])
    non_json = refresh(http, grant["refresh_token"])

    assert bad_gateway.status_code == 502
    assert bad_gateway.headers["Content-Type"] == "text/html"
    assert b"502 Bad Gateway" in bad_gateway.content
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "7"
    assert error_200.status_code == 200
    assert error_200.json() == {"error": "invalid_grant"}
    assert empty.status_code == 200
    assert empty.content == b""
    assert non_json.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        non_json.json()
    assert server.state.scripted_pending() == 0
    assert server.is_active(grant["refresh_token"])
    assert tokens(refresh(http, grant["refresh_token"]))["token_type"] == "Bearer"
    assert server.stats()["scripted_served"] == 5


def test_truncated_response_raises_and_the_provider_has_rotated(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Content-Length larger than the bytes sent, then close: httpx fails, the token is gone."""
    grant = server.mint_grant("app")
    grant_id = server.grant_id_of(grant["refresh_token"])
    assert grant_id is not None
    server.script(ScriptedResponse.truncated())

    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, grant["refresh_token"])

    assert not server.is_active(grant["refresh_token"])
    assert server.refresh_count(grant_id) == 1
    # Retrying with the old token is now reuse, and loses the grant: exactly the danger.
    assert refresh(http, grant["refresh_token"]).json()["error"] == "invalid_grant"
    assert server.stats()["reuse_detections"] == 1


def test_timeout_with_consume_rotates_while_the_client_gives_up(server: DevOAuthServer) -> None:
    """A delay longer than the client timeout with consume=True: rotated but never delivered."""
    grant = server.mint_grant("app")
    server.script(ScriptedResponse.timeout(1.0, consume=True))

    with (
        httpx.Client(base_url=server.base_url, timeout=0.2) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        refresh(impatient, grant["refresh_token"])

    assert not server.is_active(grant["refresh_token"])
    assert server.stats()["refresh_ok"] == 1


def test_dropped_connection_without_consume_keeps_the_token(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """A connection closed at the edge without consume leaves the refresh token usable."""
    grant = server.mint_grant("app")
    server.script(ScriptedResponse.dropped())

    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, grant["refresh_token"])

    assert server.is_active(grant["refresh_token"])
    assert refresh(http, grant["refresh_token"]).status_code == 200


def test_scripted_response_validates_its_fields() -> None:
    """Bad scripts fail where they are written, not inside a server thread."""
    with pytest.raises(ValueError, match="truncate_at"):
        ScriptedResponse(body=b"abc", truncate_at=9)
    with pytest.raises(ValueError, match="status"):
        ScriptedResponse(status=42)


# --------------------------------------------------------------------------------------------
# Latency and concurrency
# --------------------------------------------------------------------------------------------


def test_latency_applies_and_concurrent_requests_overlap(server: DevOAuthServer) -> None:
    """50 concurrent refreshes with 0.2 s latency take about 0.2 s, not 50 * 0.2 s."""
    grants = server.mint_grants("app", 50)
    server.set_latency(0.2)

    async def refresh_all() -> tuple[list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=5.0, limits=limits) as c:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(
                    c.post(
                        "/token",
                        data={"grant_type": "refresh_token", "refresh_token": g["refresh_token"]},
                        headers=basic_header(BASIC),
                    )
                    for g in grants
                )
            )
            return list(responses), time.perf_counter() - started

    responses, elapsed = asyncio.run(refresh_all())

    assert all(r.status_code == 200 for r in responses)
    assert 0.2 <= elapsed < 4.0, f"{elapsed:.2f} s: requests were serialised"
    assert server.stats()["refresh_ok"] == 50


def test_latency_only_delays_the_token_endpoint(server: DevOAuthServer, http: httpx.Client) -> None:
    """Admin and introspection calls stay fast so tests can observe a slow provider."""
    server.set_latency(0.3)
    started = time.perf_counter()

    http.get("/__admin__/stats").raise_for_status()

    assert time.perf_counter() - started < 0.25


# --------------------------------------------------------------------------------------------
# Admin endpoints
# --------------------------------------------------------------------------------------------


def test_admin_endpoints_mint_grants_set_faults_and_report_stats(
    server: DevOAuthServer, http: httpx.Client
) -> None:
    """Out-of-process users (benchmarks) drive everything through /__admin__ JSON."""
    minted = http.post("/__admin__/grants", json={"client_id": "app", "count": 3, "access_ttl": 5})
    assert minted.status_code == 200
    grants = minted.json()
    assert len(grants) == 3
    assert all(g["expires_in"] == 5 and g["token_type"] == "Bearer" for g in grants)
    assert http.post("/__admin__/grants", json={"client_id": "ghost"}).status_code == 400

    faults = http.post(
        "/__admin__/faults",
        json={
            "latency": 0.0,
            "script": [
                {"status": 503, "headers": {"Retry-After": "2"}, "body": "down"},
                {"status": 200, "body": "{}", "truncate_at": 1, "consume": True},
            ],
        },
    )
    assert faults.json() == {"latency": 0.0, "scripted_pending": 2}
    first = refresh(http, grants[0]["refresh_token"])
    assert (first.status_code, first.text, first.headers["Retry-After"]) == (503, "down", "2")
    with pytest.raises(httpx.RemoteProtocolError):
        refresh(http, grants[0]["refresh_token"])
    assert not server.is_active(grants[0]["refresh_token"])
    assert http.post("/__admin__/faults", json={"script": [{"stauts": 1}]}).status_code == 400

    stats = http.get("/__admin__/stats").json()
    assert stats["token_requests"] == 2
    assert stats["scripted_served"] == 2
    assert stats["refresh_ok"] == 1
    assert stats["active_grants"] == 3
    assert sum(http.get("/__admin__/refresh-counts").json().values()) == 1

    reset = http.post("/__admin__/reset-stats").json()
    assert reset["token_requests"] == 0
    assert reset["active_grants"] == 3
    assert http.get("/__admin__/nope").status_code == 404
    assert http.get("/token").status_code == 405


def test_command_line_server_prints_its_urls_and_stops_on_sigterm() -> None:
    """``python -m grantkeeper.devserver`` is how benchmarks run it in a separate process."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "grantkeeper.devserver",
            "--client",
            "bench:secret:post",
            "--access-ttl",
            "90",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        with httpx.Client(timeout=5.0) as client:
            minted = client.post(
                info["base_url"] + "/__admin__/grants", json={"client_id": "bench", "count": 1}
            ).json()
            response = client.post(
                info["token_url"],
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": minted[0]["refresh_token"],
                    "client_id": "bench",
                    "client_secret": "secret",
                },
            )
        assert response.status_code == 200
        assert response.json()["expires_in"] == 90
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
