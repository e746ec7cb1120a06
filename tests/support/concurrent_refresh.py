"""Child-process side of the concurrency test: several threads in several processes ask for a
refresh of one connection at the same moment (a cross-process barrier releases them)."""

from __future__ import annotations

import threading
from multiprocessing.synchronize import Barrier
from typing import Any

from config.settings import Settings
from grantkeeper import repository
from grantkeeper.refresh import RefreshService
from grantkeeper.runtime import Runtime


def refresh_together(
    settings_kwargs: dict[str, Any], connection_id: str, threads: int, barrier: Barrier
) -> list[str]:
    """Returns each thread's outcome."""
    rt = Runtime(Settings(_env_file=None, **settings_kwargs), actor="concurrency-test")  # type: ignore[call-arg]
    with rt.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    outcomes: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        barrier.wait()
        result = RefreshService(rt).refresh(
            connection_id, reason="manual", force=True, wait=30, seen_version=record.version
        )
        with lock:
            outcomes.append(result.outcome.value)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    rt.close()
    return outcomes
