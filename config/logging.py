"""structlog JSON logging with redaction, configured once per process.

Two independent nets keep secrets out of logs: any value under a key that names a secret is
replaced, and any string equal to a secret the process has handled (registered by the code
that decrypts or receives it) is replaced wherever it appears.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"
# Keys whose values are never logged. "code" covers authorization codes; "_fp" fingerprints are
# keyed hashes and safe, so they are exempt.
SECRET_KEY_PATTERN = re.compile(
    r"(token|secret|password|passwd|authorization|api[_-]?key|^code$|_code$|cookie|credential)",
    re.IGNORECASE,
)
SAFE_KEY_PATTERN = re.compile(r"(_fp|_class|_count|_at|_id|_hint|_type|_url)$")


class SecretRegistry:
    """The secrets this process has held, most recent first, bounded in size.

    ``scrub`` runs on every rendered log line, and a worker holds up to ``capacity`` secrets:
    it must not cost one substring search per secret. Every form a secret can take in a line
    (as is, and JSON-escaped) is indexed by its first ``PROBE`` characters (the shortest secret
    registered), so a line is scanned once, looking up each of its ``PROBE``-character windows;
    only the forms found that way are searched for and replaced.
    """

    PROBE = 8  # no shorter value is registered: it would shred ordinary text

    def __init__(self, capacity: int = 20000):
        self._values: OrderedDict[str, None] = OrderedDict()
        # probe -> the form starting with it (a list when several do)
        self._index: dict[str, str | list[str]] = {}
        self._capacity = capacity
        self._lock = threading.Lock()

    @staticmethod
    def _forms(secret: str) -> tuple[str, ...]:
        """The secret, and how JSON rendering writes it if that differs."""
        if secret.isascii() and secret.isprintable() and '"' not in secret and "\\" not in secret:
            return (secret,)
        escaped = json.dumps(secret)[1:-1]
        return (secret,) if escaped == secret else (secret, escaped)

    def add(self, value: str | None) -> None:
        if not value or len(value) < self.PROBE:
            return
        with self._lock:
            if value in self._values:
                self._values.move_to_end(value)
                return
            self._values[value] = None
            for form in self._forms(value):
                self._index_form(form)
            while len(self._values) > self._capacity:
                evicted, _ = self._values.popitem(last=False)
                for form in self._forms(evicted):
                    self._unindex_form(form)

    def _index_form(self, form: str) -> None:
        probe = form[: self.PROBE]
        held = self._index.get(probe)
        if held is None:
            self._index[probe] = form
        elif isinstance(held, str):
            self._index[probe] = [held, form]
        else:
            held.append(form)

    def _unindex_form(self, form: str) -> None:
        probe = form[: self.PROBE]
        held = self._index.get(probe)
        if held == form:
            del self._index[probe]
        elif isinstance(held, list):
            held.remove(form)
            if len(held) == 1:
                self._index[probe] = held[0]

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and value in self._values

    def scrub(self, text: str) -> str:
        """Replace any held secret that appears inside ``text``."""
        probe = self.PROBE
        found: set[str] = set()
        with self._lock:
            lookup = self._index.get
            for start in range(len(text) - probe + 1):
                held = lookup(text[start : start + probe])
                if held is None:
                    continue
                if isinstance(held, str):
                    found.add(held)
                else:
                    found.update(held)
        # Longest first: a secret that contains another is replaced whole.
        for form in sorted(found, key=len, reverse=True):
            if form in text:
                text = text.replace(form, REDACTED)
        return text


secrets_held = SecretRegistry()


def _redact_value(key: str, value: Any) -> Any:  # noqa: PLR0911 - one return per case
    if isinstance(value, str):
        if SECRET_KEY_PATTERN.search(key) and not SAFE_KEY_PATTERN.search(key):
            return REDACTED
        if value in secrets_held:
            return REDACTED
        return value
    if isinstance(value, dict):
        # A mapping under a secret key is secret as a whole: its inner keys ("pass", "value")
        # need not name a secret themselves.
        if SECRET_KEY_PATTERN.search(key) and not SAFE_KEY_PATTERN.search(key):
            return REDACTED
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    if SECRET_KEY_PATTERN.search(key) and not SAFE_KEY_PATTERN.search(key) and value is not None:
        if isinstance(value, bool | int | float):
            return value
        return REDACTED
    return value


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the last step before rendering."""
    for key in list(event_dict):
        event_dict[key] = _redact_value(key, event_dict[key])
    return event_dict


def scrub_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    """After rendering: exception texts and anything else that slipped into the line."""
    return secrets_held.scrub(rendered) if isinstance(rendered, str) else rendered


_configured = False


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, *, http_trace: bool = False
) -> None:
    """Idempotent; JSON lines on stdout (or ``stream``) for our events, stdlib logging routed
    the same way on stderr."""
    global _configured  # noqa: PLW0603 - logging is process-global by nature
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.JSONRenderer(), scrub_rendered],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(),
                    scrub_rendered,
                ],
                foreign_pre_chain=[
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    redact,
                ],
            )
        )
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(numeric)
        # httpx/httpcore trace requests at INFO/DEBUG: quiet unless HTTP tracing is asked for
        # (GRANTKEEPER_LOG_HTTP_BODIES, refused in production by `grantkeeper check`).
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(
                logging.DEBUG if http_trace else max(numeric, logging.WARNING)
            )
        # Alembic announces every migration step at INFO; the CLI says what matters itself.
        logging.getLogger("alembic").setLevel(max(numeric, logging.WARNING))
        _configured = True
