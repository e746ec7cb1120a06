"""Notifications for events a person must act on, as a signed webhook.

The body is JSON without any secret; the signature header is
``X-Grantkeeper-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` so a receiver
can check both origin and freshness. Delivery failures are logged, never raised: the audit
trail already holds the event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import structlog

from config.settings import Settings

log = structlog.get_logger("grantkeeper.notify")
SIGNATURE_HEADER = "X-Grantkeeper-Signature"


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, *, now: float, tolerance: float = 300) -> bool:
    """Receiver side, also used by tests."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header)


class Notifier:
    def __init__(self, settings: Settings, http: httpx.Client):
        self.url = settings.webhook_url
        secret = settings.webhook_secret
        self.secret = secret.get_secret_value().encode() if secret else b""
        self.http = http

    def send(self, event: str, **payload: Any) -> bool:
        if not self.url:
            return False
        body = json.dumps({"event": event, "at": time.time(), **payload}, default=str).encode()
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers[SIGNATURE_HEADER] = signature(self.secret, int(time.time()), body)
        try:
            response = self.http.post(self.url, content=body, headers=headers, timeout=5.0)
        except httpx.HTTPError as exc:
            log.warning("notify.failed", event_name=event, error_class=type(exc).__name__)
            return False
        if response.status_code >= 300:
            log.warning("notify.refused", event_name=event, http_status=response.status_code)
            return False
        return True
