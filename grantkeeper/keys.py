"""Encryption-key rotation: what each key protects, re-encryption under the primary, retirement.

Staged rollout (the keyring lives in the environment, ``GRANTKEEPER_ENCRYPTION_KEYS``)::

    1. add the new key as decrypt-only   old:…,new:…   primary old   (restart everything)
    2. promote it                        GRANTKEEPER_PRIMARY_KEY_ID=new (restart everything)
    3. grantkeeper keys rotate           every ciphertext not under the primary is re-encrypted
    4. grantkeeper keys status           the old key protects nothing
    5. grantkeeper keys retire old       then remove it from the keyring

Why re-encryption is safe while workers refresh: it never bumps ``connections.version``. A
refresh in flight holds the connection's lock and will write ``WHERE version = :seen``; if the
rotation bumped the version under it, that fenced write would be refused and the refresh token
the provider just rotated would be lost (and with it the grant). Instead each re-encryption is a
compare-and-swap on the ciphertext itself (:func:`grantkeeper.repository.swap_ciphertexts`):
``SET col = :new WHERE id = :id AND col = :old``, one column at a time. If a refresh wrote first,
the swap matches nothing and there is nothing left to do: its ciphertext is already under the
primary (every process encrypts with the primary once step 2 has reached it). If the swap wrote
first, the refresh's fenced write still succeeds and replaces it. Either way no token is lost.

Killed halfway, a second run carries on: rows already under the primary are not selected again,
so they are never rewritten, and a run with nothing to do writes nothing.

A ciphertext that cannot be opened (its key is not configured, or it fails authentication) is
reported per row and left exactly as it is: never re-saved, never dropped.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

import redis
import structlog

from grantkeeper import repository, sealing
from grantkeeper.crypto import FORMAT_VERSION, KEY_ID_PATTERN, key_id_of
from grantkeeper.errors import DecryptionError, GrantkeeperError
from grantkeeper.revoke import PENDING as PENDING_TABLE
from grantkeeper.revoke import TOKEN_COLUMN as PENDING_COLUMN
from grantkeeper.runtime import Runtime

log = structlog.get_logger("grantkeeper.keys")

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

DEFAULT_BATCH_SIZE = 500
# Failures kept in a report for display (each one is also an audit event): bounded memory even
# if a whole table is under a key that is gone.
MAX_REPORTED_FAILURES = 1000
MALFORMED = "(malformed)"  # not a valid key id, so it never collides with one


class KeyRetireRefused(GrantkeeperError):
    """The key is still needed: it is the primary, or ciphertexts still use it."""

    error_class = "retire_refused"


class RotationIncomplete(GrantkeeperError):
    """Some ciphertexts could not be re-encrypted; they were left untouched."""

    error_class = "rotation_incomplete"


@dataclass(frozen=True)
class CiphertextKind:
    name: str
    table: str  # also what the associated data binds: (table, row id, column)
    column: str
    label: str
    short: str  # a column header


ACCESS_TOKENS = CiphertextKind(
    "access_token",
    sealing.CONNECTIONS,
    sealing.ACCESS_TOKEN,
    "connection access tokens",
    "access tokens",
)
REFRESH_TOKENS = CiphertextKind(
    "refresh_token",
    sealing.CONNECTIONS,
    sealing.REFRESH_TOKEN,
    "connection refresh tokens",
    "refresh tokens",
)
CLIENT_SECRETS = CiphertextKind(
    "client_secret",
    sealing.PROVIDERS,
    sealing.CLIENT_SECRET,
    "provider client secrets",
    "client secrets",
)
PENDING_REVOCATIONS = CiphertextKind(
    "pending_revocation",
    PENDING_TABLE,
    PENDING_COLUMN,
    "pending revocation tokens",
    "pending revocations",
)
KINDS: tuple[CiphertextKind, ...] = (
    ACCESS_TOKENS,
    REFRESH_TOKENS,
    CLIENT_SECRETS,
    PENDING_REVOCATIONS,
)
_KIND_OF = {(k.table, k.column): k for k in KINDS}
_TABLES = tuple(dict.fromkeys(k.table for k in KINDS))


def _primary_prefix(primary_id: str) -> str:
    return f"{FORMAT_VERSION}.{primary_id}."


# -- status ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyUsage:
    key_id: str
    configured: bool
    primary: bool
    counts: dict[str, int]  # kind name -> ciphertexts under this key

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def state(self) -> str:
        if self.primary:
            return "primary"
        return "configured" if self.configured else "unknown"

    def describe_counts(self) -> str:
        parts = [f"{self.counts[k.name]} {k.label}" for k in KINDS if self.counts.get(k.name)]
        return ", ".join(parts) or "nothing"

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "state": self.state,
            "configured": self.configured,
            "primary": self.primary,
            "counts": {k.name: self.counts.get(k.name, 0) for k in KINDS},
            "total": self.total,
        }


@dataclass(frozen=True)
class KeyStatus:
    primary_key_id: str
    configured: tuple[str, ...]
    keys: tuple[KeyUsage, ...]  # the primary, the other configured keys, then unknown ones

    @property
    def unknown(self) -> tuple[str, ...]:
        return tuple(u.key_id for u in self.keys if not u.configured)

    @property
    def to_reencrypt(self) -> int:
        """Ciphertexts not under the primary (unknown keys included: they cannot be opened)."""
        return sum(u.total for u in self.keys if not u.primary)

    def usage(self, key_id: str) -> KeyUsage:
        for u in self.keys:
            if u.key_id == key_id:
                return u
        return KeyUsage(key_id, key_id in self.configured, key_id == self.primary_key_id, {})

    def to_json(self) -> dict[str, Any]:
        return {
            "primary": self.primary_key_id,
            "configured": list(self.configured),
            "unknown": list(self.unknown),
            "to_reencrypt": self.to_reencrypt,
            "kinds": {k.name: k.label for k in KINDS},
            "keys": [u.to_json() for u in self.keys],
        }


def _normalise_key_id(raw: str) -> str:
    return raw if KEY_ID_PATTERN.fullmatch(raw) else MALFORMED


def key_status(rt: Runtime) -> KeyStatus:
    """Ciphertexts per key id and kind, counted by the database (grouped, nothing loaded)."""
    keyring = rt.keyring
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    with rt.engine.connect() as conn:
        for table, column, raw_kid, n in repository.count_ciphertexts_by_key(conn):
            counts[_normalise_key_id(raw_kid)][_KIND_OF[(table, column)].name] += n
    configured = tuple(keyring.keys)
    ordered = [keyring.primary_id, *(k for k in configured if k != keyring.primary_id)]
    ordered += sorted(k for k in counts if k not in keyring.keys)
    usages = tuple(
        KeyUsage(
            key_id=kid,
            configured=kid in keyring.keys,
            primary=kid == keyring.primary_id,
            counts=dict(counts.get(kid, {})),
        )
        for kid in ordered
    )
    return KeyStatus(keyring.primary_id, configured, usages)


# -- rotation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReencryptFailure:
    """One ciphertext that was left as it is. Never holds the ciphertext."""

    kind: str
    table: str
    row_id: str
    column: str
    key_id: str | None
    reason: str  # "unknown_key" | "tampered" | "malformed"
    connection_id: str | None
    provider: str | None

    def describe(self) -> str:
        if self.table == ACCESS_TOKENS.table:
            where = f"connection {self.row_id}"
        elif self.table == CLIENT_SECRETS.table:
            where = f"provider {self.provider} ({self.row_id})"
        else:
            where = f"{self.table} row {self.row_id} (connection {self.connection_id})"
        key = repr(self.key_id) if self.key_id else "(unreadable)"
        return f"{where}: {self.column} under key {key}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "table": self.table,
            "row_id": self.row_id,
            "column": self.column,
            "key_id": self.key_id,
            "reason": self.reason,
            "connection_id": self.connection_id,
            "provider": self.provider,
        }


@dataclass(frozen=True)
class RotationProgress:
    done: int  # ciphertexts handled so far (re-encrypted, superseded or failed)
    total: int  # ciphertexts not under the primary when the run started
    reencrypted: int
    superseded: int
    failed: int
    table: str


@dataclass
class RotationReport:
    primary_key_id: str
    batch_size: int
    total: int = 0  # ciphertexts not under the primary at the start
    rows: int = 0  # rows with at least one ciphertext to handle
    batches: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {k.name: 0 for k in KINDS})
    # Swaps that matched nothing: a refresh or a revocation wrote a newer value first.
    superseded: int = 0
    failed: int = 0
    failures: list[ReencryptFailure] = field(default_factory=list)
    cache_dropped: int = 0
    cache_errors: int = 0
    elapsed_seconds: float = 0.0
    remaining: int = 0  # ciphertexts not under the primary after the run (recounted)

    @property
    def reencrypted(self) -> int:
        return sum(self.by_kind.values())

    @property
    def handled(self) -> int:
        return self.reencrypted + self.superseded + self.failed

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def ciphertexts_per_second(self) -> float:
        return self.reencrypted / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def left_by_others(self) -> int:
        """Ciphertexts still not under the primary that are not this run's failures: something
        kept encrypting with another key while we ran (a process not restarted after the
        promotion). Run again once every process has the new primary."""
        return max(0, self.remaining - self.failed)

    def to_json(self) -> dict[str, Any]:
        return {
            "primary": self.primary_key_id,
            "batch_size": self.batch_size,
            "total": self.total,
            "rows": self.rows,
            "batches": self.batches,
            "reencrypted": self.reencrypted,
            "by_kind": dict(self.by_kind),
            "superseded": self.superseded,
            "failed": self.failed,
            "failures": [f.to_json() for f in self.failures],
            "failures_listed": len(self.failures),
            "cache_dropped": self.cache_dropped,
            "cache_errors": self.cache_errors,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "rows_per_second": round(self.rows_per_second, 1),
            "ciphertexts_per_second": round(self.ciphertexts_per_second, 1),
            "remaining": self.remaining,
            "ok": self.ok,
        }


def reencrypt_all(
    rt: Runtime,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[RotationProgress], None] | None = None,
    pause: float = 0.0,
) -> RotationReport:
    """Re-encrypt every ciphertext that is not under the primary key, in batches by id.

    Safe while workers refresh (see the module docstring), resumable and idempotent. Memory is
    bounded by ``batch_size``. ``pause`` waits between batches to spare a busy database.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    primary = rt.keyring.primary_id
    report = RotationReport(primary_key_id=primary, batch_size=batch_size)
    before = key_status(rt)
    report.total = before.to_reencrypt
    rt.auditor.emit(
        "key.rotation_started",
        "ok",
        key_id=primary,
        to_reencrypt=report.total,
        by_key={u.key_id: u.total for u in before.keys if not u.primary and u.total},
        unknown_keys=list(before.unknown),
        batch_size=batch_size,
    )
    started = time.monotonic()
    # A rotation allocates many short-lived objects per batch, which triggers full garbage
    # collections; each one walks every long-lived object of the process (~100 ms). Frozen,
    # the objects that existed before the rotation are left out of those walks until it ends.
    gc.freeze()
    try:
        for table in _TABLES:
            _reencrypt_table(rt, table, report, progress, pause)
    except Exception as exc:
        rt.auditor.emit(
            "key.rotation_aborted",
            "error",
            key_id=primary,
            error_class=type(exc).__name__,
            reencrypted=report.reencrypted,
            batches=report.batches,
        )
        raise
    finally:
        gc.unfreeze()
    report.elapsed_seconds = time.monotonic() - started
    report.remaining = key_status(rt).to_reencrypt
    _sweep_cache(rt, report, lambda kid: kid != primary)
    rt.auditor.emit(
        "key.rotation_completed",
        "ok" if report.ok and not report.left_by_others else "partial",
        key_id=primary,
        reencrypted=report.reencrypted,
        by_kind=dict(report.by_kind),
        rows=report.rows,
        batches=report.batches,
        superseded=report.superseded,
        failures=report.failed,
        remaining=report.remaining,
        cache_dropped=report.cache_dropped,
        cache_errors=report.cache_errors,
        elapsed_seconds=round(report.elapsed_seconds, 3),
        rows_per_second=round(report.rows_per_second, 1),
    )
    return report


class _Pending(Protocol[_T_co]):
    def result(self) -> _T_co: ...


class _Deferred(Generic[_T]):
    """Runs its call when its result is first asked for: the sequential path."""

    def __init__(self, fn: Callable[[], _T]) -> None:
        self._fn: Callable[[], _T] | None = fn
        self._value: _T | None = None

    def result(self) -> _T:
        if self._fn is not None:
            self._value, self._fn = self._fn(), None
        return cast(_T, self._value)


@dataclass(frozen=True)
class _Resealed:
    """One batch, opened and sealed again under the primary: what to swap in the database."""

    table: str
    swaps: list[repository.RowSwap]
    attempted: dict[str, int]  # column -> swaps in this batch


@dataclass(frozen=True)
class _Written:
    attempted: dict[str, int]
    written: dict[str, int]  # column -> ciphertexts that took their new value
    cache_dropped: int
    cache_error: bool


def _reencrypt_table(
    rt: Runtime,
    table: str,
    report: RotationReport,
    progress: Callable[[RotationProgress], None] | None,
    pause: float,
) -> None:
    """Keyset batches by id. On PostgreSQL (without ``pause``) the batches flow through a
    three-stage pipeline: one thread reads the next batch and another writes the previous one
    while this thread decrypts and encrypts the current one, so the database and the CPU-bound
    crypto overlap. Each batch is still one short transaction, committed in order; the report
    and the progress callback are only touched from this thread."""
    prefix = _primary_prefix(rt.keyring.primary_id)
    pipelined = pause <= 0 and rt.engine.dialect.name == "postgresql"

    def read(after: str | None) -> list[repository.SealedRow]:
        with rt.engine.connect() as conn:
            return repository.rows_to_reencrypt(conn, table, prefix, after, report.batch_size)

    with (
        ThreadPoolExecutor(1, "gk-rotate-read") as reader,
        ThreadPoolExecutor(1, "gk-rotate-write") as writer,
    ):

        def later(fn: Callable[..., _T], *args: Any) -> _Pending[_T]:
            return writer.submit(fn, *args) if pipelined else _Deferred(lambda: fn(*args))

        def read_later(after: str | None) -> _Pending[list[repository.SealedRow]]:
            return reader.submit(read, after) if pipelined else _Deferred(lambda: read(after))

        writes: deque[_Pending[_Written]] = deque()
        next_rows: _Pending[list[repository.SealedRow]] | None = read_later(None)
        while next_rows is not None:
            rows = next_rows.result()
            if not rows:
                break
            more = len(rows) >= report.batch_size
            next_rows = read_later(rows[-1].id) if more else None
            writes.append(later(_write_batch, rt, _reseal_batch(rt, rows, report)))
            while len(writes) > (1 if pipelined else 0):
                _account(report, table, writes.popleft().result(), progress)
                if pause > 0 and more:
                    time.sleep(pause)
        while writes:
            _account(report, table, writes.popleft().result(), progress)


def _account(
    report: RotationReport,
    table: str,
    done: _Written,
    progress: Callable[[RotationProgress], None] | None,
) -> None:
    for column, attempted in done.attempted.items():
        written = done.written.get(column, 0)
        report.by_kind[_KIND_OF[(table, column)].name] += written
        report.superseded += attempted - written
    report.batches += 1
    report.cache_dropped += done.cache_dropped
    report.cache_errors += int(done.cache_error)
    if progress is not None:
        progress(
            RotationProgress(
                done=report.handled,
                total=max(report.total, report.handled),
                reencrypted=report.reencrypted,
                superseded=report.superseded,
                failed=report.failed,
                table=table,
            )
        )


def _reseal_batch(
    rt: Runtime, rows: list[repository.SealedRow], report: RotationReport
) -> _Resealed:
    """Open and re-seal, outside any transaction. A ciphertext that cannot be opened is
    reported (and audited) and left out of the swap."""
    keyring = rt.keyring
    table = rows[0].table
    swaps: list[repository.RowSwap] = []
    attempted: dict[str, int] = defaultdict(int)
    for row in rows:
        report.rows += 1
        columns: dict[str, tuple[str, str]] = {}
        for column, old in row.ciphertexts.items():
            try:
                columns[column] = (old, sealing.reseal(keyring, row.table, row.id, column, old))
            except DecryptionError as exc:
                _failed(rt, report, row, column, old, exc)
                continue
            attempted[column] += 1
        if columns:
            swaps.append(repository.RowSwap(row.id, columns))
    return _Resealed(table, swaps, dict(attempted))


def _write_batch(rt: Runtime, batch: _Resealed) -> _Written:
    """Swap one batch in one short transaction; then drop the cached access tokens of the
    batch, so none under the old key lingers (a refresh that cached a newer one just costs one
    database read)."""
    with rt.engine.begin() as conn:
        written = repository.swap_row_ciphertexts(conn, batch.table, batch.swaps)
    dropped, error = 0, False
    if batch.table == ACCESS_TOKENS.table:
        dropped, error = _drop_cached(
            rt, [s.id for s in batch.swaps if ACCESS_TOKENS.column in s.columns]
        )
    return _Written(batch.attempted, written, dropped, error)


def _failed(
    rt: Runtime,
    report: RotationReport,
    row: repository.SealedRow,
    column: str,
    ciphertext: str,
    exc: DecryptionError,
) -> None:
    key_id = exc.key_id
    if key_id is None:
        try:
            key_id = key_id_of(ciphertext)
        except DecryptionError:
            key_id = None
    failure = ReencryptFailure(
        kind=_KIND_OF[(row.table, column)].name,
        table=row.table,
        row_id=row.id,
        column=column,
        key_id=key_id,
        reason=exc.reason,
        connection_id=row.connection_id,
        provider=row.provider,
    )
    report.failed += 1
    if len(report.failures) < MAX_REPORTED_FAILURES:
        report.failures.append(failure)
    rt.auditor.emit(
        "key.reencrypt_failed",
        "failed",
        connection_id=row.connection_id,
        provider=row.provider,
        key_id=key_id,
        table=row.table,
        row_id=row.id,
        column=column,
        reason=exc.reason,
    )


def _drop_cached(rt: Runtime, connection_ids: list[str]) -> tuple[int, bool]:
    """(cache entries dropped, whether Redis failed)."""
    if not connection_ids:
        return 0, False
    try:
        # One DEL with every key of the batch: one command to build and parse, not thousands.
        return int(rt.redis.delete(*map(rt.cache.access_key, connection_ids))), False
    except redis.RedisError as exc:
        log.warning("keys.cache_drop_failed", error_class=type(exc).__name__)
        return 0, True


def _cached_key_id(raw: Any) -> str | None:
    # Cache values are ``version|expires_epoch|ciphertext`` (grantkeeper.cache.TokenCache).
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        return key_id_of(text.split("|", 2)[2])
    except (IndexError, DecryptionError):
        return None


def _sweep_cache(
    rt: Runtime, report: RotationReport | None, stale: Callable[[str | None], bool]
) -> int | None:
    """Drop cached access tokens whose ciphertext's key id is ``stale``; None if Redis did not
    answer (cached entries expire with their tokens). Closes the window in which a reader that
    loaded a row before its swap re-caches the old ciphertext."""
    dropped = 0
    try:
        for chunk in _chunks(rt.redis.scan_iter(match=rt.cache.access_key("*"), count=1000), 500):
            values = rt.redis.mget(chunk)
            doomed = [
                key
                for key, value in zip(chunk, values, strict=True)
                if value is not None and stale(_cached_key_id(value))
            ]
            if doomed:
                pipe = rt.redis.pipeline(transaction=False)
                for key in doomed:
                    pipe.delete(key)
                dropped += sum(int(n) for n in pipe.execute())
    except redis.RedisError as exc:
        log.warning("keys.cache_sweep_failed", error_class=type(exc).__name__)
        if report is not None:
            report.cache_errors += 1
        return None
    if report is not None:
        report.cache_dropped += dropped
    return dropped


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- retirement --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetireResult:
    key_id: str
    configured: bool
    cache_dropped: int | None  # None: Redis did not answer


def _parked_under(rt: Runtime, key_id: str) -> int:
    """Token sets parked in Redis (no TTL: the only copy of a freshly rotated refresh token
    until the database takes it) holding a ciphertext under ``key_id``. Fails closed: if Redis
    cannot be asked, the key is not declared unused."""
    marker = f"{FORMAT_VERSION}.{key_id}."
    try:
        payloads = (rt.crash_window.parked(cid) for cid in rt.crash_window.parked_ids())
        return sum(1 for payload in payloads if payload and marker in payload)
    except redis.RedisError as exc:
        raise KeyRetireRefused(
            f"could not check Redis for parked token sets ({type(exc).__name__}); try again"
        ) from exc


def retire_key(rt: Runtime, key_id: str) -> RetireResult:
    """Confirm that nothing needs ``key_id`` any more, and record that in the audit trail.

    Refuses the primary, and any key a ciphertext still uses. The keyring lives in the
    environment: removing the key from it is the operator's step, this only says it is safe.
    """
    keyring = rt.keyring
    if key_id not in keyring.keys:
        raise KeyRetireRefused(
            f"key {key_id!r} is not in GRANTKEEPER_ENCRYPTION_KEYS: there is nothing to retire"
            " (`grantkeeper keys status` lists the configured key ids)"
        )
    if key_id == keyring.primary_id:
        raise KeyRetireRefused(
            f"key {key_id!r} is the primary key: promote another key first"
            " (GRANTKEEPER_PRIMARY_KEY_ID), run `grantkeeper keys rotate`, then retire this one"
        )
    usage = key_status(rt).usage(key_id)
    if usage.total:
        raise KeyRetireRefused(
            f"key {key_id!r} still protects {usage.total} ciphertext(s)"
            f" ({usage.describe_counts()}): run `grantkeeper keys rotate` first"
        )
    parked = _parked_under(rt, key_id)
    if parked:
        raise KeyRetireRefused(
            f"key {key_id!r} still protects {parked} token set(s) parked in Redis by a refresh"
            " whose database write failed; they are committed by the next refresh or reconcile:"
            " wait for that, run `grantkeeper keys rotate`, then retire again"
        )
    # Cached access tokens are derived data: drop any still under this key.
    dropped = _sweep_cache(rt, None, lambda kid: kid == key_id)
    rt.auditor.emit(
        "key.retired",
        "ok",
        key_id=key_id,
        configured=key_id in keyring.keys,
        primary=keyring.primary_id,
        cache_dropped=dropped,
    )
    return RetireResult(key_id=key_id, configured=key_id in keyring.keys, cache_dropped=dropped)
