"""A recording reverse proxy in front of a provider's token and revocation endpoints.

Leak tests need the set of *every* token a provider issued, not only the ones they happened
to see stored. Point the code under test at :attr:`TokenRecorder.url` instead of the
provider: each POST is forwarded unchanged, and every ``access_token``, ``refresh_token`` and
``id_token`` in a JSON answer is recorded. ``fail_revocations(n)`` makes the next ``n``
revocation requests answer ``503 temporarily_unavailable`` without reaching the provider.
With ``echo_tokens=True`` it plays a careless provider: every error answer's
``error_description`` quotes the token the request presented.

Typical use::

    with TokenRecorder(peer.issuer) as recorder:
        token_url = f"{recorder.url}/token"
        ...
        recorder.issued        # [("access_token", "..."), ("refresh_token", "..."), ...]

Every answer closes its connection (HTTP/1.0 style), so no handler thread outlives a request.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

import httpx

TOKEN_FIELDS = ("access_token", "refresh_token", "id_token")
_FORWARDED_HEADERS = ("authorization", "content-type", "accept", "user-agent")


class TokenRecorder:
    def __init__(self, upstream: str, *, echo_tokens: bool = False):
        self.upstream = upstream.rstrip("/")
        self.issued: list[tuple[str, str]] = []
        self.requests: list[tuple[str, int]] = []  # (path, status answered)
        self._lock = threading.Lock()
        self._failing_revocations = 0
        self.echo_tokens = echo_tokens
        self._http = httpx.Client(timeout=10.0)
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                recorder._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: the test's own output is no place for request lines

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail_revocations(self, count: int) -> None:
        with self._lock:
            self._failing_revocations = count

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        presented = parse_qs(body.decode("ascii", "replace"))
        token = (presented.get("refresh_token") or presented.get("token") or [""])[0]
        if request.path.endswith("/revocation"):
            with self._lock:
                failing = self._failing_revocations > 0
                self._failing_revocations -= int(failing)
            if failing:
                error = {"error": "temporarily_unavailable"}
                self._answer(request, 503, self._careless(error, token), request.path)
                return
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        response = self._http.post(self.upstream + request.path, content=body, headers=headers)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        content = response.content
        if isinstance(answer, dict):
            with self._lock:
                self.issued += [
                    (name, answer[name])
                    for name in TOKEN_FIELDS
                    if isinstance(answer.get(name), str)
                ]
            if isinstance(answer.get("error"), str):
                content = self._careless(answer, token)
        self._answer(request, response.status_code, content, request.path)

    def _careless(self, error: dict[str, Any], token: str) -> bytes:
        """With ``echo_tokens``: the error description quotes the token that was presented, as
        careless providers do, so that error texts downstream carry a secret."""
        if self.echo_tokens and token:
            described = error.get("error_description") or error["error"]
            error = {**error, "error_description": f"{described} (token {token})"}
        return json.dumps(error).encode()

    def _answer(
        self, request: BaseHTTPRequestHandler, status: int, content: bytes, path: str
    ) -> None:
        with self._lock:
            self.requests.append((path, status))
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(content)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(content)

    def tokens(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.issued)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
