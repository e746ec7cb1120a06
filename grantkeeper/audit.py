"""The audit trail: every state change becomes one structlog JSON line and one row in the
append-only ``audit_events`` table. Nothing secret goes in; a keyed fingerprint may identify
a token without revealing it.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from config.logging import secrets_held
from grantkeeper import repository
from grantkeeper.errors import DecryptionError

log = structlog.get_logger("grantkeeper.audit")


def decryption_event(exc: DecryptionError) -> str:
    """A tampered or misplaced ciphertext is a security event, not a plain failure."""
    return "token.tampered" if exc.reason == "tampered" else "token.decryption_failed"


def audit_decryption_failure(auditor: Auditor, exc: DecryptionError, **context: Any) -> None:
    """The audit event of a ciphertext that did not open: ``token.tampered`` or
    ``token.decryption_failed``, with its key id and reason, plus where it happened."""
    auditor.emit(decryption_event(exc), "error", key_id=exc.key_id, reason=exc.reason, **context)


def worker_actor() -> str:
    return f"worker:{socket.gethostname()}:{os.getpid()}"


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _scrubbed(value: Any) -> Any:
    """``value`` with every string in it, however nested, scrubbed of held secrets."""
    if isinstance(value, str):
        return secrets_held.scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    return value


def fingerprint(key: bytes, token: str) -> str:
    """12 hex chars of HMAC-SHA256: correlates tokens across events, reveals nothing."""
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()[:12]


class Auditor:
    def __init__(
        self,
        engine: Engine,
        actor: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.engine = engine
        self.actor = actor
        self.clock = clock
        # Called with every event after it is recorded: anomaly detection and metrics work
        # from the event stream, so their cost is O(events), never a table scan.
        self.observers: list[Callable[[Mapping[str, Any]], None]] = []

    def emit(
        self,
        event: str,
        outcome: str,
        *,
        connection_id: str | None = None,
        provider: str | None = None,
        key_id: str | None = None,
        version: int | None = None,
        **details: Any,
    ) -> None:
        """Log and persist one event. A database failure is logged, never raised: the audit
        line on stdout still exists, and the operation it describes already happened."""
        at = self.clock()
        if outcome in {"failed", "error", "refused", "alert", "partial"}:
            # Failure texts can quote a provider's error_description; scrub any secret this
            # process holds before the text reaches the log or the table, also in nested
            # details (a revocation's per-token provider answers).
            details = _scrubbed(details)
        level = "warning" if outcome in {"failed", "error", "refused", "alert"} else "info"
        getattr(log, level)(
            event,
            outcome=outcome,
            connection_id=connection_id,
            provider=provider,
            key_id=key_id,
            version=version,
            actor=self.actor,
            **details,
        )
        row = {
            "at": at,
            "event": event,
            "outcome": outcome,
            "connection_id": connection_id,
            "provider": provider,
            "actor": self.actor,
            "key_id": key_id,
            "version": version,
            "details": details,
        }
        try:
            with self.engine.begin() as conn:
                repository.insert_audit_events(conn, [row])
        except SQLAlchemyError as exc:
            log.error(  # noqa: TRY400 - the traceback may quote SQL parameters
                "audit.persist_failed", event_name=event, error_class=type(exc).__name__
            )
        for observe in self.observers:
            try:
                observe(row)
            except Exception as exc:  # noqa: BLE001 - an observer never breaks the audited work
                log.warning(
                    "audit.observer_failed", event_name=event, error_class=type(exc).__name__
                )
