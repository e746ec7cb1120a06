"""Revocation: at the provider (RFC 7009) where it can be done, and always locally.

Under the connection's lock: read the tokens, ask the provider to revoke the refresh token
(first: it ends the grant) and then the access token, then destroy the local ciphertexts and
mark the connection revoked, whatever the provider said. A provider that failed does not hold
the local revocation back: the tokens it still has to revoke are parked, encrypted and bound
to a ``pending_revocations`` row, and retried in the background until it confirms.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import redis
import structlog
from redis.exceptions import LockError

from config.presets import PRESETS
from grantkeeper import repository, sealing
from grantkeeper.audit import audit_decryption_failure
from grantkeeper.errors import ConnectionNotFound, DecryptionError, LockNotAcquired
from grantkeeper.models import REVOKED
from grantkeeper.oauth import RevocationAnswer, revoke_token
from grantkeeper.refresh import endpoint_for
from grantkeeper.repository import ConnectionRecord, ProviderRecord
from grantkeeper.runtime import Runtime
from grantkeeper.timing import backoff_seconds

log = structlog.get_logger("grantkeeper.revoke")

ACCESS_COLUMN = "access_token_ct"
REFRESH_COLUMN = "refresh_token_ct"
PENDING = "pending_revocations"
TOKEN_COLUMN = "token_ct"  # noqa: S105 - a column name
# After this long a parked token is dropped (audited): access tokens have expired by then, and
# an operator has had a week of audit events saying the provider refuses.
GIVE_UP_AFTER = timedelta(days=7)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RevokeResult:
    connection_id: str
    provider: str
    # "revoked" | "no_endpoint" | "local_only" | "failed_will_retry" | "already_revoked"
    provider_outcome: str
    provider_note: str | None = None
    answers: dict[str, str] = field(default_factory=dict)
    # False when Redis could not be cleared: a cached access token may still be served until
    # it expires. Revoking again once Redis is back clears it.
    cache_cleared: bool = True

    @property
    def retry_scheduled(self) -> bool:
        return self.provider_outcome == "failed_will_retry"


def withdrawal_note(provider: ProviderRecord) -> str:
    """What a person must do at a provider that has no revocation endpoint."""
    for preset_name, preset in PRESETS.items():
        if preset.token_url == provider.token_url and preset.revocation_note:
            return f"{preset_name} has no revocation endpoint: {preset.revocation_note}"
    return (
        f"provider {provider.name} has no revocation endpoint: withdraw grantkeeper's access in"
        " the provider's own settings"
    )


class RevokeService:
    def __init__(self, rt: Runtime, clock: Callable[[], datetime] = _now):
        self.rt = rt
        self.clock = clock

    def revoke(self, connection_id: str, *, reason: str, local_only: bool = False) -> RevokeResult:
        lock = self.rt.cache.lock(connection_id, self.rt.settings.lock_ttl_seconds, None)
        held = self._acquire(lock)
        try:
            result = self._revoke_locked(connection_id, reason, local_only)
        finally:
            if held:
                try:
                    lock.release()
                except LockError:
                    log.warning("revoke.lock_lost", connection_id=connection_id)
        return result

    def _acquire(self, lock: redis.lock.Lock) -> bool:
        """Wait out a refresh in flight (its lock outlives its provider call). Without Redis no
        refresh can start either, so revocation, a safety action, proceeds unlocked."""
        try:
            if lock.acquire(blocking=True, blocking_timeout=self.rt.settings.lock_ttl_seconds):
                return True
        except redis.RedisError:
            log.warning("revoke.without_lock", reason="redis unavailable")
            return False
        raise LockNotAcquired("the connection's lock is held beyond its TTL; try again")

    def _load(self, connection_id: str) -> tuple[ConnectionRecord, ProviderRecord]:
        with self.rt.engine.connect() as conn:
            found = repository.get_connection_with_provider(conn, connection_id)
        if found is None or found[1] is None:
            raise ConnectionNotFound(f"no connection {connection_id}")
        return found[0], found[1]

    def _parked_ciphertexts(self, record: ConnectionRecord) -> dict[str, str]:
        """A token set parked during a database outage is the newest one: revoke that."""
        try:
            raw = self.rt.crash_window.parked(record.id)
        except redis.RedisError:
            return {}
        if raw is None:
            return {}
        values = json.loads(raw).get("values", {})
        return {k: v for k, v in values.items() if k in (ACCESS_COLUMN, REFRESH_COLUMN) and v}

    def _open_tokens(self, record: ConnectionRecord) -> dict[str, str]:
        """The tokens to revoke at the provider, refresh token first. A ciphertext that does not
        decrypt cannot be revoked remotely; it is reported and still destroyed locally."""
        tokens: dict[str, str] = {}
        newest = self._parked_ciphertexts(record)
        for hint, column, ciphertext in (
            (
                "refresh_token",
                sealing.REFRESH_TOKEN,
                newest.get(REFRESH_COLUMN, record.refresh_token_ct),
            ),
            (
                "access_token",
                sealing.ACCESS_TOKEN,
                newest.get(ACCESS_COLUMN, record.access_token_ct),
            ),
        ):
            if ciphertext is None:
                continue
            try:
                tokens[hint] = sealing.unseal(
                    self.rt.keyring, sealing.CONNECTIONS, record.id, column, ciphertext
                )
            except DecryptionError as exc:
                audit_decryption_failure(
                    self.rt.auditor,
                    exc,
                    connection_id=record.id,
                    column=column,
                )
        return tokens

    def _revoke_locked(self, connection_id: str, reason: str, local_only: bool) -> RevokeResult:
        record, provider = self._load(connection_id)
        if record.status == REVOKED and not record.refresh_token_ct and not record.access_token_ct:
            # Idempotent, and the way to finish a revocation whose cache purge failed.
            cleared = self._forget_in_redis(record.id)
            result = RevokeResult(
                connection_id, provider.name, "already_revoked", cache_cleared=cleared
            )
            self._audit(result, record, reason, local_only)
            return result
        tokens = self._open_tokens(record)
        unrevoked: dict[str, str] = {}
        answers: dict[str, str] = {}
        note = None
        if local_only:
            outcome = "local_only"
        elif provider.revocation_url is None:
            outcome, note = "no_endpoint", withdrawal_note(provider)
        else:
            try:
                endpoint = endpoint_for(self.rt, provider)
            except DecryptionError as exc:
                # Without the client secret the provider cannot be asked now. That must not
                # hold the local revocation back: the tokens are parked for the retry, which
                # succeeds once the key that opens the secret is configured again.
                audit_decryption_failure(
                    self.rt.auditor,
                    exc,
                    connection_id=record.id,
                    provider=provider.name,
                    column=sealing.CLIENT_SECRET,
                )
                answers = dict.fromkeys(
                    tokens, f"not sent: client secret unreadable ({exc.reason})"
                )
                unrevoked = dict(tokens)
            else:
                for hint, token in tokens.items():
                    answer = revoke_token(
                        self.rt.oauth, provider.revocation_url, endpoint, token, hint
                    )
                    answers[hint] = _describe(answer)
                    if not answer.done:
                        unrevoked[hint] = token
            outcome = "failed_will_retry" if unrevoked else "revoked"
        self._destroy_locally(record, provider, unrevoked)
        cleared = self._forget_in_redis(record.id)
        result = RevokeResult(connection_id, provider.name, outcome, note, answers, cleared)
        self._audit(result, record, reason, local_only)
        return result

    def _destroy_locally(
        self, record: ConnectionRecord, provider: ProviderRecord, unrevoked: dict[str, str]
    ) -> None:
        now = self.clock()
        parked = []
        for hint, token in unrevoked.items():
            pending_id = str(uuid.uuid4())
            parked.append(
                {
                    "id": pending_id,
                    "connection_id": record.id,
                    "provider_id": provider.id,
                    "token_ct": sealing.seal(
                        self.rt.keyring, PENDING, pending_id, TOKEN_COLUMN, token
                    ),
                    "token_type_hint": hint,
                    "attempts": 1,
                    "created_at": now,
                    "next_attempt_at": now + timedelta(seconds=backoff_seconds(1)),
                }
            )
        with self.rt.engine.begin() as conn:
            current = repository.get_connection(conn, record.id)
            version = current.version if current else record.version
            repository.destroy_tokens(conn, record.id, version, status=REVOKED, now=now)
            repository.insert_pending_revocations(conn, parked)

    def _forget_in_redis(self, connection_id: str) -> bool:
        try:
            self.rt.cache.forget(connection_id)
        except redis.RedisError:
            log.warning("revoke.cache_drop_failed", connection_id=connection_id)
            return False
        return True

    def _audit(
        self, result: RevokeResult, record: ConnectionRecord, reason: str, local_only: bool
    ) -> None:
        self.rt.auditor.emit(
            "connection.revoked",
            "ok" if result.provider_outcome != "failed_will_retry" else "partial",
            connection_id=record.id,
            provider=result.provider,
            version=record.version + (0 if result.provider_outcome == "already_revoked" else 1),
            reason=reason,
            local_only=local_only,
            provider_outcome=result.provider_outcome,
            cache_cleared=result.cache_cleared,
            provider_answers=result.answers,
            note=result.provider_note,
        )

    # -- background retries ------------------------------------------------------------------

    def retry_pending(self, limit: int = 200) -> tuple[int, int]:
        """Retry parked provider revocations that are due. Returns (done, still pending)."""
        now = self.clock()
        with self.rt.engine.connect() as conn:
            due = repository.due_pending_revocations(conn, now, limit)
        done = 0
        for row in due:
            if self._retry_one(row, now):
                done += 1
        return done, len(due) - done

    def _retry_one(self, row: dict[str, object], now: datetime) -> bool:
        pending_id = str(row["id"])
        with self.rt.engine.connect() as conn:
            provider = repository.get_provider(conn, str(row["provider_id"]))
        created = row["created_at"]
        assert isinstance(created, datetime)  # noqa: S101
        created = created if created.tzinfo else created.replace(tzinfo=UTC)
        if provider is None or provider.revocation_url is None or now - created > GIVE_UP_AFTER:
            with self.rt.engine.begin() as conn:
                repository.delete_pending_revocation(conn, pending_id)
            self.rt.auditor.emit(
                "revocation.abandoned",
                "failed",
                connection_id=str(row["connection_id"]),
                provider=provider.name if provider else None,
                token_type_hint=str(row["token_type_hint"]),
                attempts=row["attempts"],
            )
            return False
        attempts = int(str(row["attempts"]))
        try:
            token = sealing.unseal(
                self.rt.keyring, PENDING, pending_id, TOKEN_COLUMN, str(row["token_ct"])
            )
            endpoint = endpoint_for(self.rt, provider)
        except DecryptionError as exc:
            # One unreadable row (a key not configured on this process) must not stop the
            # other retries: it waits, and is abandoned after GIVE_UP_AFTER like any other.
            with self.rt.engine.begin() as conn:
                repository.postpone_pending_revocation(
                    conn,
                    pending_id,
                    next_attempt_at=now + timedelta(seconds=backoff_seconds(attempts, cap=3600)),
                    error=f"unreadable here ({exc.reason})",
                )
            audit_decryption_failure(
                self.rt.auditor,
                exc,
                connection_id=str(row["connection_id"]),
                provider=provider.name,
                source="pending_revocation",
            )
            return False
        answer = revoke_token(
            self.rt.oauth, provider.revocation_url, endpoint, token, str(row["token_type_hint"])
        )
        with self.rt.engine.begin() as conn:
            if answer.done:
                repository.delete_pending_revocation(conn, pending_id)
            else:
                repository.postpone_pending_revocation(
                    conn,
                    pending_id,
                    next_attempt_at=now + timedelta(seconds=backoff_seconds(attempts, cap=3600)),
                    error=answer.detail,
                )
        self.rt.auditor.emit(
            "revocation.provider_retry",
            "ok" if answer.done else "failed",
            connection_id=str(row["connection_id"]),
            provider=provider.name,
            token_type_hint=str(row["token_type_hint"]),
            attempts=attempts + 1,
            answer=_describe(answer),
        )
        return answer.done


def _describe(answer: RevocationAnswer) -> str:
    if answer.done:
        return f"HTTP {answer.http_status}: {answer.detail}"
    status = f"HTTP {answer.http_status}" if answer.http_status else "no answer"
    return f"{status}: {answer.detail}"
