"""AES-256-GCM keyring: round trip, row binding, tamper detection, keyring parsing."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

import pytest

from grantkeeper.crypto import (
    FORMAT_VERSION,
    KEY_BYTES,
    Keyring,
    associated_data,
    generate_key_entry,
    key_id_of,
)
from grantkeeper.errors import DecryptionError, KeyringError

PLAINTEXT = "ya29.a0-access-token-plaintext"
AAD = associated_data("connections", "conn-1", "access_token_ct")


def _key_b64(raw: bytes | None = None) -> str:
    raw = raw if raw is not None else secrets.token_bytes(KEY_BYTES)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture
def ring() -> Keyring:
    return Keyring.parse(f"new:{_key_b64()},old:{_key_b64()}")


def test_round_trip(ring: Keyring) -> None:
    """What is encrypted decrypts to the same text, including non-ASCII and empty strings."""
    for text in (PLAINTEXT, "", "päss wörd ✓", "x" * 10_000):
        assert ring.decrypt(ring.encrypt(text, AAD), AAD) == text


def test_ciphertext_names_primary_key_id(ring: Keyring) -> None:
    """The ciphertext is gk1.<primary kid>.<b64url>, and never contains the plaintext."""
    ciphertext = ring.encrypt(PLAINTEXT, AAD)
    version, kid, blob = ciphertext.split(".")
    assert version == FORMAT_VERSION
    assert kid == "new" == ring.primary_id == key_id_of(ciphertext)
    assert PLAINTEXT not in ciphertext
    assert set(blob) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert not ring.needs_reencryption(ciphertext)


def test_explicit_primary_id(ring: Keyring) -> None:
    """primary_id chooses which key encrypts; the first entry is only the default."""
    spec = f"a:{_key_b64()},b:{_key_b64()}"
    assert Keyring.parse(spec).primary_id == "a"
    assert Keyring.parse(spec, primary_id="b").primary_id == "b"
    assert key_id_of(Keyring.parse(spec, primary_id="b").encrypt(PLAINTEXT, AAD)) == "b"


def test_non_primary_key_decrypts_staged_rollout() -> None:
    """A ciphertext under an older (non-primary) key still decrypts, and is flagged for rotation."""
    old_key, new_key = _key_b64(), _key_b64()
    before = Keyring.parse(f"old:{old_key}")
    ciphertext = before.encrypt(PLAINTEXT, AAD)
    after = Keyring.parse(f"new:{new_key},old:{old_key}")
    assert after.primary_id == "new"
    assert after.decrypt(ciphertext, AAD) == PLAINTEXT
    assert after.needs_reencryption(ciphertext)
    # And the reverse: a node that has the new key staged but not yet primary reads new writes.
    staged = Keyring.parse(f"old:{old_key},new:{new_key}")
    assert staged.decrypt(after.encrypt(PLAINTEXT, AAD), AAD) == PLAINTEXT


@pytest.mark.parametrize(
    "other_aad",
    [
        associated_data("connections", "conn-2", "access_token_ct"),
        associated_data("connections", "conn-1", "refresh_token_ct"),
        associated_data("providers", "conn-1", "access_token_ct"),
        b"",
    ],
    ids=["other-row", "other-column", "other-table", "no-aad"],
)
def test_ciphertext_copied_elsewhere_fails_as_tampered(ring: Keyring, other_aad: bytes) -> None:
    """A ciphertext moved to another row, column or table fails authentication."""
    ciphertext = ring.encrypt(PLAINTEXT, AAD)
    with pytest.raises(DecryptionError) as info:
        ring.decrypt(ciphertext, other_aad)
    assert info.value.reason == "tampered"
    assert info.value.key_id == "new"
    assert PLAINTEXT not in str(info.value)


def test_every_flipped_bit_fails_as_tampered(ring: Keyring) -> None:
    """Flipping any single bit of nonce, ciphertext or tag is detected."""
    ciphertext = ring.encrypt("short", AAD)
    prefix, encoded = ciphertext.rsplit(".", 1)
    blob = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        forged = f"{prefix}.{_key_b64(bytes(flipped))}"
        with pytest.raises(DecryptionError) as info:
            ring.decrypt(forged, AAD)
        assert info.value.reason == "tampered", bit


def test_unknown_key_id(ring: Keyring) -> None:
    """A ciphertext under a key this ring lacks fails with reason unknown_key and its key id."""
    foreign = Keyring.parse(f"retired:{_key_b64()}").encrypt(PLAINTEXT, AAD)
    with pytest.raises(DecryptionError) as info:
        ring.decrypt(foreign, AAD)
    assert info.value.reason == "unknown_key"
    assert info.value.key_id == "retired"
    assert "retired" in str(info.value)


@pytest.mark.parametrize(
    "ciphertext",
    [
        "",
        "not a ciphertext",
        "gk1",
        "gk1.new",
        "gk2.new.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "GK1.new.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "gk1.new.",
        "gk1.new.AAAA",  # shorter than nonce + tag
        "gk1.new.A",  # impossible base64 length
        "gk1.new.é-not-ascii",
        "gk1..AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # empty key id
        "gk1.a b.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # key id no keyring can hold
    ],
)
def test_malformed_ciphertext(ring: Keyring, ciphertext: str) -> None:
    """Strings that are not gk1 ciphertexts fail with reason malformed."""
    with pytest.raises(DecryptionError) as info:
        ring.decrypt(ciphertext, AAD)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("spec", [None, "", "   ", ",", " , ,"])
def test_parse_empty_keyring_points_to_generate(spec: str | None) -> None:
    """No key at all is refused with a hint to run `grantkeeper keys generate`."""
    with pytest.raises(KeyringError, match="grantkeeper keys generate"):
        Keyring.parse(spec)


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_parse_rejects_wrong_key_length(size: int) -> None:
    """Only 256-bit keys are accepted (e.g. a 128-bit key is refused)."""
    with pytest.raises(KeyringError, match=f"{size * 8} bits; 256 bits are required"):
        Keyring.parse(f"k1:{_key_b64(secrets.token_bytes(size))}")


def test_parse_rejects_invalid_base64() -> None:
    """A key that is not base64url is refused."""
    with pytest.raises(KeyringError, match="k1"):
        Keyring.parse("k1:A")


def test_parse_rejects_duplicate_key_id() -> None:
    """The same key id twice is refused (which key would decrypt?)."""
    with pytest.raises(KeyringError, match="appears twice"):
        Keyring.parse(f"k1:{_key_b64()},k1:{_key_b64()}")


@pytest.mark.parametrize(
    "kid", ["", "k.1", "k 1", "k/1", "kid!", "ключ", "k1\n", "x" * 33], ids=repr
)
def test_parse_rejects_bad_key_id(kid: str) -> None:
    """Key ids are 1-32 of letters, digits, '_' and '-' (the '.' would break the format)."""
    with pytest.raises(KeyringError, match="KEY_ID:BASE64KEY"):
        Keyring.parse(f"{kid}:{_key_b64()}")


def test_parse_rejects_entry_without_separator() -> None:
    """An entry without 'kid:' is refused, and the message quotes no part of it: without its
    separator, the entry is the key itself."""
    key = _key_b64()
    with pytest.raises(KeyringError, match="KEY_ID:BASE64KEY") as refused:
        Keyring.parse(f"k1:{_key_b64()},{key}")
    assert "entry 2" in str(refused.value)
    assert not any(key[i : i + 6] in str(refused.value) for i in range(len(key) - 6))


def test_parse_accepts_full_range_of_key_id_characters() -> None:
    """Letters, digits, '_' and '-' up to 32 characters make a valid key id."""
    kid = "Az09_-" + "x" * 26
    assert Keyring.parse(f" {kid}:{_key_b64()} ").primary_id == kid


def test_parse_rejects_primary_not_in_ring() -> None:
    """A primary key id that names no configured key is refused."""
    with pytest.raises(KeyringError, match="'missing' is not in the keyring"):
        Keyring.parse(f"k1:{_key_b64()}", primary_id="missing")


def test_repr_never_contains_key_material() -> None:
    """repr/str of a Keyring show key ids, never the key bytes in any encoding."""
    raw = secrets.token_bytes(KEY_BYTES)
    ring = Keyring.parse(f"k1:{_key_b64(raw)}")
    for text in (repr(ring), str(ring), f"{ring}", f"{ring!r}"):
        assert "k1" in text
        assert _key_b64(raw) not in text
        assert base64.b64encode(raw).decode().rstrip("=") not in text
        assert raw.hex() not in text
        assert repr(raw) not in text


def test_generate_key_entry_is_parseable_256_bit_and_unique() -> None:
    """generate_key_entry yields valid, dated, 256-bit entries that differ on every call."""
    now = datetime(2025, 3, 4, tzinfo=UTC)
    entries = [generate_key_entry(now) for _ in range(20)]
    assert len(set(entries)) == len(entries)
    keys = set()
    for entry in entries:
        kid, _, _ = entry.partition(":")
        assert kid.startswith("k20250304")
        ring = Keyring.parse(entry)
        assert ring.primary_id == kid
        assert len(ring.keys[kid]) == KEY_BYTES
        keys.add(ring.keys[kid])
    assert len(keys) == len(entries)
    # Entries combine into one keyring (ids are distinct too).
    assert len(Keyring.parse(",".join(entries[:5])).keys) == 5


def test_nonces_differ(ring: Keyring) -> None:
    """The same plaintext encrypted twice gives different ciphertexts (fresh random nonce)."""
    ciphertexts = {ring.encrypt(PLAINTEXT, AAD) for _ in range(50)}
    assert len(ciphertexts) == 50
    nonces = {base64.urlsafe_b64decode(c.rsplit(".", 1)[1] + "==")[:12] for c in ciphertexts}
    assert len(nonces) == 50
