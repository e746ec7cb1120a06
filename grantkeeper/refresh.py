"""The refresh of one connection: lock, re-read, call the provider, fenced write, cache, audit.

Ordering is the safety argument:

1. Take the connection's Redis lock (owner token, TTL longer than the worst provider call).
   Without Redis there is no lock, and without a lock there is no refresh (fail closed).
2. Re-read the row under the lock. If its version moved since we looked, another process
   refreshed it: use that result, do not call the provider (a second call would present a
   consumed refresh token, and reuse detection would kill the grant).
3. Renew the lock to its full TTL, then call the provider.
4. Persist first: ``UPDATE ... WHERE version = :seen``. Then the cache, then release the
   lock, then the audit event. A failure never overwrites or deletes a stored token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import redis
import structlog
from redis.exceptions import LockError
from sqlalchemy.exc import SQLAlchemyError

from grantkeeper import repository, sealing
from grantkeeper.audit import audit_decryption_failure
from grantkeeper.errors import (
    ConnectionNotFound,
    DatabaseUnavailable,
    DecryptionError,
    FencedWrite,
    GrantkeeperError,
    ProviderError,
    RotationLost,
)
from grantkeeper.models import ACTIVE, REAUTH_REQUIRED
from grantkeeper.oauth import ProviderEndpoint
from grantkeeper.repository import ConnectionRecord, ProviderRecord
from grantkeeper.runtime import Runtime
from grantkeeper.timing import backoff_seconds, cache_ttl_seconds, is_due
from grantkeeper.token_response import TokenSet

log = structlog.get_logger("grantkeeper.refresh")


class Outcome(StrEnum):
    REFRESHED = "refreshed"
    NOT_DUE = "not_due"
    REFRESHED_ELSEWHERE = "refreshed_elsewhere"
    CONTENDED = "contended"
    UNAVAILABLE = "unavailable"
    FAILED_TRANSIENT = "failed_transient"
    FAILED_PERMANENT = "failed_permanent"
    FAILED = "failed"
    PROVIDER_BACKOFF = "provider_backoff"  # the provider's breaker is open: not a failure
    PARKED = "parked"  # the provider answered, the database did not: the new set is in Redis


@dataclass(frozen=True)
class RefreshResult:
    outcome: Outcome
    connection_id: str
    version: int
    access_expires_at: datetime | None
    access_token_ct: str | None = None
    error: GrantkeeperError | None = None
    notes: tuple[str, ...] = ()
    queued_cleared: bool = False  # the scan's queued marker went with the lock's release

    @property
    def ok(self) -> bool:
        return self.outcome in {
            Outcome.REFRESHED,
            Outcome.REFRESHED_ELSEWHERE,
            Outcome.NOT_DUE,
            Outcome.PARKED,
        }

    @property
    def retry_after(self) -> float | None:
        return self.error.retry_after if isinstance(self.error, ProviderError) else None


def endpoint_for(runtime: Runtime, provider: ProviderRecord) -> ProviderEndpoint:
    secret = sealing.unseal(
        runtime.keyring,
        sealing.PROVIDERS,
        provider.id,
        sealing.CLIENT_SECRET,
        provider.client_secret_ct,
    )
    ttl = provider.default_access_ttl or runtime.settings.default_access_ttl_seconds
    return ProviderEndpoint(
        token_url=provider.token_url,
        auth_method=provider.auth_method,
        client_id=provider.client_id,
        client_secret=secret,
        default_access_ttl=timedelta(seconds=ttl),
    )


@dataclass(frozen=True)
class _Request:
    reason: str
    force: bool
    seen_version: int | None  # None: a scheduled refresh, decided under the lock alone
    rotation_cutoff: datetime | None


class RefreshService:
    def __init__(self, runtime: Runtime, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.rt = runtime
        self.clock = clock
        self.margin = timedelta(seconds=runtime.settings.refresh_margin_seconds)

    # -- reading ---------------------------------------------------------------------------

    def _load(self, connection_id: str) -> tuple[ConnectionRecord, ProviderRecord]:
        with self.rt.autocommit_engine.connect() as conn:
            found = repository.get_connection_with_provider(conn, connection_id)
        if found is None:
            raise ConnectionNotFound(f"no connection {connection_id}")
        record, provider = found
        if provider is None:
            raise ConnectionNotFound(f"connection {connection_id} has no provider")
        return record, provider

    def _result(
        self, outcome: Outcome, record: ConnectionRecord, error: GrantkeeperError | None = None
    ) -> RefreshResult:
        return RefreshResult(
            outcome=outcome,
            connection_id=record.id,
            version=record.version,
            access_expires_at=record.access_expires_at,
            access_token_ct=record.access_token_ct,
            error=error,
        )

    # -- the refresh -----------------------------------------------------------------------

    def refresh(
        self,
        connection_id: str,
        *,
        reason: str,
        force: bool = False,
        wait: float = 0.0,
        seen_version: int | None = None,
        rotation_cutoff: datetime | None = None,
        clear_queued: bool = False,
    ) -> RefreshResult:
        """Refresh one connection if it is due (or ``force``), under its lock.

        ``seen_version``: the version the caller based its decision on; if the row moved past
        it by the time we hold the lock, someone else refreshed and we return their result.
        ``rotation_cutoff``: the monthly rotation's question instead of "is the access token
        due": was the refresh token issued before the cutoff, and not yet tried since?
        ``clear_queued``: drop the scan's queued marker with the lock's release (the task's
        job, done in the same round trip); ``RefreshResult.queued_cleared`` says if it was.
        """
        started = time.monotonic()
        read_first: tuple[ConnectionRecord, ProviderRecord] | None = None
        if force or seen_version is not None or wait > 0:
            # The caller's view of the row matters (a forced or on-demand refresh): read it
            # before the lock, so that a refresh finishing while we wait counts as done. A
            # scheduled refresh needs no such view: under the lock, "still due?" decides.
            read_first = self._load(connection_id)
            if seen_version is None:
                seen_version = read_first[0].version
        request = _Request(reason, force, seen_version, rotation_cutoff)
        if read_first is not None:
            record, provider = read_first
            if record.status != ACTIVE:
                return self._skip(Outcome.UNAVAILABLE, record, provider, reason, started)
            if not self._wanted(record, request):
                return self._skip(Outcome.NOT_DUE, record, provider, reason, started)
        settings = self.rt.settings
        lock = self.rt.cache.lock(connection_id, settings.lock_ttl_seconds, None)
        # A dead Redis raises here: no lock, no refresh. The caller retries later.
        lock_asked = time.monotonic()
        observed = self._acquire_or_observe(lock, connection_id, seen_version, wait)
        if observed is not None:
            return observed
        if not lock.owned():
            record, provider = read_first or self._load(connection_id)
            return self._skip(Outcome.CONTENDED, record, provider, reason, started)
        lock_waited = time.monotonic() - lock_asked
        queued = [self.rt.cache.queued_key(connection_id)] if clear_queued else []
        try:
            result, provider = self._refresh_locked(connection_id, request, lock)
        finally:
            try:
                self.rt.cache.release(lock, also_delete=queued)
            except LockError:
                log.warning("refresh.lock_lost", connection_id=connection_id)
        self._audit(result, provider, reason, started, lock_waited)
        return replace(result, queued_cleared=clear_queued)

    def _acquire_or_observe(
        self, lock: redis.lock.Lock, connection_id: str, seen_version: int | None, wait: float
    ) -> RefreshResult | None:
        """Take the lock, or, while someone else holds it, watch the cache for the version they
        are writing. Waiters do not queue on the lock one after another: in a stampede they
        all see the new token a few milliseconds after the refresher caches it."""
        deadline = time.monotonic() + wait
        pause = 0.005
        while True:
            if lock.acquire(blocking=False):
                return None
            if seen_version is None:
                return None  # nothing to compare with: contended, not refreshed elsewhere
            cached = self.rt.cache.get(connection_id)
            if cached is not None and cached.version > seen_version:
                return RefreshResult(
                    outcome=Outcome.REFRESHED_ELSEWHERE,
                    connection_id=connection_id,
                    version=cached.version,
                    access_expires_at=cached.expires_at,
                    access_token_ct=cached.ciphertext,
                )
            if time.monotonic() + pause > deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 1.5, 0.02)

    def _wanted(self, record: ConnectionRecord, request: _Request) -> bool:
        if request.force:
            return True
        if request.rotation_cutoff is not None:
            cutoff = request.rotation_cutoff
            issued = record.refresh_issued_at
            checked = record.rotation_checked_at
            return issued is not None and issued < cutoff and (checked is None or checked < cutoff)
        return is_due(self.clock(), self.margin, record.access_issued_at, record.access_expires_at)

    def _nothing_to_do(self, record: ConnectionRecord, request: _Request) -> RefreshResult | None:
        """Under the lock: has someone else refreshed, revoked, or made it not due?"""
        if record.status != ACTIVE:
            return self._result(Outcome.UNAVAILABLE, record)
        if request.seen_version is None:  # a scheduled refresh: is it still due?
            return None if self._wanted(record, request) else self._result(Outcome.NOT_DUE, record)
        if record.version != request.seen_version or not self._wanted(record, request):
            return self._result(Outcome.REFRESHED_ELSEWHERE, record)
        return None

    def _refresh_locked(
        self, connection_id: str, request: _Request, lock: redis.lock.Lock
    ) -> tuple[RefreshResult, ProviderRecord]:
        record, provider = self._load(connection_id)
        return self._refresh_loaded(record, provider, request, lock), provider

    def _refresh_loaded(
        self,
        record: ConnectionRecord,
        provider: ProviderRecord,
        request: _Request,
        lock: redis.lock.Lock,
    ) -> RefreshResult:
        window = self.rt.crash_window
        # The crash window's and the provider breaker's state in one round trip.
        pipe = self.rt.redis.pipeline(transaction=False)
        window.queue_state(pipe, record.id)
        self.rt.breaker.queue_state(pipe, provider.id)
        window_state, breaker_ms, breaker_fails = pipe.execute()
        parked, inflight_version = window.parse_state(window_state)
        breaker_open_for, breaker_counting = self.rt.breaker.parse_state(breaker_ms, breaker_fails)
        if parked is not None:
            # A new token set is waiting for the database: never refresh with the old token.
            return self._commit_parked(record.id)
        early = self._nothing_to_do(record, request)
        if early is not None:
            return early
        if breaker_open_for > 0:
            return self._result(Outcome.PROVIDER_BACKOFF, record)
        try:
            refresh_token = self._open_refresh_token(record)
            endpoint = endpoint_for(self.rt, provider)
        except DecryptionError as exc:
            # Never sent anywhere, never overwritten: the stored ciphertext stays as evidence.
            audit_decryption_failure(
                self.rt.auditor,
                exc,
                connection_id=record.id,
                provider=provider.name,
            )
            retry_at = self.clock() + timedelta(
                seconds=backoff_seconds(record.failure_count, base=60, cap=3600)
            )
            self._record_failure(record, exc.error_class, None, next_attempt_at=retry_at)
            return self._result(Outcome.FAILED, record, exc)
        # A marker left at this version means an earlier attempt may have rotated the token
        # and died (or lost the answer) before its commit.
        earlier_attempt_unfinished = inflight_version == record.version
        window.begin(record.id, record.version, lock)  # and the call gets the lock's full TTL
        try:
            tokens = self.rt.oauth.refresh(endpoint, refresh_token)
        except ProviderError as exc:
            if exc.http_status is not None:
                window.end(record.id)  # a definite answer: this attempt rotated nothing
            return self._provider_failed(record, provider, exc, earlier_attempt_unfinished)
        if breaker_counting:
            self.rt.breaker.record_success(provider.id)
        return self._persist(
            record, tokens, refresh_token, rotation=request.rotation_cutoff is not None
        )

    def _open_refresh_token(self, record: ConnectionRecord) -> str:
        if record.refresh_token_ct is None:
            raise DecryptionError("connection has no refresh token", reason="missing")
        return sealing.unseal(
            self.rt.keyring,
            sealing.CONNECTIONS,
            record.id,
            sealing.REFRESH_TOKEN,
            record.refresh_token_ct,
        )

    def _provider_failed(
        self,
        record: ConnectionRecord,
        provider: ProviderRecord,
        exc: ProviderError,
        earlier_attempt_unfinished: bool,
    ) -> RefreshResult:
        if exc.permanent:
            # Before concluding the grant is dead: did someone rotate it under us?
            current, _ = self._load(record.id)
            if current.version != record.version:
                return self._result(Outcome.REFRESHED_ELSEWHERE, current)
            error: ProviderError = exc
            if exc.oauth_error == "invalid_grant" and earlier_attempt_unfinished:
                error = RotationLost(
                    "invalid_grant after an earlier attempt at this version got no answer or"
                    " died before its commit: the rotated refresh token was lost in that window",
                    http_status=exc.http_status,
                    oauth_error=exc.oauth_error,
                )
            self._record_failure(record, error.error_class, REAUTH_REQUIRED)
            self.rt.notifier.send(
                "connection.reauth_required",
                connection_id=record.id,
                provider=provider.name,
                error_class=error.error_class,
                oauth_error=error.oauth_error,
            )
            return self._result(Outcome.FAILED_PERMANENT, record, error)
        attempts = record.failure_count + 1
        delay = backoff_seconds(
            record.failure_count,
            base=self.rt.settings.retry_base_seconds,
            cap=3600,
            retry_after=exc.retry_after,
        )
        self._record_failure(
            record, exc.error_class, None, next_attempt_at=self.clock() + timedelta(seconds=delay)
        )
        self._after_transient(record, provider, exc, attempts)
        return self._result(Outcome.FAILED_TRANSIENT, record, exc)

    def _after_transient(
        self, record: ConnectionRecord, provider: ProviderRecord, exc: ProviderError, attempts: int
    ) -> None:
        cooldown = self.rt.breaker.record_failure(provider.id)
        if cooldown:
            self.rt.auditor.emit(
                "provider.breaker_opened",
                "failed",
                provider=provider.name,
                cooldown_seconds=cooldown,
                error_class=exc.error_class,
            )
        if attempts == self.rt.settings.max_transient_retries:
            self.rt.auditor.emit(
                "refresh.retries_exhausted",
                "failed",
                connection_id=record.id,
                provider=provider.name,
                attempts=attempts,
                error_class=exc.error_class,
            )
            self.rt.notifier.send(
                "refresh.retries_exhausted",
                connection_id=record.id,
                provider=provider.name,
                attempts=attempts,
                access_expires_at=record.access_expires_at,
            )

    def _record_failure(
        self,
        record: ConnectionRecord,
        error_class: str,
        new_status: str | None,
        *,
        next_attempt_at: datetime | None = None,
    ) -> None:
        with self.rt.engine.begin() as conn:
            repository.record_failure(
                conn,
                record.id,
                record.version,
                error_class=error_class,
                new_status=new_status,
                now=self.clock(),
                next_attempt_at=next_attempt_at,
            )
        if new_status is not None:
            self.rt.cache.drop(record.id)

    def _persist(
        self, record: ConnectionRecord, tokens: TokenSet, old_refresh: str, *, rotation: bool
    ) -> RefreshResult:
        keyring = self.rt.keyring
        now = self.clock()
        access_ct = sealing.seal(
            keyring, sealing.CONNECTIONS, record.id, sealing.ACCESS_TOKEN, tokens.access_token
        )
        values: dict[str, object] = {
            "access_token_ct": access_ct,
            "access_expires_at": tokens.expires_at,
            "access_issued_at": now,
            "last_refresh_at": now,
            "refresh_count": record.refresh_count + 1,
            "failure_count": 0,
            "next_attempt_at": None,
            "last_error_class": None,
            "updated_at": now,
        }
        if rotation:
            values["rotation_checked_at"] = now
        rotated = tokens.refresh_token is not None and tokens.refresh_token != old_refresh
        if rotated:
            assert tokens.refresh_token is not None  # noqa: S101 - narrowed by `rotated`
            values["refresh_token_ct"] = sealing.seal(
                keyring, sealing.CONNECTIONS, record.id, sealing.REFRESH_TOKEN, tokens.refresh_token
            )
            values["refresh_issued_at"] = now
        elif record.refresh_token_ct is not None and keyring.needs_reencryption(
            record.refresh_token_ct
        ):
            values["refresh_token_ct"] = sealing.seal(
                keyring, sealing.CONNECTIONS, record.id, sealing.REFRESH_TOKEN, old_refresh
            )
        try:
            with self.rt.autocommit_engine.begin() as conn:  # one statement: its own commit
                written = repository.fenced_update(conn, record.id, record.version, values)
        except SQLAlchemyError:
            return self._park(record, values)
        new_version = record.version + 1
        if not written:
            self.rt.crash_window.end(record.id)
            return self._result(Outcome.FAILED, record, FencedWrite("row changed under the lock"))
        ttl = cache_ttl_seconds(
            now, tokens.expires_at, timedelta(seconds=self.rt.settings.min_token_validity_seconds)
        )
        try:
            # The commit closed the crash window: its marker goes in the cache write's round trip.
            self.rt.cache.put(
                record.id,
                new_version,
                tokens.expires_at,
                access_ct,
                ttl,
                also_delete=[self.rt.crash_window.inflight_key(record.id)],
            )
        except redis.RedisError:
            log.warning("cache.write_failed", connection_id=record.id)
        notes = [] if rotated else ["refresh_token_not_rotated"]
        if tokens.expiry_was_defaulted:
            notes.append("expires_in_missing_default_used")
        return RefreshResult(
            outcome=Outcome.REFRESHED,
            connection_id=record.id,
            version=new_version,
            access_expires_at=tokens.expires_at,
            access_token_ct=access_ct,
            notes=tuple(notes),
        )

    # -- the crash window --------------------------------------------------------------------

    def _park(self, record: ConnectionRecord, values: dict[str, object]) -> RefreshResult:
        """The provider rotated, the database is away: keep the new set (ciphertexts only) in
        Redis. If Redis is gone too, nothing more can be done: say so loudly."""
        payload = json.dumps(
            {"expected_version": record.version, "values": values}, default=_json_default
        )
        try:
            self.rt.crash_window.park(record.id, payload)
        except redis.RedisError:
            log.critical(
                "refresh.rotation_lost", connection_id=record.id, reason="db and redis down"
            )
            raise
        log.error("refresh.parked", connection_id=record.id, reason="database unavailable")
        return self._result(
            Outcome.PARKED, record, DatabaseUnavailable("new tokens parked in Redis")
        )

    def _commit_parked(self, connection_id: str) -> RefreshResult:
        """Move a parked set into the database (caller holds the lock)."""
        raw = self.rt.crash_window.parked(connection_id)
        if raw is None:
            record, _ = self._load(connection_id)
            return self._result(Outcome.REFRESHED_ELSEWHERE, record)
        parked = json.loads(raw)
        values = _revive(parked["values"])
        with self.rt.engine.begin() as conn:
            written = repository.fenced_update(
                conn, connection_id, int(parked["expected_version"]), values
            )
        record, _ = self._load(connection_id)
        self.rt.crash_window.unpark(connection_id)
        self.rt.crash_window.end(connection_id)
        if not written:
            # The row moved on without it (e.g. revoked meanwhile): the parked set is obsolete.
            self.rt.auditor.emit(
                "refresh.parked_discarded",
                "failed",
                connection_id=connection_id,
                version=record.version,
            )
            return self._result(Outcome.FAILED, record, FencedWrite("parked set no longer applies"))
        self.rt.auditor.emit(
            "refresh.parked_committed", "ok", connection_id=connection_id, version=record.version
        )
        return self._result(Outcome.REFRESHED, record)

    def reconcile_parked(self) -> int:
        """Commit every parked set whose connection is not locked right now."""
        committed = 0
        for connection_id in self.rt.crash_window.parked_ids():
            lock = self.rt.cache.lock(connection_id, self.rt.settings.lock_ttl_seconds, None)
            if not lock.acquire(blocking=False):
                continue
            try:
                if self._commit_parked(connection_id).outcome is Outcome.REFRESHED:
                    committed += 1
            finally:
                try:
                    lock.release()
                except LockError:
                    log.warning("reconcile.lock_lost", connection_id=connection_id)
        return committed

    # -- audit -----------------------------------------------------------------------------

    def _skip(
        self,
        outcome: Outcome,
        record: ConnectionRecord,
        provider: ProviderRecord,
        reason: str,
        started: float,
    ) -> RefreshResult:
        result = self._result(outcome, record)
        self._audit(result, provider, reason, started, 0.0)
        return result

    def _audit(
        self,
        result: RefreshResult,
        provider: ProviderRecord,
        reason: str,
        started: float,
        lock_waited: float,
    ) -> None:
        event = {
            Outcome.REFRESHED: "refresh.succeeded",
            Outcome.FAILED_PERMANENT: "refresh.failed",
            Outcome.FAILED_TRANSIENT: "refresh.failed",
            Outcome.FAILED: "refresh.failed",
        }.get(result.outcome, "refresh.skipped")
        details: dict[str, object] = {
            "reason": reason,
            "result": result.outcome.value,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "lock_wait_ms": round(lock_waited * 1000, 1),
        }
        if result.notes:
            details["notes"] = list(result.notes)
        if result.error is not None:
            details["error_class"] = result.error.error_class
            details["error"] = str(result.error)
            if isinstance(result.error, ProviderError):
                details["http_status"] = result.error.http_status
                details["oauth_error"] = result.error.oauth_error
        key_id = None
        if result.access_token_ct is not None:
            key_id = result.access_token_ct.split(".", 2)[1]
        if result.outcome is Outcome.REFRESHED:
            # Say so when a provider kept the old refresh token: a rotation that did not rotate.
            details["refresh_token_rotated"] = "refresh_token_not_rotated" not in result.notes
        if result.outcome is Outcome.REFRESHED and result.access_expires_at is not None:
            details["access_expires_at"] = result.access_expires_at.isoformat()
        outcome = "ok" if result.ok else ("skipped" if event == "refresh.skipped" else "failed")
        self.rt.auditor.emit(
            event,
            outcome,
            connection_id=result.connection_id,
            provider=provider.name,
            key_id=key_id,
            version=result.version,
            **details,
        )


_DATETIME_FIELDS = (
    "access_expires_at",
    "access_issued_at",
    "last_refresh_at",
    "refresh_issued_at",
    "rotation_checked_at",
    "updated_at",
)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def _revive(values: dict[str, object]) -> dict[str, object]:
    return {
        k: datetime.fromisoformat(str(v)) if k in _DATETIME_FIELDS and v is not None else v
        for k, v in values.items()
    }
