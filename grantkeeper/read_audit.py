"""Token reads, audited without putting a database write on the hot path.

Every read is counted the moment it happens (a dict increment under a lock, about a
microsecond); a background thread writes one ``token.read`` event per connection, actor and
flush interval, carrying the count, the sources and the first and last read time. Nothing is
lost on a clean exit (flushed at interpreter exit); a process killed with SIGKILL loses at most
one interval of read counts, never a state change (those are audited synchronously).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from grantkeeper.audit import Auditor


@dataclass
class _Tally:
    count: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    first: float = 0.0
    last: float = 0.0


class ReadAuditBuffer:
    def __init__(self, auditor: Auditor, interval: float, clock: Callable[[], float] = time.time):
        self.auditor = auditor
        self.interval = interval
        self.clock = clock
        self._tallies: dict[str, _Tally] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self.close)

    def record(self, connection_id: str, source: str) -> None:
        now = self.clock()
        with self._lock:
            tally = self._tallies.get(connection_id)
            if tally is None:
                tally = self._tallies[connection_id] = _Tally(first=now)
            tally.count += 1
            tally.sources[source] = tally.sources.get(source, 0) + 1
            tally.last = now
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gk-read-audit", daemon=True)
                self._thread.start()

    def flush(self) -> int:
        """Write the pending tallies; returns how many events were written."""
        with self._lock:
            tallies, self._tallies = self._tallies, {}
        for connection_id, tally in tallies.items():
            self.auditor.emit(
                "token.read",
                "ok",
                connection_id=connection_id,
                reads=tally.count,
                sources=tally.sources,
                first_read_at=datetime.fromtimestamp(tally.first, UTC).isoformat(),
                last_read_at=datetime.fromtimestamp(tally.last, UTC).isoformat(),
            )
        return len(tallies)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
