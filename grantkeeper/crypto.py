"""AES-256-GCM encryption of tokens and client secrets, with a keyring and row binding.

Ciphertext format (text, so it fits any column type)::

    gk1.<key id>.<base64url(nonce || ciphertext || tag)>

The key id travels in the ciphertext so that any configured key decrypts it, and rotation
is "decrypt with the named key, encrypt with the primary". The associated data binds every
ciphertext to the table, row and field it was written for, so a ciphertext copied to another
connection or field fails authentication instead of decrypting to someone else's token.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from grantkeeper.errors import DecryptionError, KeyringError

FORMAT_VERSION = "gk1"
NONCE_BYTES = 12  # the GCM standard nonce size; random per encryption
KEY_BYTES = 32  # AES-256
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

GENERATE_HINT = (
    "set GRANTKEEPER_ENCRYPTION_KEYS to a keyring; create one with `grantkeeper keys generate`"
)


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def associated_data(table: str, row_id: str, column: str) -> bytes:
    """What a ciphertext is bound to: it decrypts only in this table, row and column."""
    return f"{FORMAT_VERSION}|{table}|{row_id}|{column}".encode()


def key_id_of(ciphertext: str) -> str:
    """The key id named by a ciphertext, without decrypting it."""
    parts = ciphertext.split(".", 2)
    if len(parts) != 3 or parts[0] != FORMAT_VERSION or not KEY_ID_PATTERN.fullmatch(parts[1]):
        raise DecryptionError("malformed ciphertext", reason="malformed")
    return parts[1]


@dataclass(frozen=True)
class Keyring:
    """The configured keys. The primary encrypts; every key decrypts (staged rollout)."""

    keys: Mapping[str, bytes] = field(repr=False)
    primary_id: str

    @classmethod
    def parse(cls, spec: str | None, primary_id: str | None = None) -> Keyring:
        """Parse ``kid:base64url-key,kid2:...``; the primary defaults to the first entry."""
        if not spec or not spec.strip():
            raise KeyringError(f"no encryption key configured: {GENERATE_HINT}")
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for raw_entry in spec.split(","):
            entry = raw_entry.strip()
            if not entry:
                continue
            kid, sep, encoded = entry.partition(":")
            if not sep or not KEY_ID_PATTERN.fullmatch(kid):
                # Never quote the entry: without its ':' the "key id" may be the key itself.
                position = len(keys) + 1
                raise KeyringError(
                    f"keyring entry {position} is not 'KEY_ID:BASE64KEY' with a key id of"
                    f" letters, digits, '_' or '-' (entries are separated by ','):"
                    f" {GENERATE_HINT}"
                )
            if kid in keys:
                raise KeyringError(f"key id {kid!r} appears twice in the keyring")
            try:
                key = _b64decode(encoded.strip())
            except (binascii.Error, ValueError) as exc:
                raise KeyringError(f"key {kid!r} is not valid base64url") from exc
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key {kid!r} is {len(key) * 8} bits; 256 bits are required")
            keys[kid] = key
            order.append(kid)
        if not keys:
            raise KeyringError(f"the keyring is empty: {GENERATE_HINT}")
        primary = primary_id or order[0]
        if primary not in keys:
            raise KeyringError(f"primary key id {primary!r} is not in the keyring")
        return cls(keys=keys, primary_id=primary)

    def __post_init__(self) -> None:
        # One AESGCM object per key, built once: constructing it costs more than a decrypt.
        object.__setattr__(self, "_ciphers", {kid: AESGCM(key) for kid, key in self.keys.items()})

    def _cipher(self, kid: str) -> AESGCM:
        ciphers: dict[str, AESGCM] = self.__dict__["_ciphers"]
        return ciphers[kid]

    def __repr__(self) -> str:
        return f"Keyring(key_ids={sorted(self.keys)}, primary_id={self.primary_id!r})"

    def encrypt(self, plaintext: str, aad: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._cipher(self.primary_id).encrypt(nonce, plaintext.encode(), aad)
        return f"{FORMAT_VERSION}.{self.primary_id}.{_b64encode(nonce + sealed)}"

    def decrypt(self, ciphertext: str, aad: bytes) -> str:
        """Plaintext, or a classified :class:`DecryptionError`; never garbage."""
        kid = key_id_of(ciphertext)
        key = self.keys.get(kid)
        if key is None:
            raise DecryptionError(
                f"ciphertext is under key {kid!r}, which is not configured",
                key_id=kid,
                reason="unknown_key",
            )
        try:
            blob = _b64decode(ciphertext.split(".", 2)[2])
        except (binascii.Error, ValueError) as exc:
            raise DecryptionError("malformed ciphertext", key_id=kid, reason="malformed") from exc
        if len(blob) < NONCE_BYTES + 16:
            raise DecryptionError("ciphertext too short", key_id=kid, reason="malformed")
        try:
            plain = self._cipher(kid).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise DecryptionError(
                "ciphertext failed authentication: tampered, copied from another row or field,"
                f" or this process's key {kid!r} is not the key that sealed it (the same key id"
                " with other key material: check GRANTKEEPER_ENCRYPTION_KEYS on this host)",
                key_id=kid,
                reason="tampered",
            ) from exc
        return plain.decode()

    def needs_reencryption(self, ciphertext: str) -> bool:
        return key_id_of(ciphertext) != self.primary_id


def generate_key_entry(now: datetime | None = None) -> str:
    """A new ``kid:key`` keyring entry: 256 bits from the OS CSPRNG, a dated key id."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d")
    kid = f"k{stamp}{secrets.token_hex(2)}"
    return f"{kid}:{_b64encode(secrets.token_bytes(KEY_BYTES))}"
