"""The README's first command: ``grantkeeper demo`` on the embedded SQLite default, with a
real worker and beat refreshing short-lived tokens at the shipped dev OAuth server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_TEST_URL

pytestmark = pytest.mark.e2e
GRANTKEEPER = str(Path(sys.executable).parent / "grantkeeper")


def test_demo_keeps_every_grant_valid_on_embedded_sqlite(
    tmp_path: Path, keyring_spec: str, redis_prefix: str
) -> None:
    """With no database configured, the demo creates the SQLite file owner-only, refreshes
    every connection through several lifetimes, ends with all grants valid and no reuse
    detection, says so on stdout, and leaves no key of its own in Redis."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GRANTKEEPER_")}
    env.update(
        GRANTKEEPER_ENCRYPTION_KEYS=keyring_spec,
        GRANTKEEPER_DATA_DIR=str(tmp_path / "data"),
        GRANTKEEPER_REDIS_URL=REDIS_TEST_URL,
        GRANTKEEPER_REDIS_KEY_PREFIX=f"{redis_prefix}demo:",
    )
    done = subprocess.run(
        [GRANTKEEPER, "demo", "--connections", "6", "--seconds", "25", "--access-ttl", "8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "6/6 still valid at the provider" in summary
    assert "0 reuse detections" in summary
    assert "0 failed" in summary
    refreshed = int(summary.split("summary: ", 1)[1].split(" refreshed", 1)[0])
    assert refreshed >= 12, summary  # 25 s of 8 s tokens: every connection more than once
    database = tmp_path / "data" / "grantkeeper.db"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        left = [*client.scan_iter(match=f"{redis_prefix}demo:*"), *client.scan_iter("gkdemo*")]
    finally:
        client.close()
    assert left == []
