"""Starting real ``celery worker`` / ``celery beat`` processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from config.settings import settings_env

__all__ = ["ROOT", "settings_env", "start_celery", "stop"]  # settings_env: re-exported

ROOT = Path(__file__).resolve().parents[2]


def start_celery(role: str, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``celery -A worker <role>`` from the repository root, output to ``log``."""
    args = [sys.executable, "-m", "celery", "-A", "worker", role, "--loglevel", "INFO", *extra]
    with log.open("ab") as out:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
