"""Drive the oidc-provider test peer (tests/peers/oidc/server.mjs) from Python tests.

The peer is a real OAuth 2.0 authorization server: refresh tokens rotate on every use and
presenting an already-used refresh token revokes the whole grant (reuse detection).

Typical use::

    clients = [ClientSpec("gk-basic", "s3cret", "client_secret_basic")]
    with OidcPeer.start(clients, access_ttl=20) as peer:
        tokens = peer.obtain_tokens(clients[0])
        status, body = peer.refresh(clients[0], tokens["refresh_token"])

``obtain_tokens`` runs the whole authorization-code flow headlessly (devInteractions login
and consent forms, PKCE S256, ``prompt=consent`` so that ``offline_access`` is granted).
``play_browser(url, redirect_uri)`` plays only the browser's part, from any authorization URL
to the redirect back to the client, for tests whose code under test builds that URL itself.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self
from urllib.parse import parse_qs, quote, urlencode, urljoin, urlsplit

import httpx

__all__ = [
    "DEFAULT_REDIRECT_URI",
    "PEER_DIR",
    "STATS_KEYS",
    "AuthMethod",
    "ClientSpec",
    "OidcPeer",
    "OidcPeerError",
    "ensure_installed",
    "free_port",
    "play_browser",
]

PEER_DIR = Path(__file__).resolve().parents[1] / "peers" / "oidc"
DEFAULT_REDIRECT_URI = "http://127.0.0.1/cb"
STATS_KEYS = (
    "token_requests",
    "refresh_grants_ok",
    "refresh_grants_failed",
    "reuse_detections",
    "revocations",
    "code_grants_ok",
    "grants_revoked",
)

AuthMethod = Literal["client_secret_basic", "client_secret_post"]


class OidcPeerError(RuntimeError):
    """The peer could not be installed or started, or a flow against it went wrong."""


@dataclass(frozen=True)
class ClientSpec:
    """A confidential client registered at the peer (authorization_code + refresh_token)."""

    client_id: str
    client_secret: str
    token_endpoint_auth_method: AuthMethod = "client_secret_basic"
    redirect_uri: str = DEFAULT_REDIRECT_URI

    def to_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "redirect_uris": [self.redirect_uri],
        }

    def auth_kwargs(self, data: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """Return (form data, headers) carrying this client's authentication."""
        if self.token_endpoint_auth_method == "client_secret_post":
            return {**data, "client_id": self.client_id, "client_secret": self.client_secret}, {}
        # RFC 6749 2.3.1: id and secret are form-urlencoded before base64 (the peer decodes).
        raw = f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
        basic = base64.b64encode(raw.encode()).decode("ascii")
        return data, {"Authorization": f"Basic {basic}"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wanted_provider_version() -> str:
    package = json.loads((PEER_DIR / "package.json").read_text())
    version: str = package["dependencies"]["oidc-provider"]
    return version


def _installed_provider_version() -> str | None:
    installed = PEER_DIR / "node_modules" / "oidc-provider" / "package.json"
    try:
        version: str = json.loads(installed.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version


def ensure_installed(timeout: float = 300.0) -> None:
    """Run ``npm ci`` in the peer directory unless the pinned oidc-provider is installed.

    Serialised with a lock file so that parallel test processes do not race.
    """
    wanted = _wanted_provider_version()
    if _installed_provider_version() == wanted:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise OidcPeerError("npm is not on PATH; it is needed to install the oidc-provider peer")
    lock_path = Path(tempfile.gettempdir()) / "grantkeeper-oidc-peer-npm.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _installed_provider_version() == wanted:
                return
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=PEER_DIR,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0:
                raise OidcPeerError(
                    f"npm ci in {PEER_DIR} failed ({result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}"
                )
            if _installed_provider_version() != wanted:
                raise OidcPeerError(f"npm ci did not install oidc-provider {wanted}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _FormParser(HTMLParser):
    """Collect the first <form>: its action, method and named <input> values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.method = "get"
        self.fields: dict[str, str] = {}
        self._in_form = False
        self._done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form" and not self._done and self.action is None:
            self._in_form = True
            self.action = attributes.get("action", "")
            self.method = attributes.get("method", "get").lower()
        elif tag == "input" and self._in_form and "name" in attributes:
            self.fields[attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form" and self._in_form:
            self._in_form = False
            self._done = True


class _CancelLinkParser(HTMLParser):
    """Find the href of the devInteractions pages' ``[ Cancel ]`` link (the abort URL)."""

    def __init__(self) -> None:
        super().__init__()
        self.href: str | None = None
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._current = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._current is not None and self.href is None and "Cancel" in data:
            self.href = self._current

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._current = None


def play_browser(
    url: str,
    redirect_uri: str,
    *,
    account: str = "alice",
    cancel: bool = False,
    max_steps: int = 20,
    timeout: float = 10.0,
) -> str:
    """Play a user's browser from an authorization URL to the redirect back to the client.

    Follows redirects and fills in the peer's devInteractions pages by hand: logs in as
    ``account`` (any password), confirms the consent form. With ``cancel`` it follows the
    first page's ``[ Cancel ]`` link instead, so the peer redirects with
    ``error=access_denied``. Returns the absolute URL of the first redirect whose scheme, host,
    port and path are ``redirect_uri``'s (the callback with ``code``/``state`` or ``error``);
    that URL is *not* fetched, so the caller decides what to do with it.
    """
    with httpx.Client(timeout=timeout, follow_redirects=False) as browser:
        response = browser.get(url)
        for _ in range(max_steps):
            if response.is_redirect:
                target = urljoin(str(response.url), response.headers["location"])
                if _same_endpoint(target, redirect_uri):
                    return target
                response = browser.get(target)
                continue
            if response.status_code != 200:
                raise OidcPeerError(
                    f"unexpected {response.status_code} at {response.url}: {response.text}"
                )
            if cancel:
                link = _CancelLinkParser()
                link.feed(response.text)
                if link.href is None:
                    raise OidcPeerError(f"no cancel link at {response.url}")
                response = browser.get(urljoin(str(response.url), link.href))
                continue
            form = _FormParser()
            form.feed(response.text)
            if form.action is None:
                raise OidcPeerError(f"no form at {response.url}: {response.text[:500]}")
            fields = dict(form.fields)
            if "login" in fields:
                fields["login"] = account
            if "password" in fields:
                fields["password"] = "any-password"
            action = urljoin(str(response.url), form.action)
            if form.method == "post":
                response = browser.post(action, data=fields)
            else:
                response = browser.get(action, params=fields)
    raise OidcPeerError(f"authorization flow did not reach the redirect URI in {max_steps} steps")


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


def _same_endpoint(url: str, redirect_uri: str) -> bool:
    a, b = urlsplit(url), urlsplit(redirect_uri)
    return (a.scheme, a.netloc, a.path) == (b.scheme, b.netloc, b.path)


def _read_line(stream: IO[bytes], deadline: float) -> bytes | None:
    """Read one line from a pipe without blocking past ``deadline``; None on EOF/timeout."""
    fd = stream.fileno()
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buffer += chunk
    return buffer.split(b"\n", 1)[0]


class OidcPeer:
    """A running ``node server.mjs`` process (use :meth:`start`, then :meth:`stop`)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        stderr_file: IO[bytes],
        issuer: str,
        port: int,
        clients: list[ClientSpec],
    ) -> None:
        self._process = process
        self._stderr_file = stderr_file
        self._issuer = issuer
        self.port = port
        self.clients = list(clients)
        self._http = httpx.Client(timeout=10.0)

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        clients: list[ClientSpec],
        access_ttl: int = 20,
        *,
        refresh_ttl: int = 86_400,
        port: int = 0,
        startup_timeout: float = 20.0,
    ) -> OidcPeer:
        """Install the peer if needed, start it and wait for its ``{"issuer", "port"}`` line."""
        if not clients:
            raise ValueError("at least one client is needed")
        ensure_installed()
        node = shutil.which("node")
        if node is None:
            raise OidcPeerError("node is not on PATH; it is needed to run the oidc-provider peer")
        env = {
            **os.environ,
            "OIDC_PORT": str(port),
            "OIDC_ACCESS_TTL": str(access_ttl),
            "OIDC_REFRESH_TTL": str(refresh_ttl),
            "OIDC_CLIENTS": json.dumps([client.to_json() for client in clients]),
        }
        # stderr goes to a file: nobody has to drain it, and it is there for error messages.
        stderr_file = tempfile.TemporaryFile(prefix="oidc-peer-", suffix=".log")  # noqa: SIM115
        try:
            process = subprocess.Popen(
                [node, "server.mjs"],
                cwd=PEER_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
            )
        except BaseException:
            stderr_file.close()
            raise
        try:
            issuer, actual_port = cls._await_ready(process, stderr_file, startup_timeout)
        except BaseException:
            cls._terminate(process)
            stderr_file.close()
            raise
        return cls(process, stderr_file, issuer, actual_port, clients)

    @staticmethod
    def _await_ready(
        process: subprocess.Popen[bytes], stderr_file: IO[bytes], timeout: float
    ) -> tuple[str, int]:
        assert process.stdout is not None
        line = _read_line(process.stdout, time.monotonic() + timeout)
        if line is not None:
            try:
                ready = json.loads(line)
                return str(ready["issuer"]), int(ready["port"])
            except (ValueError, KeyError, TypeError):
                pass
        returncode = process.poll()
        stderr_file.seek(0)
        stderr = stderr_file.read().decode("utf-8", "replace")
        what = f"exited with code {returncode}" if returncode is not None else "did not get ready"
        raise OidcPeerError(
            f"oidc peer {what} within {timeout:.0f}s; stdout line: {line!r}\nstderr:\n{stderr}"
        )

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()

    def stop(self) -> None:
        """Terminate the peer (SIGTERM, then SIGKILL after 5 s) and release every resource."""
        self._http.close()
        self._terminate(self._process)
        self._stderr_file.close()

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    def stderr_text(self) -> str:
        """What the peer wrote to stderr so far (oidc-provider warnings, server errors)."""
        if self._stderr_file.closed:
            return ""
        self._stderr_file.seek(0)
        return self._stderr_file.read().decode("utf-8", "replace")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- endpoints -------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def token_url(self) -> str:
        return f"{self._issuer}/token"

    @property
    def revocation_url(self) -> str:
        return f"{self._issuer}/token/revocation"

    @property
    def introspection_url(self) -> str:
        return f"{self._issuer}/token/introspection"

    @property
    def authorization_url(self) -> str:
        return f"{self._issuer}/auth"

    # -- OAuth flows -----------------------------------------------------------------------

    def obtain_tokens(
        self,
        client: ClientSpec,
        scope: str = "openid offline_access",
        *,
        account: str = "alice",
    ) -> dict[str, Any]:
        """Run a headless authorization-code flow (PKCE S256) and return the token response.

        Logs in as ``account`` through the devInteractions login form, confirms the consent
        form, takes ``code`` from the redirect to the client's redirect URI (never fetched),
        checks ``state`` and exchanges the code with the client's auth method. Returns the
        token endpoint's JSON unchanged; raises OidcPeerError if it has no refresh_token.
        """
        verifier, challenge = _pkce_pair()
        state = secrets.token_urlsafe(16)
        query = urlencode(
            {
                "client_id": client.client_id,
                "response_type": "code",
                "redirect_uri": client.redirect_uri,
                "scope": scope,
                "state": state,
                "nonce": secrets.token_urlsafe(16),
                # offline_access is dropped from the request unless consent is prompted.
                "prompt": "consent",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        callback = self._authorize(client, f"{self.authorization_url}?{query}", account)
        params = {key: values[0] for key, values in parse_qs(urlsplit(callback).query).items()}
        if "error" in params:
            raise OidcPeerError(f"authorization failed: {params}")
        if params.get("state") != state:
            raise OidcPeerError(f"state mismatch in callback {callback!r}")
        if "iss" in params and params["iss"] != self._issuer:
            raise OidcPeerError(f"iss mismatch in callback {callback!r}")
        if "code" not in params:
            raise OidcPeerError(f"no code in callback {callback!r}")

        status, body = self.token_request(
            client,
            {
                "grant_type": "authorization_code",
                "code": params["code"],
                "redirect_uri": client.redirect_uri,
                "code_verifier": verifier,
            },
        )
        if status != 200:
            raise OidcPeerError(f"code exchange failed ({status}): {body}")
        if "refresh_token" not in body:
            raise OidcPeerError(f"token response has no refresh_token: {body}")
        return body

    def _authorize(self, client: ClientSpec, url: str, account: str) -> str:
        """Follow redirects and submit forms by hand until the redirect to the client."""
        return play_browser(url, client.redirect_uri, account=account)

    def token_request(self, client: ClientSpec, data: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """POST ``data`` to the token endpoint with the client's auth; (status, JSON body)."""
        form, headers = client.auth_kwargs(data)
        response = self._http.post(self.token_url, data=form, headers=headers)
        body: dict[str, Any] = response.json()
        return response.status_code, body

    def refresh(
        self, client: ClientSpec, refresh_token: str, scope: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Refresh-token grant; (status, JSON body). Rotation means a new refresh_token."""
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope is not None:
            data["scope"] = scope
        return self.token_request(client, data)

    def revoke(self, client: ClientSpec, token: str, token_type_hint: str | None = None) -> int:
        """RFC 7009 revocation; returns the HTTP status (200 even for unknown tokens)."""
        data = {"token": token}
        if token_type_hint is not None:
            data["token_type_hint"] = token_type_hint
        form, headers = client.auth_kwargs(data)
        return self._http.post(self.revocation_url, data=form, headers=headers).status_code

    def introspect(self, client: ClientSpec, token: str) -> dict[str, Any]:
        """RFC 7662 introspection as ``client``; the response JSON (``active`` true/false)."""
        form, headers = client.auth_kwargs({"token": token})
        response = self._http.post(self.introspection_url, data=form, headers=headers)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    # -- test observability ----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters from ``GET /__test__/stats`` (semantics documented in server.mjs)."""
        response = self._http.get(f"{self._issuer}/__test__/stats")
        response.raise_for_status()
        body: dict[str, int] = response.json()
        return body

    def reset_stats(self) -> None:
        """Zero all counters (``POST /__test__/reset-stats``)."""
        self._http.post(f"{self._issuer}/__test__/reset-stats").raise_for_status()
