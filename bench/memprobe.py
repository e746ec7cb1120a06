"""Debug helper for ``python -m bench.worker_memory --tracemalloc``: the worker's Celery app, plus
tracemalloc and a SIGUSR2 handler that writes a snapshot into ``GK_BENCH_SNAPSHOT_DIR``
(``idle.snap`` the first time, ``after.snap`` the second). Run as ``celery -A bench.memprobe
worker``; never used in production.
"""

from __future__ import annotations

import gc
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any

from celery.signals import worker_ready

from worker import app

__all__ = ["app"]


def _dump(_signum: int, _frame: FrameType | None) -> None:
    target = Path(os.environ["GK_BENCH_SNAPSHOT_DIR"])
    name = "after.snap" if (target / "idle.snap").exists() else "idle.snap"
    gc.collect()
    partial = target / f"{name}.partial"
    tracemalloc.take_snapshot().dump(str(partial))
    partial.rename(target / name)


def _install(**_: Any) -> None:
    if not os.environ.get("GK_BENCH_SNAPSHOT_DIR"):
        return
    if not tracemalloc.is_tracing():
        tracemalloc.start(10)
    signal.signal(signal.SIGUSR2, _dump)


_install()
worker_ready.connect(_install, weak=False)
