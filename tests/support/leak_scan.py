"""Find secrets in observed bytes, in the encodings a secret typically takes on its way out.

A :class:`LeakScanner` is built from labelled :class:`Secret` values and scans any number of
named channels (a log file, a Redis MONITOR stream, a database dump). For every secret it
looks for:

* the plain text, its JSON-escaped form, and its URL-encoded forms (``quote`` with and
  without ``/`` kept, ``quote_plus``);
* each of those as standard and URL-safe base64, **at every alignment**: a secret inside a
  larger base64 blob (a Celery message body, an HTTP Basic credential ``id:secret``) does not
  encode to ``b64encode(secret)``, so the scanner looks for the part of the encoding that
  depends on the secret's bytes alone, for each of the three byte offsets it can start at.
  That core is a substring of the padded and of the unpadded whole-value encoding, so both
  are found too;
* lower-case hex.

Besides the bytes as given, it also scans what they decode to: runs of base64 characters
that decode to printable text (nested encodings), and percent-decoded text. Findings say
where (channel, byte offset, which secret, which encoding) and quote a short context in
which every known secret is masked, so a failure message cannot leak what it reports.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote_to_bytes

__all__ = ["Finding", "LeakScanner", "Secret", "encodings_of"]

CONTEXT = 40
# A base64 core shorter than this could match by chance; real secrets are far longer.
MIN_PATTERN = 12
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16,}={0,2}")


@dataclass(frozen=True)
class Secret:
    label: str  # what it is, never the value: "refresh token #3 (import user1)"
    value: str


@dataclass(frozen=True)
class Finding:
    channel: str
    offset: int
    secret: str  # the label
    encoding: str
    context: str  # masked

    def __str__(self) -> str:
        return (
            f"{self.channel} @ byte {self.offset}: {self.secret} as {self.encoding}:"
            f" ...{self.context}..."
        )


def _b64_cores(data: bytes, alphabet: str) -> list[tuple[str, bytes]]:
    """The characters of base64(prefix + data) that depend on ``data`` alone, for the three
    possible lengths of whatever precedes it (mod 3)."""
    encode = base64.urlsafe_b64encode if alphabet == "urlsafe" else base64.b64encode
    cores = []
    for offset in range(3):
        encoded = encode(b"\0" * offset + data)
        start = -(-offset * 8 // 6)  # the first character with no bit of the prefix
        end = (offset + len(data)) * 8 // 6  # past the last character with all bits of data
        core = encoded[start:end]
        if len(core) >= MIN_PATTERN:
            cores.append((f"base64 {alphabet} (offset {offset})", core))
    return cores


def encodings_of(value: str) -> list[tuple[str, bytes]]:
    """(name, pattern) for every encoding of ``value`` the scanner looks for; deduplicated."""
    forms: dict[bytes, str] = {}
    for name, text in (
        ("plain", value),
        ("json-escaped", json.dumps(value)[1:-1]),
        ("url-encoded (quote safe='')", quote(value, safe="")),
        ("url-encoded (quote)", quote(value)),
        ("url-encoded (quote_plus)", quote_plus(value)),
    ):
        forms.setdefault(text.encode(), name)
    patterns: dict[bytes, str] = {}
    for raw, name in forms.items():
        patterns.setdefault(raw, name)
    for raw, name in forms.items():
        for alphabet in ("standard", "urlsafe"):
            for encoding, core in _b64_cores(raw, alphabet):
                patterns.setdefault(core, f"{encoding} of {name}")
    patterns.setdefault(binascii.hexlify(value.encode()), "hex")
    return [(name, pattern) for pattern, name in patterns.items() if len(pattern) >= MIN_PATTERN]


class LeakScanner:
    def __init__(self, secrets: Iterable[Secret]):
        by_value: dict[str, Secret] = {}
        for secret in secrets:
            if len(secret.value) < MIN_PATTERN:
                raise ValueError(f"{secret.label} is too short to scan for reliably")
            by_value.setdefault(secret.value, secret)
        self.secrets = list(by_value.values())
        self._patterns: list[tuple[bytes, Secret, str]] = []
        for secret in self.secrets:
            for encoding, pattern in encodings_of(secret.value):
                self._patterns.append((pattern, secret, encoding))
        # Longest first, so masking replaces an encoding before any shorter one inside it.
        self._mask_order = sorted({p for p, _, _ in self._patterns}, key=len, reverse=True)
        self.scanned_bytes: dict[str, int] = {}

    @property
    def pattern_count(self) -> int:
        return len(self._patterns)

    def mask(self, data: bytes) -> str:
        """``data`` with every occurrence of every known pattern replaced by ``<SECRET>``."""
        return self._context(data, 0, len(data))

    def _context(self, data: bytes, start: int, end: int) -> str:
        """``data[start:end]`` with every secret masked, on one line. Patterns are looked for
        in a wider window, so an occurrence cut by the window's edge is masked too."""
        reach = max((len(p) for p in self._mask_order), default=0)
        lo, hi = max(start - reach, 0), min(end + reach, len(data))
        window = data[lo:hi]
        covered = bytearray(len(window))
        for pattern in self._mask_order:
            at = window.find(pattern)
            while at != -1:
                covered[at : at + len(pattern)] = b"\x01" * len(pattern)
                at = window.find(pattern, at + 1)
        out = bytearray()
        for i in range(start - lo, end - lo):
            if covered[i]:
                if i == start - lo or not covered[i - 1]:
                    out += b"<SECRET>"
            else:
                out.append(window[i])
        return out.decode("utf-8", "replace").encode("unicode_escape").decode("ascii")

    def scan(self, channel: str, data: bytes | str) -> list[Finding]:
        """Every occurrence of every secret in ``data`` and in what ``data`` decodes to."""
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        self.scanned_bytes[channel] = self.scanned_bytes.get(channel, 0) + len(raw)
        findings = self._scan_bytes(channel, raw)
        decoded = self._base64_decoded(raw)
        if decoded:
            findings += self._scan_bytes(f"{channel} [base64-decoded]", decoded)
        if b"%" in raw:
            unquoted = unquote_to_bytes(raw)
            if unquoted != raw:
                findings += self._scan_bytes(f"{channel} [percent-decoded]", unquoted)
        return findings

    def _scan_bytes(self, channel: str, raw: bytes) -> list[Finding]:
        findings = []
        for pattern, secret, encoding in self._patterns:
            at = raw.find(pattern)
            while at != -1:
                start, end = max(at - CONTEXT, 0), min(at + len(pattern) + CONTEXT, len(raw))
                context = self._context(raw, start, end)
                findings.append(Finding(channel, at, secret.label, encoding, context))
                at = raw.find(pattern, at + 1)
        return findings

    @staticmethod
    def _base64_decoded(raw: bytes) -> bytes:
        """The printable text hidden in base64 runs (either alphabet), one per line."""
        out = []
        for match in _BASE64_RUN.finditer(raw):
            run = match.group()
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    text = decode(run.rstrip(b"=") + b"=" * (-len(run.rstrip(b"=")) % 4))
                except (binascii.Error, ValueError):
                    continue
                printable = sum(32 <= c < 127 or c in b"\t\r\n" for c in text)
                if text and printable >= 0.9 * len(text):
                    out.append(text)
                    break
        return b"\n".join(out)
