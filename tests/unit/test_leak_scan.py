"""The negative control of the no-leak end-to-end test: the scanner finds a planted secret in
every encoding it claims to cover, embedded the way real channels carry it, does not cry wolf
on near misses, and never prints the secret it reports."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from urllib.parse import quote, quote_plus, urlencode

import pytest

from grantkeeper.oauth import basic_auth_header
from tests.support.leak_scan import LeakScanner, Secret, encodings_of
from tests.support.redis_observer import unescape_monitor

SECRET = "s3cr3t+/value=~!with spaces & more"
TOKEN = "Hx8vC2kq9ZrT-4_pLw0NbYd7sFjGmA1eUoRiVtXyQcE"  # shaped like a real token
CLIENT_ID = "gk-client"


def _redis_repr(arg: bytes) -> bytes:
    """Redis' ``sdscatrepr``: quotes and backslashes escaped, non-printables as \\xNN."""
    out = bytearray(b'"')
    for byte in arg:
        char = bytes([byte])
        if char in b'"\\':
            out += b"\\" + char
        elif 32 <= byte < 127:
            out += char
        else:
            out += b"\\x%02x" % byte
    return bytes(out + b'"')


def _monitor_line(*args: bytes) -> bytes:
    """How Redis MONITOR renders a command."""
    return b"1700000000.000000 [0 127.0.0.1:5000] " + b" ".join(_redis_repr(a) for a in args)


def _kombu_message(arg: str, prefix: str) -> bytes:
    """A Celery/kombu broker message: the JSON body is base64 inside a JSON envelope."""
    body = json.dumps([[prefix + arg], {}, {}]).encode()
    envelope = {"body": base64.b64encode(body).decode(), "properties": {"body_encoding": "base64"}}
    return json.dumps(envelope).encode()


def _b64(data: str, *, urlsafe: bool = False, padded: bool = True) -> str:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    out = encode(data.encode()).decode()
    return out if padded else out.rstrip("=")


PLANTINGS: dict[str, Callable[[str], bytes]] = {
    "plain": lambda s: f"token={s};".encode(),
    "json-escaped": lambda s: json.dumps({"v": s}).encode(),
    "url-encoded quote safe=''": lambda s: quote(s, safe="").encode(),
    "url-encoded quote": lambda s: quote(s).encode(),
    "url-encoded quote_plus": lambda s: quote_plus(s).encode(),
    "form body (urlencode)": lambda s: urlencode({"grant_type": "x", "refresh_token": s}).encode(),
    "base64 standard padded": lambda s: _b64(s).encode(),
    "base64 standard unpadded": lambda s: _b64(s, padded=False).encode(),
    "base64 urlsafe padded": lambda s: _b64(s, urlsafe=True).encode(),
    "base64 urlsafe unpadded": lambda s: _b64(s, urlsafe=True, padded=False).encode(),
    "base64 at offset 1": lambda s: _b64("x" + s).encode(),
    "base64 at offset 2": lambda s: _b64("xy" + s, urlsafe=True).encode(),
    "HTTP Basic id:secret": lambda s: f"Authorization: Basic {_b64(f'{CLIENT_ID}:{s}')}".encode(),
    "HTTP Basic, URL-encoded first (RFC 6749)": lambda s: basic_auth_header(CLIENT_ID, s).encode(),
    "percent-encoded base64": lambda s: quote(_b64("abc" + s), safe="").encode(),
    "base64 of base64": lambda s: _b64(_b64(s)).encode(),
    "kombu message, offset 0": lambda s: _kombu_message(s, ""),
    "kombu message, offset 1": lambda s: _kombu_message(s, "a"),
    "kombu message, offset 2": lambda s: _kombu_message(s, "ab"),
    "redis MONITOR of a JSON value": lambda s: _monitor_line(
        b"SET", b"k", json.dumps({"t": s}).encode()
    ),
    "hex": lambda s: s.encode().hex().encode(),
}


@pytest.mark.parametrize("secret", [SECRET, TOKEN], ids=["special-chars", "token-shaped"])
@pytest.mark.parametrize("planting", list(PLANTINGS))
def test_finds_a_planted_secret(planting: str, secret: str) -> None:
    """Each planted encoding, between unrelated bytes, is found, with its channel and offset."""
    scanner = LeakScanner([Secret("planted", secret), Secret("other", "unrelated-value-123456")])
    data = b"noise before\n" + PLANTINGS[planting](secret) + b"\nnoise after"
    findings = scanner.scan("channel-x", data)
    assert findings, f"{planting} of the secret was not found"
    assert {f.secret for f in findings} == {"planted"}
    assert all(f.channel.startswith("channel-x") for f in findings)


@pytest.mark.parametrize("secret", [SECRET, TOKEN], ids=["special-chars", "token-shaped"])
def test_every_listed_encoding_is_found(secret: str) -> None:
    """Each pattern the scanner derives is itself found when planted (no dead pattern)."""
    scanner = LeakScanner([Secret("planted", secret)])
    for name, pattern in encodings_of(secret):
        assert scanner.scan(name, b"<<" + pattern + b">>"), name


def test_no_false_positive_on_near_misses() -> None:
    """Other tokens, a secret with one character changed, or cut short, are not reported."""
    scanner = LeakScanner([Secret("planted", TOKEN)])
    changed = TOKEN[:20] + ("A" if TOKEN[20] != "A" else "B") + TOKEN[21:]
    data = "\n".join(
        [
            changed,
            TOKEN[:10],
            _b64(changed),
            "Nm1hbGwgd29yZHMgYW5kIG90aGVyIHRva2Vucw",
            json.dumps({"access_token": "[redacted]"}),
        ]
    ).encode()
    assert scanner.scan("clean", data) == []


def test_context_never_shows_the_secret() -> None:
    """A finding's context masks every secret, even one cut by the context window's edge."""
    scanner = LeakScanner([Secret("planted", TOKEN)])
    data = (TOKEN + " x " + TOKEN + " y " + _b64(TOKEN) + " z " + TOKEN).encode()
    findings = scanner.scan("channel", data)
    assert len(findings) >= 4
    for finding in findings:
        text = str(finding)
        assert "<SECRET>" in text
        for window in range(12, len(TOKEN) + 1):
            assert TOKEN[:window] not in text
            assert TOKEN[-window:] not in text


def test_monitor_unescaping() -> None:
    """Redis MONITOR escapes come back as the bytes that were sent."""
    raw = _monitor_line(b"SET", b'a"b\\c', b"\x00\xff")
    assert unescape_monitor(raw).endswith(b'"a"b\\c" "\x00\xff"')


def test_refuses_secrets_too_short_to_scan_for() -> None:
    with pytest.raises(ValueError, match="too short"):
        LeakScanner([Secret("tiny", "abc")])
