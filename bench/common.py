"""Helpers shared by the benchmarks.

* A throwaway PostgreSQL database per run (``gk_bench_<purpose>_<hex>``), migrated with the real
  Alembic history and dropped at the end, whatever happens.
* Fast bulk loading of connections with ``COPY``: ciphertexts are real (``Keyring.encrypt`` with
  ``associated_data`` bound to table, row and column, exactly what ``sealing.seal`` writes), made
  in a pool of processes while the main process streams them into the database.
* Settings, Redis key prefixes and their clean-up, process memory from ``/proc``, medians, a
  description of the machine, and the write-up of results into ``BENCHMARKS.md``.

Environment (all optional): ``GK_BENCH_PG_ADMIN`` (libpq conninfo of a superuser on the
maintenance database), ``GK_BENCH_PG_HOST`` (``host:port``), ``GK_BENCH_REDIS_URL``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from config.settings import Settings
from grantkeeper import sealing
from grantkeeper.connections import ProviderSpec, add_provider
from grantkeeper.crypto import Keyring, associated_data, generate_key_entry
from grantkeeper.db import create_db_engine, upgrade
from grantkeeper.models import ACTIVE
from grantkeeper.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"

PG_ADMIN_DSN = os.environ.get(
    "GK_BENCH_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_HOST = os.environ.get("GK_BENCH_PG_HOST", "127.0.0.1:5432")
# A Redis database of its own; every key the benchmarks write is under a per-run prefix (or a
# per-run Celery queue name) and is deleted at the end. Never flushed.
REDIS_URL = os.environ.get("GK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")

# The client the benchmarks register at the dev OAuth server (python -m grantkeeper.devserver).
BENCH_CLIENT_ID = "bench"
BENCH_CLIENT_SECRET = "bench-client-secret"  # noqa: S105 - a local dev server's test client
# For benchmarks that never call the provider (port 9, discard).
UNREACHABLE_URL = "http://127.0.0.1:9/token"

COPY_COLUMNS = (
    "id",
    "provider_id",
    "account",
    "status",
    "version",
    "access_token_ct",
    "refresh_token_ct",
    "access_expires_at",
    "access_issued_at",
    "refresh_issued_at",
    "created_at",
    "updated_at",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- database ----------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_database(purpose: str) -> Iterator[str]:
    """A fresh, empty database named ``gk_bench_<purpose>_<hex>``; yields its SQLAlchemy URL
    and drops it (``WITH (FORCE)``) on the way out, even after an error or Ctrl-C."""
    name = f"gk_bench_{purpose}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    log(f"created database {name}")
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOST}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        log(f"dropped database {name}")


def libpq_dsn(database_url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...`` for psycopg itself."""
    return "postgresql://" + database_url.split("://", 1)[1]


def key_entry(kid: str) -> str:
    """A keyring entry ``kid:base64key`` with a fresh 256-bit key."""
    return f"{kid}:{generate_key_entry().split(':', 1)[1]}"


def bench_settings(
    database_url: str, keys: str, prefix: str, primary: str | None = None, **overrides: Any
) -> Settings:
    """Settings that never read a developer's ``.env``."""
    return Settings(
        _env_file=None,
        database_url=database_url,
        redis_url=REDIS_URL,
        redis_key_prefix=prefix,
        encryption_keys=keys,
        primary_key_id=primary,
        **overrides,
    )


def migrate(settings: Settings) -> None:
    engine = create_db_engine(settings)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def add_bench_provider(rt: Runtime, token_url: str = UNREACHABLE_URL) -> str:
    """A provider named ``bench`` (the dev server's default client), sealed under the primary."""
    return add_provider(
        rt,
        ProviderSpec(
            name="bench",
            token_url=token_url,
            client_id=BENCH_CLIENT_ID,
            client_secret=BENCH_CLIENT_SECRET,
        ),
    )


def vacuum_analyze(database_url: str, table: str = "connections") -> float:
    """VACUUM (ANALYZE): what autovacuum would have done to a table that has been around."""
    started = time.perf_counter()
    with psycopg.connect(libpq_dsn(database_url), autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
    return time.perf_counter() - started


def table_size(database_url: str, table: str = "connections") -> dict[str, int]:
    with psycopg.connect(libpq_dsn(database_url)) as conn:
        row = conn.execute(
            "SELECT pg_relation_size(%s::regclass), pg_total_relation_size(%s::regclass)",
            (table, table),
        ).fetchone()
    assert row is not None
    return {"heap_bytes": int(row[0]), "total_bytes": int(row[1])}


# -- bulk loading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    count: int
    seconds: float
    due_ids: list[str]
    sample_ids: list[str]  # a few ids spread over the load (for spot checks)

    @property
    def rows_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Chunk:
    keys: str
    primary: str | None
    provider_id: str
    start: int
    count: int
    due: frozenset[int]  # offsets within the chunk
    now_epoch: float
    seed: int
    tokens: Sequence[tuple[str, str]] | None


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(sep=" ")


def _encode_chunk(chunk: _Chunk) -> tuple[bytes, list[str], list[str]]:
    """Rows ``start .. start+count`` as COPY text: real AES-GCM ciphertexts, row-bound.

    Runs in a pool process. What can be done in bulk is: random bytes for ids and plaintexts
    come from one ``os.urandom`` call each, plaintexts from one base64 pass."""
    keyring = Keyring.parse(chunk.keys, chunk.primary)
    rng = random.Random(chunk.seed)
    n = chunk.count
    raw_ids = os.urandom(16 * n)
    if chunk.tokens is None:
        # 24 random bytes -> 32 url-safe characters each, no padding (like token_urlsafe(24)).
        text = base64.urlsafe_b64encode(os.urandom(48 * n)).decode("ascii")
        plain = [(text[64 * i : 64 * i + 32], text[64 * i + 32 : 64 * i + 64]) for i in range(n)]
    else:
        plain = list(chunk.tokens)
    now = chunk.now_epoch
    issued = _stamp(now - 3600)
    created = _stamp(now - 86400)
    encrypt = keyring.encrypt
    table, access_col, refresh_col = (
        sealing.CONNECTIONS,
        sealing.ACCESS_TOKEN,
        sealing.REFRESH_TOKEN,
    )
    lines: list[str] = []
    due_ids: list[str] = []
    sample: list[str] = []
    for i in range(n):
        cid = str(uuid.UUID(bytes=raw_ids[16 * i : 16 * i + 16], version=4))
        access, refresh = plain[i]
        if i in chunk.due:
            # Due: expired up to ten minutes ago (well inside any refresh margin).
            expires = _stamp(now - rng.uniform(0, 600))
            due_ids.append(cid)
        else:
            # Far in the future: one to thirty days.
            expires = _stamp(now + rng.uniform(86400, 30 * 86400))
        if i % 1000 == 0:
            sample.append(cid)
        lines.append(
            "\t".join(
                (
                    cid,
                    chunk.provider_id,
                    f"acct-{chunk.start + i:09d}",
                    ACTIVE,
                    "1",
                    encrypt(access, associated_data(table, cid, access_col)),
                    encrypt(refresh, associated_data(table, cid, refresh_col)),
                    expires,
                    issued,
                    issued,
                    created,
                    created,
                )
            )
        )
    lines.append("")
    return "\n".join(lines).encode("ascii"), due_ids, sample


def load_connections(
    database_url: str,
    *,
    keys: str,
    primary: str | None,
    provider_id: str,
    count: int,
    due: int,
    tokens: Sequence[tuple[str, str]] | None = None,
    chunk_size: int = 10_000,
    processes: int | None = None,
    seed: int = 1,
) -> LoadResult:
    """COPY ``count`` active connections of ``provider_id`` into ``connections``, ``due`` of
    them (spread at random over the load) expired, the others expiring 1-30 days from now.

    Ciphertexts are made in ``processes`` pool processes (default: one per core) while this
    process streams the finished chunks into one ``COPY ... FROM STDIN``. ``tokens`` gives the
    (access, refresh) plaintexts, e.g. real grants of a dev OAuth server; random otherwise."""
    if tokens is not None and len(tokens) != count:
        raise ValueError("tokens must hold one (access, refresh) pair per connection")
    rng = random.Random(seed)
    due_positions = set(rng.sample(range(count), due))
    now = time.time()
    chunks = [
        _Chunk(
            keys=keys,
            primary=primary,
            provider_id=provider_id,
            start=start,
            count=min(chunk_size, count - start),
            due=frozenset(p - start for p in due_positions if start <= p < start + chunk_size),
            now_epoch=now,
            seed=seed * 1_000_003 + start,
            tokens=None if tokens is None else tokens[start : start + chunk_size],
        )
        for start in range(0, count, chunk_size)
    ]
    copy = sql.SQL("COPY connections ({}) FROM STDIN").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in COPY_COLUMNS)
    )
    due_ids: list[str] = []
    sample: list[str] = []
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with (
        context.Pool(processes or os.cpu_count() or 1) as pool,
        psycopg.connect(libpq_dsn(database_url)) as conn,
        conn.cursor() as cur,
        cur.copy(copy) as stream,
    ):
        for block, chunk_due, chunk_sample in pool.imap(_encode_chunk, chunks):
            stream.write(block)
            due_ids.extend(chunk_due)
            sample.extend(chunk_sample)
    seconds = time.perf_counter() - started
    return LoadResult(count=count, seconds=seconds, due_ids=due_ids, sample_ids=sample)


# -- Redis -------------------------------------------------------------------------------------


def new_prefix(purpose: str) -> str:
    return f"gkbench:{purpose}:{uuid.uuid4().hex[:8]}:"


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN + DEL, never FLUSHDB)."""
    removed = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += int(client.delete(*batch))
            batch.clear()
    if batch:
        removed += int(client.delete(*batch))
    return removed


def delete_celery_queue(client: redis.Redis, queue: str) -> int:
    """A kombu Redis queue is a list named after it (plus priority lists ``queue\\x06\\x16N``)
    and a binding set ``_kombu.binding.<exchange>``; Celery names the exchange after the queue
    when a task is sent to a queue it does not declare."""
    keys = [queue, f"_kombu.binding.{queue}"]
    keys += [f"{queue}\x06\x16{p}" for p in range(10)]
    return int(client.delete(*keys))


# -- numbers and processes ---------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def proc_status(pid: int | str) -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, ...) in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if (len(parts) == 2 and parts[1] == "kB") or name == "Threads":
                out[name] = int(parts[0])
    return out


def process_group(pgid: int) -> list[int]:
    """Every live process whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.append(int(entry))
    return sorted(pids)


def group_rss_kib(pgid: int) -> int:
    total = 0
    for pid in process_group(pgid):
        with contextlib.suppress(OSError):
            total += proc_status(pid).get("VmRSS", 0)
    return total


# -- the machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    return 0.0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine(database_url: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_gib": round(_mem_total_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {
            d: _version(d)
            for d in ("SQLAlchemy", "psycopg", "celery", "kombu", "redis", "cryptography")
        },
    }
    with contextlib.suppress(psycopg.Error):
        dsn = libpq_dsn(database_url) if database_url else PG_ADMIN_DSN
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
            buffers = conn.execute("SELECT current_setting('shared_buffers')").fetchone()
            info["postgresql"] = (
                f"{row[0] if row else '?'} (shared_buffers {buffers[0] if buffers else '?'})"
            )
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(REDIS_URL)
        info["redis"] = str(client.info("server").get("redis_version"))
        client.close()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        load = Path("/proc/loadavg").read_text(encoding="ascii").split()[:3]
        info["loadavg_at_start"] = " ".join(load)
    return info


def machine_line(info: dict[str, Any]) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    return (
        f"{info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, Linux"
        f" {info['kernel']}, Python {info['python']}, PostgreSQL {info.get('postgresql', '?')},"
        f" Redis {info.get('redis', '?')}; {pkgs}; load average at start"
        f" {info.get('loadavg_at_start', '?')}"
    )


# -- results -----------------------------------------------------------------------------------


def save_result(name: str, data: dict[str, Any], markdown: str) -> Path:
    """``bench/results/<name>.json`` and ``.md``, and the section between
    ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` in BENCHMARKS.md (if present)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    (RESULTS_DIR / f"{name}.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")
    if BENCHMARKS_MD.exists():
        text = BENCHMARKS_MD.read_text(encoding="utf-8")
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if pattern.search(text):
            replaced = pattern.sub(lambda _: f"{start}\n{markdown.rstrip()}\n{end}", text)
            BENCHMARKS_MD.write_text(replaced, encoding="utf-8")
            log(f"updated the {name} section of BENCHMARKS.md")
    log(f"wrote {path.relative_to(ROOT)}")
    return path


# -- CPU accounting ----------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, in seconds (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PostgresCpu:
    """CPU seconds PostgreSQL spent for one database while a block runs: its backends (and
    autovacuum workers) plus the deltas of the shared WAL writer, checkpointer and background
    writer. Sampled from ``/proc`` every ``interval`` seconds on a thread (a backend that exits
    loses at most one interval), so it needs the server on this machine."""

    SHARED = ("walwriter", "checkpointer", "background writer")

    def __init__(self, database_url: str, interval: float = 0.2) -> None:
        self.dsn = libpq_dsn(database_url)
        self.interval = interval
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._started = False
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-cpu", daemon=True)

    def _sample(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(
            "SELECT pid, backend_type, datname = current_database() FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid()"
        ).fetchall()
        for pid, backend_type, ours in rows:
            if not ours and backend_type not in self.SHARED:
                continue
            seconds = process_cpu_seconds(int(pid))
            if seconds is None:
                continue
            if pid not in self._first:
                # A process that was there before we started counts from here on; one that
                # appeared since (a backend of the measured client) counts from zero.
                self._first[pid] = 0.0 if self._started else seconds
            self._last[pid] = seconds

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self._sample(conn)
            self._started = True
            self._ready.set()
            while not self._stop.wait(self.interval):
                self._sample(conn)
            self._sample(conn)

    def __enter__(self) -> PostgresCpu:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self._last[pid] - self._first[pid] for pid in self._last)
