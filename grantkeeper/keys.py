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

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from grantkeeper import repository, sealing
from grantkeeper.crypto import FORMAT_VERSION, KEY_ID_PATTERN, key_id_of
from grantkeeper.errors import DecryptionError, GrantkeeperError
from grantkeeper.revoke import PENDING as PENDING_TABLE
from grantkeeper.revoke import TOKEN_COLUMN as PENDING_COLUMN
from grantkeeper.runtime import Runtime

log = structlog.get_logger("grantkeeper.keys")

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


def _reencrypt_table(
    rt: Runtime,
    table: str,
    report: RotationReport,
    progress: Callable[[RotationProgress], None] | None,
    pause: float,
) -> None:
    prefix = _primary_prefix(rt.keyring.primary_id)
    after: str | None = None
    while True:
        with rt.engine.connect() as conn:
            rows = repository.rows_to_reencrypt(conn, table, prefix, after, report.batch_size)
        if not rows:
            return
        after = rows[-1].id
        _reencrypt_batch(rt, rows, report)
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
        if len(rows) < report.batch_size:
            return
        if pause > 0:
            time.sleep(pause)


def _reencrypt_batch(rt: Runtime, rows: list[repository.SealedRow], report: RotationReport) -> None:
    """Open and re-seal outside any transaction, then swap in one short transaction."""
    keyring = rt.keyring
    swaps: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    table = rows[0].table
    for row in rows:
        report.rows += 1
        for column, old in row.ciphertexts.items():
            try:
                plaintext = sealing.unseal(keyring, row.table, row.id, column, old)
            except DecryptionError as exc:
                _failed(rt, report, row, column, old, exc)
                continue
            new = sealing.seal(keyring, row.table, row.id, column, plaintext)
            swaps[column].append((row.id, old, new))
    with rt.engine.begin() as conn:
        for column, items in swaps.items():
            written = repository.swap_ciphertexts(conn, table, column, items)
            report.by_kind[_KIND_OF[(table, column)].name] += written
            report.superseded += len(items) - written
    report.batches += 1
    if table == ACCESS_TOKENS.table:
        # The cache holds encrypted access tokens: drop this batch's, so none under the old
        # key lingers. A refresh that cached a newer one just costs one database read.
        _drop_cached(rt, report, [i for i, _, _ in swaps.get(ACCESS_TOKENS.column, [])])


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


def _drop_cached(rt: Runtime, report: RotationReport, connection_ids: list[str]) -> None:
    if not connection_ids:
        return
    try:
        pipe = rt.redis.pipeline(transaction=False)
        for connection_id in connection_ids:
            pipe.delete(rt.cache.access_key(connection_id))
        report.cache_dropped += sum(int(n) for n in pipe.execute())
    except redis.RedisError as exc:
        report.cache_errors += 1
        log.warning("keys.cache_drop_failed", error_class=type(exc).__name__)


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
