"""Item 4: the scan's cost does not grow with the table.

Two databases side by side: 100,000 connections (the floor) and 1,000,000, each with 1,000 due
(expired) and the rest expiring 1-30 days from now, all active, with real ciphertexts. One scan
tick is the real ``grantkeeper.scan.scan_due``: the due query, a Redis ``SET NX EX`` queued
marker per connection (pipelined) and the real Celery ``refresh_batch.apply_async(...,
countdown=...)`` per batch onto a throwaway queue on Redis. Ticks alternate between the two
tables (so background noise hits both alike); before each one the queued markers and the queue
are deleted, so every tick enqueues all 1,000. Reported: the median of the ticks per size,
their ratio (target <= 1.2), the due query alone, and ``EXPLAIN (ANALYZE, BUFFERS)`` of the
exact statement the tick ran (plus its generic plan, which is what a prepared statement may
switch to).

    .venv/bin/python -m bench.scan_cost [--ticks 9] [--sizes 100000,1000000] [--due 1000]
"""

from __future__ import annotations

import argparse
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis
from psycopg import sql
from sqlalchemy import event

from bench import common
from config.logging import configure_logging
from config.settings import Settings
from grantkeeper import repository
from grantkeeper.runtime import Runtime
from grantkeeper.scan import scan_due

TARGET_RATIO = 1.2


@dataclass
class Target:
    size: int
    url: str
    settings: Settings
    rt: Runtime
    load: common.LoadResult
    ticks: list[float] = field(default_factory=list)
    queries: list[float] = field(default_factory=list)
    statement: tuple[str, dict[str, Any]] | None = None
    explain: str = ""
    generic_plan: str = ""

    @property
    def tick_median(self) -> float:
        return common.median(self.ticks)

    @property
    def query_median(self) -> float:
        return common.median(self.queries)


def _capture_due_statement(target: Target) -> None:
    def before(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if (
            "FROM connections" in statement
            and "ORDER BY connections.access_expires_at" in statement
        ):
            target.statement = (statement, dict(parameters))

    event.listen(target.rt.engine, "before_cursor_execute", before)


def _setup(size: int, due: int, url: str, keys: str, queue: str) -> Target:
    prefix = common.new_prefix(f"scan{size}")
    settings = common.bench_settings(url, keys, prefix, celery_queue=queue)
    common.migrate(settings)
    rt = Runtime(settings, actor="bench:scan_cost")
    provider_id = common.add_bench_provider(rt)
    common.log(f"loading {size:,} connections ({due:,} due)")
    load = common.load_connections(
        url, keys=keys, primary=None, provider_id=provider_id, count=size, due=due, seed=size
    )
    common.log(f"loaded in {load.seconds:.1f} s ({load.rows_per_second:,.0f} rows/s)")
    vacuum = common.vacuum_analyze(url)
    common.log(f"VACUUM (ANALYZE) in {vacuum:.1f} s; {common.table_size(url)}")
    target = Target(size=size, url=url, settings=settings, rt=rt, load=load)
    _capture_due_statement(target)
    return target


def _clear(target: Target, client: redis.Redis, queue: str) -> None:
    common.delete_prefix(client, f"{target.settings.redis_key_prefix}queued:")
    common.delete_celery_queue(client, queue)


def _tick(target: Target, enqueue: Callable[[list[str], float], None], due: int) -> float:
    started = time.perf_counter()
    result = scan_due(target.rt, enqueue)
    elapsed = time.perf_counter() - started
    if result.due != due or result.enqueued != due:
        raise RuntimeError(f"tick on {target.size:,} rows: {result} (expected {due} enqueued)")
    return elapsed


def _query(target: Target) -> float:
    s = target.settings
    now = datetime.now(UTC)
    started = time.perf_counter()
    with target.rt.engine.connect() as conn:
        ids = repository.due_connection_ids(
            conn, now + timedelta(seconds=s.refresh_margin_seconds), s.scan_batch_limit, now
        )
    elapsed = time.perf_counter() - started
    if len(ids) != len(target.load.due_ids):
        raise RuntimeError(f"due query on {target.size:,} rows found {len(ids)}")
    return elapsed


def _explain(target: Target) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the statement the last tick ran, with its parameters; and
    the generic plan of the same statement (plan_cache_mode = force_generic_plan), which is
    what PostgreSQL may switch to once psycopg prepares a statement run 5 times."""
    if target.statement is None:
        raise RuntimeError("the due statement was not captured")
    statement, params = target.statement
    with psycopg.connect(common.libpq_dsn(target.url)) as conn:
        rows = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS) " + statement,
            params,
        ).fetchall()
        target.explain = "\n".join(str(r[0]) for r in rows)
        names: list[str] = []

        def placeholder(match: re.Match[str]) -> str:
            names.append(match.group(1))
            return f"${len(names)}"

        prepared = re.sub(r"%\((\w+)\)s", placeholder, statement)
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(sql.SQL("PREPARE gkbench_due AS ") + sql.SQL(prepared))
        args = sql.SQL(", ").join(sql.Literal(params[n]) for n in names)
        rows = conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, BUFFERS) EXECUTE gkbench_due({})").format(args)
        ).fetchall()
        target.generic_plan = "\n".join(str(r[0]) for r in rows)
        conn.execute("DEALLOCATE gkbench_due")


def _plan_kind(plan: str) -> str:
    """How the plan reads ``connections``: a sequential scan, or which index."""
    if "Seq Scan on connections" in plan:
        return "SEQUENTIAL scan"
    for pattern, kind in (
        (r"Index Only Scan using (\w+) on connections", "index-only scan"),
        (r"Index Scan using (\w+) on connections", "index scan"),
        (r"Bitmap Index Scan on (\w+)", "bitmap index scan"),
    ):
        match = re.search(pattern, plan)
        if match:
            return f"{kind} ({match.group(1)})"
    return "other"


def run(sizes: list[int], due: int, ticks: int) -> tuple[dict[str, Any], str, bool]:
    info = common.machine()
    queue = f"gkbench.scan.{uuid.uuid4().hex[:8]}"
    keys = common.key_entry("bench")
    targets: list[Target] = []
    with common.bench_database("scan_a") as url_a, common.bench_database("scan_b") as url_b:
        try:
            for size, url in zip(sizes, (url_a, url_b), strict=True):
                targets.append(_setup(size, due, url, keys, queue))
            # The real enqueue: the Celery app the worker and beat build from these settings,
            # and the real task; its default queue is the throwaway one.
            from worker.app import create_app  # noqa: PLC0415 - needs the settings first

            app = create_app(targets[0].settings)
            app.set_current()
            app.set_default()
            from tasks.refresh import refresh_batch  # noqa: PLC0415

            def enqueue(batch: list[str], delay: float) -> None:
                refresh_batch.apply_async(args=[batch, "scheduled"], countdown=delay)

            client = targets[0].rt.redis
            for target in targets:  # warm-up: connections, pools, the producer
                _clear(target, client, queue)
                _tick(target, enqueue, due)
                _query(target)
            for i in range(ticks):
                order = targets if i % 2 == 0 else list(reversed(targets))
                for target in order:
                    _clear(target, client, queue)
                    target.ticks.append(_tick(target, enqueue, due))
                    target.queries.append(_query(target))
                common.log(
                    f"tick {i + 1}/{ticks}: "
                    + ", ".join(f"{t.size:,}: {t.ticks[-1] * 1000:.1f} ms" for t in targets)
                )
            for target in targets:
                _explain(target)
                _clear(target, client, queue)
            app.close()
        finally:
            for target in targets:
                common.delete_prefix(target.rt.redis, target.settings.redis_key_prefix)
                common.delete_celery_queue(target.rt.redis, queue)
                target.rt.close()
    small, large = targets[0], targets[-1]
    ratio = large.tick_median / small.tick_median
    query_ratio = large.query_median / small.query_median
    plans_ok = all("index" in _plan_kind(t.explain) for t in targets)
    generic_ok = all("index" in _plan_kind(t.generic_plan) for t in targets)
    passed = ratio <= TARGET_RATIO and plans_ok
    data = {
        "machine": info,
        "due": due,
        "ticks_per_size": ticks,
        "target_ratio": TARGET_RATIO,
        "ratio": ratio,
        "query_ratio": query_ratio,
        "plans_index_scan": plans_ok,
        "generic_plans_index_scan": generic_ok,
        "passed": passed,
        "sizes": [
            {
                "connections": t.size,
                "load_seconds": t.load.seconds,
                "load_rows_per_second": t.load.rows_per_second,
                "ticks_ms": [x * 1000 for x in t.ticks],
                "tick_median_ms": t.tick_median * 1000,
                "query_ms": [x * 1000 for x in t.queries],
                "query_median_ms": t.query_median * 1000,
                "statement": t.statement[0] if t.statement else None,
                "explain": t.explain,
                "generic_plan": t.generic_plan,
            }
            for t in targets
        ],
    }
    return data, _markdown(data, targets), passed


def _markdown(data: dict[str, Any], targets: list[Target]) -> str:
    small, large = targets[0], targets[-1]
    verdict = "met" if data["passed"] else "MISSED"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with"
        " `.venv/bin/python -m bench.scan_cost`.",
        f"Machine: {common.machine_line(data['machine'])}.",
        "",
        f"Median of {data['ticks_per_size']} ticks per size, ticks alternating between the two"
        f" tables; {data['due']:,} due connections in each.",
        "",
        "| connections | one tick: query + 1,000 SET NX (pipelined) + one apply_async per"
        " batch, median | ticks (ms) | due query alone, median | plan |",
        "|---:|---:|---|---:|---|",
    ]
    for t in targets:
        lines.append(
            f"| {t.size:,} | {t.tick_median * 1000:.1f} ms |"
            f" {', '.join(f'{x * 1000:.0f}' for x in t.ticks)} |"
            f" {t.query_median * 1000:.2f} ms | {_plan_kind(t.explain)} |"
        )
    lines += [
        "",
        f"| target | measured | verdict |\n|---|---|---|\n"
        f"| tick on {large.size:,} <= {TARGET_RATIO}x tick on {small.size:,} |"
        f" **{data['ratio']:.3f}x** (due query alone: {data['query_ratio']:.2f}x) | {verdict} |\n"
        f"| due query is an index scan, not a sequential one | "
        f"{_plan_kind(small.explain)} / {_plan_kind(large.explain)}; generic plan:"
        f" {_plan_kind(large.generic_plan)} | {'met' if data['plans_index_scan'] else 'MISSED'} |",
        "",
        "The statement (as SQLAlchemy sends it through psycopg):",
        "",
        "```sql",
        (large.statement[0] if large.statement else "?").strip(),
        "```",
    ]
    for t in targets:
        lines += [
            "",
            f"`EXPLAIN (ANALYZE, BUFFERS)` on {t.size:,} connections:",
            "",
            "```",
            t.explain,
            "```",
        ]
    lines += [
        "",
        f"Generic plan on {large.size:,} connections (`plan_cache_mode = force_generic_plan`):",
        "",
        "```",
        large.generic_plan,
        "```",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scan_cost", description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--due", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=9)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != 2 or args.ticks < 1:
        parser.error("--sizes takes two sizes (floor, large); --ticks at least 1")
    configure_logging("WARNING")
    data, markdown, passed = run(sizes, args.due, args.ticks)
    common.save_result("scan_cost", data, markdown)
    print(markdown)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
