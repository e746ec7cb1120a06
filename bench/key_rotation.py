"""Item 5: key rotation of 1,000,000 connections.

One database with N connections (default 1,000,000) whose access and refresh tokens are sealed
under ``old``, plus a provider secret. The keyring holds ``old`` and ``new``; promoting a key is
a matter of ``GRANTKEEPER_PRIMARY_KEY_ID``. Each timed run is the real operator command,
``grantkeeper keys rotate --json`` (``reencrypt_all``), in a child process; its peak resident
memory is the child's ``ru_maxrss`` (``wait4``). Runs alternate the direction (old -> new,
new -> old, ...), so every run re-encrypts all N rows, with ``VACUUM (ANALYZE)`` in between.

Then the crash: a run is SIGKILLed once about half the rows are done. A sample of the finished
rows is kept; no row may be half done (a batch commits both columns together). The restarted
run must finish everything, re-encrypt exactly what was left, and leave the sampled rows
byte-identical (not rewritten); a sample decrypts with the final key alone.

Floors measured in the same run: loading the rows with COPY (rows/s) and re-sealing two
ciphertexts per row in this process with no database at all (the crypto ceiling of one core).

    .venv/bin/python -m bench.key_rotation [--rows 1000000] [--runs 3] [--batch-size 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench import common
from config.logging import configure_logging
from config.settings import Settings, settings_env
from grantkeeper import sealing
from grantkeeper.crypto import Keyring, associated_data
from grantkeeper.runtime import Runtime

TARGET_ROWS_PER_SECOND = 20_000
TARGET_PEAK_MB = 250
GRANTKEEPER = Path(sys.executable).parent / "grantkeeper"


@dataclass
class RunResult:
    direction: str
    report: dict[str, Any]
    wall_seconds: float
    maxrss_kib: int
    returncode: int
    client_cpu_seconds: float
    server_cpu_seconds: float

    @property
    def cpu_us_per_row(self) -> float:
        rows = max(1, int(self.report.get("rows", 0)))
        return (self.client_cpu_seconds + self.server_cpu_seconds) / rows * 1e6

    @property
    def rows_per_second(self) -> float:
        return float(self.report.get("rows_per_second", 0.0))

    @property
    def peak_mb(self) -> float:
        return self.maxrss_kib / 1024


def _settings(url: str, keys: str, prefix: str, primary: str) -> Settings:
    return common.bench_settings(url, keys, prefix, primary=primary)


def _start_rotation(
    settings: Settings, batch_size: int, workdir: Path, name: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / f"{name}.log"
    out = workdir / f"{name}.json"
    with log.open("wb") as err, out.open("wb") as stdout:
        process = subprocess.Popen(
            [str(GRANTKEEPER), "keys", "rotate", "--json", "--batch-size", str(batch_size)],
            env=settings_env(settings, GRANTKEEPER_LOG_LEVEL="WARNING"),
            cwd=workdir,  # no developer .env there
            stdout=stdout,
            stderr=err,
        )
    return process, out


def _reap(process: subprocess.Popen[bytes]) -> tuple[int, int, float]:
    """(exit status as Popen reports it, ru_maxrss in KiB, CPU seconds) of a child (wait4)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, int(usage.ru_maxrss), usage.ru_utime + usage.ru_stime


def _rotate(
    url: str, settings: Settings, batch_size: int, workdir: Path, name: str, direction: str
) -> RunResult:
    with common.PostgresCpu(url) as server:
        started = time.perf_counter()
        process, out = _start_rotation(settings, batch_size, workdir, name)
        code, maxrss, cpu = _reap(process)
        wall = time.perf_counter() - started
    text = out.read_text(encoding="utf-8")
    if code != 0 or not text.strip():
        log = (workdir / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        raise RuntimeError(f"rotation {name} exited {code}:\n{log[-3000:]}")
    return RunResult(direction, json.loads(text), wall, maxrss, code, cpu, server.seconds)


def _count_under(dsn: str, kid: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM connections WHERE access_token_ct LIKE %s", (f"gk1.{kid}.%",)
        ).fetchone()
    return int(row[0]) if row else 0


def _crypto_floor(keys: str, rows: int = 50_000) -> float:
    """Rows/s of re-sealing two ciphertexts per row in this process, no database: the CPU
    ceiling of one core for the crypto part of a rotation."""
    staged = Keyring.parse(keys, "old")
    promoted = Keyring.parse(keys, "new")
    table = sealing.CONNECTIONS
    cts = [
        (
            f"id-{i:08d}",
            staged.encrypt("a" * 32, associated_data(table, f"id-{i:08d}", sealing.ACCESS_TOKEN)),
            staged.encrypt("r" * 32, associated_data(table, f"id-{i:08d}", sealing.REFRESH_TOKEN)),
        )
        for i in range(rows)
    ]
    started = time.perf_counter()
    for cid, access, refresh in cts:
        sealing.reseal(promoted, table, cid, sealing.ACCESS_TOKEN, access)
        sealing.reseal(promoted, table, cid, sealing.REFRESH_TOKEN, refresh)
    return rows / (time.perf_counter() - started)


def _kill_halfway(
    url: str, settings: Settings, final_entry: str, rows: int, batch_size: int, workdir: Path
) -> dict[str, Any]:
    """SIGKILL a rotation towards ``kid`` once about half of the rows are done; check the
    halfway state; restart; check that it finished without rewriting what was done."""
    dsn = common.libpq_dsn(url)
    kid = final_entry.split(":", 1)[0]
    before_left = rows - _count_under(dsn, kid)
    process, _ = _start_rotation(settings, batch_size, workdir, "killed")
    started = time.perf_counter()
    done = 0
    try:
        while done < rows // 2:
            if process.poll() is not None:
                raise RuntimeError("the rotation finished before it could be killed")
            time.sleep(0.25)
            done = _count_under(dsn, kid)
        os.kill(process.pid, signal.SIGKILL)
        code, _, _ = _reap(process)
    finally:
        if process.returncode is None:
            process.kill()
            _reap(process)
    killed_after = time.perf_counter() - started
    prefix = f"gk1.{kid}.%"
    with psycopg.connect(dsn) as conn:
        done = int(
            conn.execute(
                "SELECT count(*) FROM connections WHERE access_token_ct LIKE %s", (prefix,)
            ).fetchone()[0]  # type: ignore[index]
        )
        half_done = int(
            conn.execute(
                "SELECT count(*) FROM connections WHERE (access_token_ct LIKE %s)"
                " <> (refresh_token_ct LIKE %s)",
                (prefix, prefix),
            ).fetchone()[0]  # type: ignore[index]
        )
        sample = {
            str(r[0]): (str(r[1]), str(r[2]))
            for r in conn.execute(
                "SELECT id, access_token_ct, refresh_token_ct FROM connections"
                " TABLESAMPLE SYSTEM (2) WHERE access_token_ct LIKE %s",
                (prefix,),
            )
        }
    common.log(
        f"killed (exit {code}) after {killed_after:.1f} s with {done:,} of {rows:,} rows done;"
        f" {half_done} half-done rows; {len(sample):,} finished rows sampled"
    )
    resumed = _rotate(url, settings, batch_size, workdir, "resumed", f"resume -> {kid}")
    with psycopg.connect(dsn) as conn:
        after = {
            str(r[0]): (str(r[1]), str(r[2]))
            for r in conn.execute(
                "SELECT id, access_token_ct, refresh_token_ct FROM connections WHERE id = ANY(%s)",
                (list(sample),),
            )
        }
        left = int(
            conn.execute(
                "SELECT count(*) FROM connections WHERE access_token_ct NOT LIKE %s"
                " OR refresh_token_ct NOT LIKE %s",
                (prefix, prefix),
            ).fetchone()[0]  # type: ignore[index]
        )
        check_rows = conn.execute(
            "SELECT id, access_token_ct, refresh_token_ct FROM connections TABLESAMPLE SYSTEM (0.2)"
        ).fetchall()
    rewritten = sum(1 for cid, cts in sample.items() if after.get(cid) != cts)
    only_final = Keyring.parse(final_entry)
    for cid, access, refresh in check_rows:
        sealing.unseal(only_final, sealing.CONNECTIONS, cid, sealing.ACCESS_TOKEN, access)
        sealing.unseal(only_final, sealing.CONNECTIONS, cid, sealing.REFRESH_TOKEN, refresh)
    expected_rows = rows - done  # rows the second run still had to do
    report = resumed.report
    ok = (
        half_done == 0
        and rewritten == 0
        and left == 0
        and report["reencrypted"] == 2 * expected_rows + (1 if before_left else 0)
        and report["failed"] == 0
    )
    return {
        "killed_after_seconds": killed_after,
        "killed_exit": code,
        "done_when_killed": done,
        "half_done_rows": half_done,
        "sampled_finished_rows": len(sample),
        "sampled_rows_rewritten": rewritten,
        "resumed_rows": report["rows"],
        "resumed_reencrypted": report["reencrypted"],
        "expected_reencrypted": 2 * expected_rows + 1,
        "resumed_seconds": report["elapsed_seconds"],
        "resumed_rows_per_second": report["rows_per_second"],
        "resumed_peak_mb": resumed.peak_mb,
        "left_after_resume": left,
        "decrypted_with_final_key_alone": len(check_rows),
        "ok": ok,
    }


def run(rows: int, runs: int, batch_size: int, kill: bool) -> tuple[dict[str, Any], str, bool]:
    info = common.machine()
    entries = {"old": common.key_entry("old"), "new": common.key_entry("new")}
    keys = f"{entries['old']},{entries['new']}"
    prefix = common.new_prefix("rotate")
    results: list[RunResult] = []
    with common.bench_database("rotate") as url, tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        staged = _settings(url, keys, prefix, "old")
        common.migrate(staged)
        rt = Runtime(staged, actor="bench:key_rotation")
        try:
            provider_id = common.add_bench_provider(rt)
            common.log(f"loading {rows:,} connections under 'old'")
            load = common.load_connections(
                url, keys=keys, primary="old", provider_id=provider_id, count=rows, due=0
            )
            common.log(f"loaded in {load.seconds:.1f} s ({load.rows_per_second:,.0f} rows/s)")
            common.vacuum_analyze(url)
            size = common.table_size(url)
            crypto = _crypto_floor(keys)
            common.log(f"crypto floor: {crypto:,.0f} rows/s (2 ciphertexts each, one core)")
            targets = ["new", "old"]
            for i in range(runs):
                kid = targets[i % 2]
                result = _rotate(
                    url,
                    _settings(url, keys, prefix, kid),
                    batch_size,
                    workdir,
                    f"run{i + 1}",
                    f"{targets[(i + 1) % 2]} -> {kid}",
                )
                if result.report["rows"] < rows or result.report["failed"]:
                    raise RuntimeError(f"run {i + 1} did not rotate every row: {result.report}")
                results.append(result)
                common.log(
                    f"run {i + 1} ({result.direction}): {result.rows_per_second:,.0f} rows/s,"
                    f" {result.report['elapsed_seconds']:.1f} s, peak {result.peak_mb:.0f} MB,"
                    f" CPU {result.client_cpu_seconds:.1f} s client +"
                    f" {result.server_cpu_seconds:.1f} s PostgreSQL"
                    f" = {result.cpu_us_per_row:.0f} us/row"
                )
                common.vacuum_analyze(url)
            crash: dict[str, Any] | None = None
            if kill:
                kid = targets[runs % 2]
                crash = _kill_halfway(
                    url, _settings(url, keys, prefix, kid), entries[kid], rows, batch_size, workdir
                )
                common.log(f"kill and resume: {crash}")
        finally:
            common.delete_prefix(rt.redis, prefix)
            rt.close()
    rates = [r.rows_per_second for r in results]
    median_rate = common.median(rates)
    peak = max(r.peak_mb for r in results)
    passed = (
        median_rate >= TARGET_ROWS_PER_SECOND
        and peak < TARGET_PEAK_MB
        and (crash is None or bool(crash["ok"]))
    )
    data = {
        "machine": info,
        "rows": rows,
        "batch_size": batch_size,
        "table_size_before": size,
        "load_rows_per_second": load.rows_per_second,
        "crypto_floor_rows_per_second": crypto,
        "runs": [
            {
                "direction": r.direction,
                "rows_per_second": r.rows_per_second,
                "elapsed_seconds": r.report["elapsed_seconds"],
                "wall_seconds": r.wall_seconds,
                "peak_rss_mb": r.peak_mb,
                "reencrypted": r.report["reencrypted"],
                "batches": r.report["batches"],
            }
            for r in results
        ],
        "median_rows_per_second": median_rate,
        "peak_rss_mb": peak,
        "kill_and_resume": crash,
        "targets": {"rows_per_second": TARGET_ROWS_PER_SECOND, "peak_rss_mb": TARGET_PEAK_MB},
        "passed": passed,
    }
    return data, _markdown(data), passed


def _markdown(data: dict[str, Any]) -> str:
    rate = data["median_rows_per_second"]
    peak = data["peak_rss_mb"]
    crash = data["kill_and_resume"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with"
        " `.venv/bin/python -m bench.key_rotation`.",
        f"Machine: {common.machine_line(data['machine'])}.",
        "",
        f"{data['rows']:,} connections (two ciphertexts each, plus one provider secret), table"
        f" {data['table_size_before']['total_bytes'] / 2**20:,.0f} MiB with indexes; each run is"
        f" `grantkeeper keys rotate --json --batch-size {data['batch_size']}` in a child process,"
        " directions alternating, `VACUUM (ANALYZE)` between runs. rows/s is the command's own"
        " report (`reencrypt_all`, from its first batch to its last); peak memory is the child's"
        " `ru_maxrss`.",
        "",
        "| run | direction | rows/s | elapsed | wall (incl. start-up and counts) | peak RSS |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(data["runs"], 1):
        lines.append(
            f"| {i} | {r['direction']} | {r['rows_per_second']:,.0f} | {r['elapsed_seconds']:.1f} s"
            f" | {r['wall_seconds']:.1f} s | {r['peak_rss_mb']:.0f} MB |"
        )
    lines += [
        "",
        "| floor, same run | rows/s | rotation / floor |",
        "|---|---:|---:|",
        f"| loading the rows with COPY (2 processes making ciphertexts) |"
        f" {data['load_rows_per_second']:,.0f} | {rate / data['load_rows_per_second']:.2f}x |",
        f"| re-sealing 2 ciphertexts per row, one core, no database |"
        f" {data['crypto_floor_rows_per_second']:,.0f} |"
        f" {rate / data['crypto_floor_rows_per_second']:.2f}x |",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        f"| >= {TARGET_ROWS_PER_SECOND:,} rows/s on 2 cores | **{rate:,.0f} rows/s** (median of"
        f" {len(data['runs'])}) | {'met' if rate >= TARGET_ROWS_PER_SECOND else 'MISSED'} |",
        f"| peak memory < {TARGET_PEAK_MB} MB | **{peak:.0f} MB** (highest run) |"
        f" {'met' if peak < TARGET_PEAK_MB else 'MISSED'} |",
    ]
    if crash is not None:
        lines.append(
            f"| killed halfway, the restart finishes without redoing finished batches |"
            f" SIGKILL after {crash['killed_after_seconds']:.1f} s at"
            f" {crash['done_when_killed']:,} rows done, {crash['half_done_rows']} half-done rows;"
            f" the restart re-encrypted {crash['resumed_reencrypted']:,} ciphertexts"
            f" (expected {crash['expected_reencrypted']:,}) at"
            f" {crash['resumed_rows_per_second']:,.0f} rows/s, {crash['left_after_resume']} left;"
            f" {crash['sampled_rows_rewritten']} of {crash['sampled_finished_rows']:,} sampled"
            f" finished rows rewritten; {crash['decrypted_with_final_key_alone']:,} sampled rows"
            f" decrypt with the final key alone | {'met' if crash['ok'] else 'MISSED'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.key_rotation", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--no-kill", action="store_true", help="skip the kill-and-resume part")
    args = parser.parse_args(argv)
    configure_logging("WARNING")
    data, markdown, passed = run(args.rows, args.runs, args.batch_size, not args.no_kill)
    common.save_result("key_rotation", data, markdown)
    print(markdown)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
