"""Row-bound encryption of the secret columns, and registration of every plaintext with the
log redactor the moment it exists in this process."""

from __future__ import annotations

from config.logging import secrets_held
from grantkeeper.crypto import Keyring, associated_data

CONNECTIONS = "connections"
PROVIDERS = "providers"
# Column names (bound into the associated data), not secrets.
ACCESS_TOKEN = "access_token_ct"  # noqa: S105
REFRESH_TOKEN = "refresh_token_ct"  # noqa: S105
CLIENT_SECRET = "client_secret_ct"  # noqa: S105


def seal(keyring: Keyring, table: str, row_id: str, column: str, plaintext: str) -> str:
    secrets_held.add(plaintext)
    return keyring.encrypt(plaintext, associated_data(table, row_id, column))


def unseal(keyring: Keyring, table: str, row_id: str, column: str, ciphertext: str) -> str:
    plaintext = keyring.decrypt(ciphertext, associated_data(table, row_id, column))
    secrets_held.add(plaintext)
    return plaintext


def reseal(keyring: Keyring, table: str, row_id: str, column: str, ciphertext: str) -> str:
    """Open ``ciphertext`` and seal its plaintext again under the primary key, bound to the same
    table, row and column (key rotation): one associated data, one registration."""
    aad = associated_data(table, row_id, column)
    plaintext = keyring.decrypt(ciphertext, aad)
    secrets_held.add(plaintext)
    return keyring.encrypt(plaintext, aad)
