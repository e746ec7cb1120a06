"""Classified errors. Every failure grantkeeper reports carries a class an operator can act on.

``error_class`` is the stable, machine-readable name stored on the connection row and in
the audit trail; messages never contain a token or secret.
"""

from __future__ import annotations


class GrantkeeperError(Exception):
    """Base of every classified error."""

    error_class = "error"


class ConfigurationError(GrantkeeperError):
    error_class = "configuration"


class KeyringError(ConfigurationError):
    """The keyring is missing or malformed: the process must not start."""

    error_class = "keyring"


class RedisTlsError(ConfigurationError):
    """Redis's TLS certificate did not verify against the configured CA (or a TLS file of the
    URL could not be loaded). Not an outage: retrying cannot help, so it is not a
    ``redis.RedisError`` and no fallback swallows it."""

    error_class = "redis_tls"


class DecryptionError(GrantkeeperError):
    """A ciphertext did not decrypt: tampered, copied to another row, or its key is missing."""

    error_class = "decryption_failed"

    def __init__(self, message: str, *, key_id: str | None = None, reason: str = "tampered"):
        super().__init__(message)
        self.key_id = key_id
        self.reason = reason  # "tampered" | "unknown_key" | "malformed"


class ConnectionNotFound(GrantkeeperError):
    error_class = "not_found"


class ConnectionUnavailable(GrantkeeperError):
    """The connection exists but cannot yield a token (revoked, needs re-authorization)."""

    error_class = "unavailable"

    def __init__(self, connection_id: str, status: str):
        super().__init__(
            f"connection {connection_id} is {status}: it yields no token until it is"
            " re-authorized (grantkeeper connections authorize)"
        )
        self.status = status


class LockNotAcquired(GrantkeeperError):
    """Someone else is refreshing this connection. Contention, never a credential failure."""

    error_class = "lock_contention"


class ProviderError(GrantkeeperError):
    """The token endpoint's answer was not a usable token response."""

    error_class = "provider_error"
    permanent = False

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        oauth_error: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.http_status = http_status
        self.oauth_error = oauth_error
        self.retry_after = retry_after


class PermanentProviderError(ProviderError):
    """The grant is dead (invalid_grant, invalid_client...): re-authorization is required."""

    error_class = "permanent"
    permanent = True


class TransientProviderError(ProviderError):
    """Network errors, timeouts, 5xx, 429: retried with backoff."""

    error_class = "transient"


class MalformedResponse(TransientProviderError):
    """A response that is not a valid token response (HTML, truncated, missing fields)."""

    error_class = "malformed_response"


class RotationLost(PermanentProviderError):
    """``invalid_grant`` after an attempt that died between the provider's answer and the
    commit: the provider rotated the refresh token and the new one never reached storage."""

    error_class = "rotation_lost"


class DatabaseUnavailable(GrantkeeperError):
    error_class = "database_unavailable"


class FencedWrite(GrantkeeperError):
    """The row's version moved while we held the lock: our write was refused."""

    error_class = "fenced"


class WorkerRefreshError(GrantkeeperError):
    """``GRANTKEEPER_API_REFRESH=worker``: the refresh could not be requested from the worker
    (broker unreachable)."""

    error_class = "worker_refresh"


class WorkerRefreshTimeout(WorkerRefreshError):
    """The worker did not store a servable token within ``lock_wait_seconds``: no worker is
    consuming the queue, or it is backlogged. Not a credential failure: try again."""

    error_class = "worker_refresh_timeout"


class WorkerRefreshFailed(WorkerRefreshError):
    """The worker tried and the refresh failed (its class is recorded on the connection and in
    the audit trail); the worker retries on its own schedule."""

    error_class = "worker_refresh_failed"
