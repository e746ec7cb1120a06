"""End to end: no token or secret leaks into anything observable, with every logger at DEBUG.

The whole flow runs for real: the operator CLI as subprocesses (``providers add`` with the
client secret on stdin, ``connections import`` with token JSON on stdin, ``token``,
``refresh``, ``revoke``, ``connections list``, ``audit``), a ``celery worker`` and ``celery
beat`` at ``--loglevel DEBUG`` with ``GRANTKEEPER_LOG_LEVEL=DEBUG`` refreshing short-lived
tokens at oidc-provider, a grant revoked at the provider behind grantkeeper's back (one failed
refresh in the worker, one through the CLI), and revocations (one of them failing at the
provider, so a token is parked in ``pending_revocations``). The provider is made careless: a
proxy in front of it rewrites every error answer so that its ``error_description`` quotes the
token the request presented, as some providers do; so every error text grantkeeper derives
from a provider's answer carries a secret.

The secrets are every token the provider issued (the import responses, plus every answer
recorded by a proxy in front of its token endpoint, plus every token grantkeeper stored,
decrypted from the database twice a second and from the cache entries seen in Redis), the
client secret, the Redis password and the encryption key. Broker and cache are a test-owned
``redis-server`` watched through ``MONITOR`` for the whole run.

Scanned, for every secret in plain, JSON-escaped, URL-encoded and base64 forms (see
:mod:`tests.support.leak_scan`): the worker's and beat's stdout and stderr, every CLI
process's stdout and stderr (except the one stdout whose job is to print an access token:
``grantkeeper token``), the MONITOR stream, dumps of every Redis key and value (mid-run and
final), redis-server's log, and every database table outside its ciphertext columns (which
must hold only ``gk1.`` ciphertexts). Canaries planted in Redis, in the audit table and in the
Celery queue name must be found where they were put, so a channel that silently recorded
nothing cannot pass; tests/unit/test_leak_scan.py is the scanner's own negative control.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote_plus

import pytest
from sqlalchemy import Engine, text

from config.settings import Settings
from grantkeeper import repository, sealing
from grantkeeper.crypto import associated_data
from grantkeeper.errors import DecryptionError
from grantkeeper.models import REAUTH_REQUIRED, REVOKED
from grantkeeper.revoke import PENDING, TOKEN_COLUMN
from grantkeeper.runtime import Runtime
from tests.conftest import make_settings
from tests.support.leak_scan import Finding, LeakScanner, Secret
from tests.support.oidc_peer import ClientSpec, OidcPeer
from tests.support.processes import ROOT, settings_env, stop
from tests.support.redis_observer import RedisMonitor, dump_redis, unescape_monitor
from tests.support.redis_server import RedisServer
from tests.support.token_recorder import TokenRecorder

pytestmark = pytest.mark.e2e

ACCESS_TTL = 10  # seconds at the provider: a refresh every ~4 s per connection
CYCLES = 2  # scheduled refreshes per connection before the CLI part starts
ACCOUNTS = ("alice", "bob", "carol")
# Characters that URL-encoding and Basic auth change, so those encodings differ from plain.
CLIENT_SECRET = f"leak+test/{uuid.uuid4().hex}=~!client-secret"
CLIENT = ClientSpec("gk-leak-client", CLIENT_SECRET, "client_secret_basic")
# Canaries go through real channels and must be found there: a channel that silently
# recorded nothing, or a scanner that finds nothing, cannot pass. The first is planted in Redis
# (base64-embedded) and in the audit table (URL-encoded); the second is the Celery queue name,
# so the worker's banner, the broker traffic and its bindings carry it.
CANARY = f"canary+/{uuid.uuid4().hex}=~!not-a-secret"
QUEUE_CANARY = f"gk-leak-queue-{uuid.uuid4().hex}"
GRANTKEEPER = Path(sys.executable).with_name("grantkeeper")
CIPHERTEXT = re.compile(r"gk1\.[A-Za-z0-9_-]{1,32}\.[A-Za-z0-9_-]+")
CIPHERTEXT_BYTES = re.compile(CIPHERTEXT.pattern.encode())
# Columns that legitimately hold ciphertexts; everything else in the database is scanned.
CIPHERTEXT_COLUMNS = {
    "connections": {"access_token_ct", "refresh_token_ct"},
    "providers": {"client_secret_ct"},
    "pending_revocations": {"token_ct"},
}


# -- what the run produced -------------------------------------------------------------------


@dataclass
class Observations:
    channels: dict[str, bytes] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # value -> label
    stored: set[str] = field(default_factory=set)  # plaintexts decrypted from grantkeeper

    def add_secret(self, label: str, value: str) -> None:
        self.secrets.setdefault(value, label)

    def add_channel(self, name: str, data: bytes) -> None:
        self.channels[name] = self.channels.get(name, b"") + data


class Cli:
    """``grantkeeper ...`` as a subprocess with the test's environment; output recorded."""

    def __init__(self, env: dict[str, str], cwd: Path, seen: Observations):
        self.env = env
        self.cwd = cwd
        self.seen = seen
        self.count = 0

    def run(
        self, *args: str, stdin: str = "", expect: int = 0, keep_stdout: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        self.count += 1
        result = subprocess.run(
            [str(GRANTKEEPER), *args],
            input=stdin.encode(),
            capture_output=True,
            cwd=self.cwd,
            env=self.env,
            timeout=90,
            check=False,
        )
        name = f"cli#{self.count} `grantkeeper {' '.join(args[:2])}`"
        if keep_stdout:
            self.seen.add_channel(f"{name} stdout", result.stdout)
        self.seen.add_channel(f"{name} stderr", result.stderr)
        assert result.returncode == expect, (
            f"{name} exited {result.returncode}, expected {expect}; stderr tail:\n"
            f"{result.stderr.decode(errors='replace')[-3000:]}"
        )
        return result


def start_celery(role: str, env: dict[str, str], cwd: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``celery -A worker <role> --loglevel DEBUG``, stdout and stderr in separate files."""
    args = [sys.executable, "-m", "celery", "-A", "worker", role, "--loglevel", "DEBUG", *extra]
    with (cwd / f"{role}.stdout").open("wb") as out, (cwd / f"{role}.stderr").open("wb") as err:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )


def _unseal_or_none(rt: Runtime, table: str, row_id: str, column: str, ct: str) -> str | None:
    try:
        return rt.keyring.decrypt(ct, associated_data(table, row_id, column))
    except DecryptionError:
        return None


def stored_plaintexts(engine: Engine, rt: Runtime) -> set[str]:
    """Every token grantkeeper holds right now, decrypted."""
    found: set[str] = set()
    with engine.connect() as conn:
        for row in conn.execute(
            text("SELECT id, access_token_ct, refresh_token_ct FROM connections")
        ):
            for column, ct in (
                (sealing.ACCESS_TOKEN, row.access_token_ct),
                (sealing.REFRESH_TOKEN, row.refresh_token_ct),
            ):
                if ct:
                    plain = _unseal_or_none(rt, sealing.CONNECTIONS, row.id, column, ct)
                    assert plain is not None, f"connections.{column} of {row.id} did not decrypt"
                    found.add(plain)
        for row in conn.execute(text("SELECT id, token_ct FROM pending_revocations")):
            plain = _unseal_or_none(rt, PENDING, row.id, TOKEN_COLUMN, row.token_ct)
            assert plain is not None, f"pending_revocations.token_ct of {row.id} did not decrypt"
            found.add(plain)
    return found


class StoredPoller:
    """Decrypts grantkeeper's stored tokens twice a second in a background thread."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.found: set[str] = set()
        self.polls = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stored-poller", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.found |= stored_plaintexts(self.rt.engine, self.rt)
                self.polls += 1
                self._stop.wait(0.5)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self) -> StoredPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise RuntimeError(f"poller failed: {self.error!r}") from self.error


def cache_plaintexts(rt: Runtime, monitor_text: bytes, ids: list[str]) -> set[str]:
    """Decrypt every ciphertext seen passing through Redis (cache entries are bound to their
    connection's access_token_ct; parked sets may hold refresh tokens too)."""
    found: set[str] = set()
    for ct in {m.decode() for m in CIPHERTEXT_BYTES.findall(monitor_text)}:
        for connection_id in ids:
            for column in (sealing.ACCESS_TOKEN, sealing.REFRESH_TOKEN):
                plain = _unseal_or_none(rt, sealing.CONNECTIONS, connection_id, column, ct)
                if plain is not None:
                    found.add(plain)
    return found


def database_channels(engine: Engine) -> tuple[dict[str, bytes], int, list[str]]:
    """Each table as JSON lines without its ciphertext columns; the row count; and problems
    with the ciphertext columns (anything that is not a ``gk1.`` ciphertext)."""
    channels: dict[str, bytes] = {}
    rows_seen = 0
    problems: list[str] = []
    with engine.connect() as conn:
        tables = conn.execute(
            text(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1"
            )
        ).scalars()
        for table in list(tables):
            skip = CIPHERTEXT_COLUMNS.get(table, set())
            lines = []
            for row in conn.execute(text(f'SELECT * FROM "{table}"')).mappings():  # noqa: S608
                rows_seen += 1
                for column in skip:
                    value = row[column]
                    if value is not None and not CIPHERTEXT.fullmatch(str(value)):
                        problems.append(f"{table}.{column} holds a non-ciphertext value")
                lines.append(
                    json.dumps({k: v for k, v in row.items() if k not in skip}, default=str)
                )
            channels[f"database table {table}"] = "\n".join(lines).encode()
    return channels, rows_seen, problems


def wait_for(
    what: str, predicate: Callable[[], bool], timeout: float, *procs: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def connection_rows(rt: Runtime) -> dict[str, repository.ConnectionRecord]:
    with rt.engine.connect() as conn:
        return {r.account: r for r in repository.list_connections(conn)}


def revoke_at_provider(rt: Runtime, peer: OidcPeer, connection_id: str) -> None:
    """Behind grantkeeper's back: the provider revokes the grant (all its tokens)."""
    with rt.engine.connect() as conn:
        record = repository.get_connection(conn, connection_id)
    assert record is not None
    assert record.refresh_token_ct is not None
    refresh_token = sealing.unseal(
        rt.keyring, sealing.CONNECTIONS, record.id, sealing.REFRESH_TOKEN, record.refresh_token_ct
    )
    assert peer.revoke(CLIENT, refresh_token, "refresh_token") == 200


def plant_canary(rt: Runtime, prefix: str) -> None:
    """Into Redis (base64 at an odd offset: a command and a value) and into the audit table
    (URL-encoded in the details JSON)."""
    with rt.engine.begin() as conn:
        repository.insert_audit_events(
            conn,
            [
                {
                    "at": datetime.now(UTC),
                    "event": "test.canary",
                    "outcome": "ok",
                    "actor": "leak-test",
                    "details": {"note": quote_plus(CANARY)},
                }
            ],
        )
    rt.redis.set(f"{prefix}canary", b64encode(b"x:" + CANARY.encode()))


# -- the flow ----------------------------------------------------------------------------------


@dataclass
class Flow:
    """The run's moving parts and what it left behind for the scan."""

    rt: Runtime
    env: dict[str, str]
    cwd: Path
    redis_url: str
    seen: Observations
    ids: dict[str, str] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)
    cli: Cli = field(init=False)

    def __post_init__(self) -> None:
        self.cli = Cli(self.env, self.cwd, self.seen)

    def connect(self, peer: OidcPeer, recorder: TokenRecorder) -> None:
        """``providers add`` (secret on stdin), then ``connections import`` of real grants."""
        self.cli.run(
            "providers", "add", "oidc",
            "--token-url", f"{recorder.url}/token",
            "--revocation-url", f"{recorder.url}/token/revocation",
            "--client-id", CLIENT.client_id,
            "--client-secret-stdin",
            stdin=CLIENT_SECRET + "\n",
        )  # fmt: skip
        for account in ACCOUNTS:
            response = peer.obtain_tokens(CLIENT, account=account)
            for name in ("access_token", "refresh_token", "id_token"):
                self.seen.add_secret(f"{name} of the import of {account}", response[name])
            done = self.cli.run(
                "connections", "import", "--provider", "oidc", "--account", account,
                stdin=json.dumps(response),
            )  # fmt: skip
            self.ids[account] = done.stdout.decode().strip()

    def with_worker_and_beat(self, peer: OidcPeer) -> None:
        """Scheduled refreshes for a few cycles; a grant the worker finds revoked; the CLI's
        ``token`` and ``refresh`` while the worker runs."""
        worker = start_celery("worker", self.env, self.cwd)
        beat = start_celery("beat", self.env, self.cwd, "--schedule", str(self.cwd / "schedule"))
        try:
            wait_for(
                f"{CYCLES} scheduled refreshes of every connection",
                lambda: min(r.refresh_count for r in connection_rows(self.rt).values()) >= CYCLES,
                ACCESS_TTL * (CYCLES + 3),
                worker,
                beat,
            )
            self.seen.add_channel("redis dump (mid-run)", dump_redis(self.redis_url)[0])
            self._worker_meets_revoked_grant(peer, worker, beat)
            printed = self.cli.run("token", self.ids["alice"], keep_stdout=False).stdout
            self.facts["printed token"] = printed.decode().strip()
            self.cli.run("refresh", self.ids["alice"])
        finally:
            stop(beat)
            stop(worker)

    def _worker_meets_revoked_grant(self, peer: OidcPeer, *procs: subprocess.Popen[bytes]) -> None:
        # Revoked again if the worker rotated the token between our read and the revocation.
        for _ in range(3):
            revoke_at_provider(self.rt, peer, self.ids["carol"])
            try:
                wait_for(
                    "the worker to find carol's grant revoked",
                    lambda: connection_rows(self.rt)["carol"].status == REAUTH_REQUIRED,
                    ACCESS_TTL,
                    *procs,
                )
            except AssertionError:
                if any(proc.poll() is not None for proc in procs):
                    raise
                continue
            return
        pytest.fail("the worker never reported carol's revoked grant")

    def without_worker(self, peer: OidcPeer, recorder: TokenRecorder) -> None:
        """Failures through the CLI (nothing left to race it), revocations, read commands."""
        revoke_at_provider(self.rt, peer, self.ids["bob"])
        self.facts["failed refresh"] = self.cli.run("refresh", self.ids["bob"], expect=1).stderr
        self.cli.run("token", self.ids["bob"], expect=1)  # unavailable: exception text
        # A real token response refused on import (the account exists): the error must not
        # echo it.
        refused = peer.obtain_tokens(CLIENT, account="alice")
        for name in ("access_token", "refresh_token", "id_token"):
            self.seen.add_secret(f"{name} of the refused import", refused[name])
        self.cli.run(
            "connections", "import", "--provider", "oidc", "--account", "alice",
            stdin=json.dumps(refused), expect=1,
        )  # fmt: skip
        # The provider fails the first revocation request (alice's refresh token): it is
        # parked, encrypted, in pending_revocations. Its access token is revoked.
        recorder.fail_revocations(1)
        self.facts["revoke"] = self.cli.run("revoke", self.ids["alice"]).stderr
        self.cli.run("revoke", self.ids["carol"])
        self.cli.run("connections", "list", "--json")
        self.cli.run("connections", "show", self.ids["bob"], "--json")
        self.cli.run("audit", "--json")


def collect(flow: Flow, monitor: RedisMonitor, server: RedisServer) -> dict[str, int]:
    """Every channel into ``flow.seen``; counts for the report."""
    seen, cwd = flow.seen, flow.cwd
    monitor_text = monitor.text()
    seen.add_channel("redis MONITOR", monitor_text)
    seen.add_channel("redis MONITOR (unescaped)", unescape_monitor(monitor_text))
    seen.stored |= cache_plaintexts(flow.rt, monitor_text, list(flow.ids.values()))
    for role in ("worker", "beat"):
        for stream in ("stdout", "stderr"):
            seen.add_channel(f"{role} {stream}", (cwd / f"{role}.{stream}").read_bytes())
    seen.add_channel("redis-server log", server.log_path.read_bytes())
    db_channels, db_rows, problems = database_channels(flow.rt.engine)
    for name, data in db_channels.items():
        seen.add_channel(name, data)
    flow.facts["ciphertext problems"] = problems
    with flow.rt.engine.connect() as conn:
        audit_rows = conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()
        pending = conn.execute(text("SELECT count(*) FROM pending_revocations")).scalar_one()
    return {
        "monitor lines": len(monitor.lines),
        "monitor bytes": len(monitor_text),
        "database rows": db_rows,
        "audit events": audit_rows,
        "pending revocations": pending,
    }


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer.start(tmp_path / "redis", password=f"redis-pw-{uuid.uuid4().hex}") as server:
        yield server


@pytest.fixture
def leak_settings(
    pg_database: str, keyring_spec: str, _migrated: None, redis_server: RedisServer
) -> Settings:
    return make_settings(
        database_url=pg_database,
        redis_url=redis_server.url,
        redis_key_prefix=f"gkleak{uuid.uuid4().hex[:6]}:",
        celery_queue=QUEUE_CANARY,
        encryption_keys=keyring_spec,
        log_level="DEBUG",
        log_http_bodies=True,  # httpx and httpcore at DEBUG too: every logger
        scan_interval_seconds=1,
        refresh_margin_seconds=6,
        min_token_validity_seconds=1,
        clock_skew_seconds=1,
        http_connect_timeout_seconds=2,
        http_read_timeout_seconds=5,
        lock_ttl_seconds=20,
        lock_wait_seconds=15,
        worker_concurrency=4,
    )


@pytest.fixture
def leak_runtime(leak_settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(leak_settings, actor="leak-test")
    with rt.engine.begin() as conn:
        conn.execute(text("TRUNCATE providers, connections, audit_events, pending_revocations"))
    try:
        yield rt
    finally:
        rt.close()


def test_no_secret_leaks_anywhere(
    leak_runtime: Runtime, redis_server: RedisServer, keyring_spec: str, tmp_path: Path
) -> None:
    """Through import, DEBUG-logged scheduled refreshes, CLI reads and refreshes, a grant
    revoked at the provider (failed refreshes in the worker and in the CLI), and revocations,
    no token, client secret, Redis password or encryption key appears in any log, CLI output,
    Redis command or value, or database column outside the ciphertext columns."""
    started = time.monotonic()
    rt = leak_runtime
    cwd = tmp_path / "cwd"  # no .env here: the children's settings come from the environment
    cwd.mkdir()
    env = settings_env(rt.settings, PYTHONPATH=str(ROOT))
    flow = Flow(rt, env, cwd, redis_server.url, Observations())
    seen = flow.seen
    with RedisMonitor(redis_server.url) as monitor:
        with (
            OidcPeer.start([CLIENT], access_ttl=ACCESS_TTL) as peer,
            TokenRecorder(peer.issuer, echo_tokens=True) as recorder,
            StoredPoller(rt) as poller,
        ):
            phases = {"start": time.monotonic() - started}
            flow.connect(peer, recorder)
            phases["connect"] = time.monotonic() - started - sum(phases.values())
            flow.with_worker_and_beat(peer)
            phases["worker and beat"] = time.monotonic() - started - sum(phases.values())
            flow.without_worker(peer, recorder)
            phases["cli after"] = time.monotonic() - started - sum(phases.values())
            peer_stats = peer.stats()
        seen.stored |= poller.found | stored_plaintexts(rt.engine, rt)
        plant_canary(rt, rt.settings.redis_key_prefix)
        final_dump, key_count = dump_redis(redis_server.url)
        seen.add_channel("redis dump (final)", final_dump)
    counts = collect(flow, monitor, redis_server)

    # -- the secrets -----------------------------------------------------------------------
    issued = recorder.tokens()
    for number, (name, value) in enumerate(issued, 1):
        seen.add_secret(f"{name} #{number} answered by the token endpoint", value)
    known = set(seen.secrets)
    assert seen.stored <= known, "grantkeeper stored tokens the provider never answered with"
    assert flow.facts["printed token"] in known, "`grantkeeper token` printed no token we know"
    seen.add_secret("the client secret", CLIENT_SECRET)
    assert redis_server.password is not None
    seen.add_secret("the Redis password", redis_server.password)
    for entry in keyring_spec.split(","):
        seen.add_secret("an encryption key", entry.split(":", 1)[1])
    secrets = [Secret(label, value) for value, label in seen.secrets.items()]
    canaries = [Secret("the canary", CANARY), Secret("the queue-name canary", QUEUE_CANARY)]
    scanner = LeakScanner([*secrets, *canaries])

    # -- the scan --------------------------------------------------------------------------
    scan_started = time.monotonic()
    findings: list[Finding] = []
    for name, data in seen.channels.items():
        findings += scanner.scan(name, data)
    scan_seconds = time.monotonic() - scan_started
    canary_labels = {c.label for c in canaries}
    leaks = [f for f in findings if f.secret not in canary_labels]
    process_bytes = sum(
        len(v) for k, v in seen.channels.items() if k.startswith(("worker", "beat"))
    )
    cli_bytes = sum(len(v) for k, v in seen.channels.items() if k.startswith("cli#"))
    print(
        f"\nno-leak e2e: {time.monotonic() - started:.1f}s (scan {scan_seconds:.2f}s,"
        f" phases {', '.join(f'{k} {v:.1f}s' for k, v in phases.items())});"
        f" {len(secrets)} secrets ({len(issued)} tokens in token-endpoint answers,"
        f" {len(seen.stored)} distinct stored tokens decrypted over {poller.polls} polls),"
        f" {scanner.pattern_count} patterns; {len(seen.channels)} channels,"
        f" {sum(scanner.scanned_bytes.values())} bytes scanned incl. decoded views;"
        f" worker and beat output {process_bytes} bytes; CLI output {cli_bytes} bytes"
        f" ({flow.cli.count} runs);"
        f" MONITOR {counts['monitor lines']} lines ({counts['monitor bytes']} bytes);"
        f" {key_count} Redis keys at the end; {counts['database rows']} database rows"
        f" ({counts['audit events']} audit events, {counts['pending revocations']} pending"
        f" revocations); provider {peer_stats}"
    )

    # -- the flow did what it says ---------------------------------------------------------
    rows = connection_rows(rt)
    assert rows["alice"].status == REVOKED
    assert rows["bob"].status == REAUTH_REQUIRED
    assert rows["carol"].status == REVOKED
    failed = flow.facts["failed refresh"]
    assert isinstance(failed, bytes)
    assert b"permanent" in failed
    assert b"invalid_grant" in failed
    # The careless provider's quoted tokens did reach grantkeeper, which scrubbed them.
    assert b"(token [redacted])" in failed
    revoke_stderr = flow.facts["revoke"]
    assert isinstance(revoke_stderr, bytes)
    assert b"failed_will_retry" in revoke_stderr
    # (Rich takes "[redacted]" for markup here and prints "(token )".)
    assert b"(token " in revoke_stderr
    assert counts["pending revocations"] == 1
    assert peer_stats["reuse_detections"] == 0
    for role in ("worker", "beat"):
        assert b'"level": "debug"' in seen.channels[f"{role} stderr"], f"{role}: no DEBUG lines"
    assert seen.channels["worker stdout"].count(b'"event": "refresh.succeeded"') >= CYCLES
    assert any(b'"level": "debug"' in v for k, v in seen.channels.items() if k.startswith("cli#"))

    # -- the verdict -----------------------------------------------------------------------
    assert not flow.facts["ciphertext problems"], flow.facts["ciphertext problems"]
    expected = {
        "the canary": {"redis MONITOR", "redis dump (final)", "database table audit_events"},
        "the queue-name canary": {"worker stdout", "redis MONITOR", "redis dump (final)"},
    }
    for label, channels in expected.items():
        found = {f.channel.split(" [")[0] for f in findings if f.secret == label}
        assert channels <= found, f"{label} was not found where it was planted: {sorted(found)}"
    if leaks:
        shown = "\n".join(f"  - {f}" for f in leaks[:40])
        more = f"\n  ... and {len(leaks) - 40} more" if len(leaks) > 40 else ""
        pytest.fail(f"{len(leaks)} secret leak(s) found:\n{shown}{more}", pytrace=False)
