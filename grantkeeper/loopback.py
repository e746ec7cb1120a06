"""The loopback redirect of ``grantkeeper connections authorize`` (RFC 8252 7.3).

A small HTTP server on ``127.0.0.1`` receives the provider's redirect at ``/callback``. The
first request there that carries a ``state`` is *the* callback: the main thread completes the
authorization with it (:func:`grantkeeper.authorize.complete_authorization`, which also checks
that the state is the one this command sent), and the browser gets a short plain-text page
saying how it went. Any later callback is turned away; requests without a state (a
``favicon.ico``, a probe) are answered and otherwise ignored.

The request line holds the code and the state, so the server logs nothing.
"""

from __future__ import annotations

import queue
import threading
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from grantkeeper.authorize import (
    AuthorizationRefused,
    begin_authorization,
    cancel_authorization,
    complete_authorization,
)
from grantkeeper.errors import ConfigurationError, GrantkeeperError
from grantkeeper.runtime import Runtime

CALLBACK_PATH = "/callback"
CLOSE = "You can close this window."
# How long the browser's request waits for the main thread's verdict (a token exchange).
_ANSWER_TIMEOUT_SECONDS = 120.0
_SENT_TIMEOUT_SECONDS = 5.0


class AuthorizationTimedOut(GrantkeeperError):
    error_class = "authorize_timeout"


@dataclass
class _Callback:
    params: dict[str, str]
    duplicated: bool
    decided: threading.Event = field(default_factory=threading.Event)
    sent: threading.Event = field(default_factory=threading.Event)
    status: int = 500
    text: str = f"grantkeeper did not finish this authorization; see its output. {CLOSE}"

    def answer(self, status: int, text: str) -> None:
        self.status, self.text = status, text
        self.decided.set()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.callbacks: queue.Queue[_Callback] = queue.Queue()
        self.taken = False
        self.taken_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # an idle (pre)connection from the browser must not hold a thread forever
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != CALLBACK_PATH:
            self._send(404, "Not found.")
            return
        values = parse_qs(parts.query, keep_blank_values=True)
        if not values.get("state", [""])[0]:
            self._send(400, "This is not an authorization callback (it has no state).")
            return
        with self.server.taken_lock:
            taken, self.server.taken = self.server.taken, True
        if taken:
            self._send(
                409, f"grantkeeper already received its callback; this one is ignored. {CLOSE}"
            )
            return
        callback = _Callback(
            params={k: v[0] for k, v in values.items()},
            duplicated=any(len(v) > 1 for v in values.values()),
        )
        self.server.callbacks.put(callback)
        callback.decided.wait(_ANSWER_TIMEOUT_SECONDS)
        try:
            self._send(callback.status, callback.text)
        finally:
            callback.sent.set()

    def do_POST(self) -> None:
        self._send(405, "Method not allowed.")

    def _send(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the request line carries the authorization code and the state."""


def run_loopback_authorization(
    runtime: Runtime,
    provider_name: str,
    *,
    account: str | None,
    connection_id: str | None,
    port: int,
    timeout: float,
    open_browser: bool,
    announce: Callable[[str, str], None],
) -> str:
    """Listen on ``http://127.0.0.1:PORT/callback``, begin the authorization, call
    ``announce(url, redirect_uri)``, wait up to ``timeout`` seconds for the callback and
    complete it. Returns the connection id; raises the classified error otherwise. The
    pending request is cancelled on every way out that did not use it."""
    try:
        server = _Server(port)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot listen on 127.0.0.1:{port} for the callback ({exc.strerror})"
        ) from None
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.2},
        name="grantkeeper-authorize-callback",
        daemon=True,
    )
    thread.start()
    state: str | None = None
    try:
        redirect_uri = f"http://127.0.0.1:{server.server_address[1]}{CALLBACK_PATH}"
        request = begin_authorization(
            runtime,
            provider_name,
            redirect_uri=redirect_uri,
            account=account,
            connection_id=connection_id,
        )
        state = request.state
        announce(request.url, redirect_uri)
        if open_browser:
            # In a thread: a console browser (lynx, w3m) would otherwise block the wait.
            threading.Thread(target=webbrowser.open, args=(request.url,), daemon=True).start()
        try:
            callback = server.callbacks.get(timeout=timeout)
        except queue.Empty:
            raise AuthorizationTimedOut(
                f"no callback at {redirect_uri} within {timeout:g} s; start again"
            ) from None
        return _finish(runtime, provider_name, callback, state)
    finally:
        if state is not None:
            cancel_authorization(runtime, state)  # a no-op once the callback consumed it
        server.shutdown()
        server.server_close()


def _finish(runtime: Runtime, provider_name: str, callback: _Callback, state: str) -> str:
    """Complete the authorization with the callback, and tell the browser how it went."""
    try:
        if callback.duplicated:
            runtime.auditor.emit(
                "connection.authorize_refused",
                "refused",
                provider=provider_name,
                reason="malformed_callback",
            )
            raise AuthorizationRefused(  # noqa: TRY301 - answered below like any refusal
                "the callback repeats a parameter (RFC 6749 3.1)", reason="malformed_callback"
            )
        new_id = complete_authorization(runtime, callback.params, expected_state=state)
    except AuthorizationRefused as exc:
        callback.answer(400, f"grantkeeper refused this authorization: {exc}. {CLOSE}")
        raise
    except GrantkeeperError as exc:
        callback.answer(502, f"grantkeeper could not complete this authorization: {exc}. {CLOSE}")
        raise
    else:
        callback.answer(200, f"grantkeeper is authorized: connection {new_id}. {CLOSE}")
        return new_id
    finally:
        callback.decided.set()  # any other exception: the default 500 page
        callback.sent.wait(_SENT_TIMEOUT_SECONDS)
