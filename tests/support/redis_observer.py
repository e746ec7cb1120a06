"""Observe everything that passes through a (test-owned) Redis: a ``MONITOR`` stream recorded
in a background thread, and a dump of every key and value.

Typical use::

    with RedisMonitor(server.url) as monitor:
        ...                              # every command any client sends is recorded
    monitor.lines                        # raw MONITOR lines, as Redis wrote them
    dump, key_count = dump_redis(server.url)

MONITOR lines are Redis' own rendering (``sdscatrepr``): every argument is in double quotes,
with ``"`` and ``\\`` escaped and non-printable bytes as ``\\xNN``. :func:`unescape_monitor`
turns them back into the bytes that were sent. Commands inside Lua scripts are listed too
(client ``lua``). Redis hides the arguments of ``AUTH`` and ``HELLO ... AUTH``.
"""

from __future__ import annotations

import re
import threading
import uuid
from types import TracebackType
from typing import Any, Self

import redis

_ESCAPE = re.compile(rb'\\(x[0-9a-fA-F]{2}|["\\nrtab])')
_SIMPLE = {b'"': b'"', b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a"}


def unescape_monitor(line: bytes) -> bytes:
    """A MONITOR line with Redis' escapes decoded (quotes around arguments stay)."""

    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code.startswith(b"x"):
            return bytes([int(code[1:], 16)])
        return _SIMPLE.get(code, b"\b")

    return _ESCAPE.sub(one, line)


class RedisMonitor:
    """Records every command Redis executes, from :meth:`start` until :meth:`stop`."""

    def __init__(self, url: str):
        # No read timeout (redis-py 8 has a default one): MONITOR may be quiet for a while.
        self.client = redis.Redis.from_url(url, socket_timeout=None)
        self.lines: list[bytes] = []
        self.error: BaseException | None = None
        self._sentinel = f"redis-monitor-end-{uuid.uuid4().hex}".encode()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)

    def start(self, timeout: float = 10.0) -> Self:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"MONITOR did not start: {self.error!r}")
        return self

    def _run(self) -> None:
        try:
            with self.client.monitor() as monitor:  # type: ignore[no-untyped-call]
                self._ready.set()
                while True:
                    # The raw line, not next_command()'s re-joined arguments: exactly what
                    # Redis reported, escapes and all.
                    raw = monitor.connection.read_response()
                    line = raw if isinstance(raw, bytes) else str(raw).encode()
                    if self._sentinel in line:
                        return
                    self.lines.append(line)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
            self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Send a sentinel through Redis, wait for the recorder to see it, and close."""
        if self._thread.is_alive():
            self.client.echo(self._sentinel)
            self._thread.join(timeout)
        self.client.close()
        if self._thread.is_alive():
            raise RuntimeError("MONITOR thread did not stop")
        if self.error is not None:
            raise RuntimeError(f"MONITOR failed: {self.error!r}") from self.error

    def text(self) -> bytes:
        return b"\n".join(self.lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def dump_redis(url: str) -> tuple[bytes, int]:
    """Every key of every database with its whole value (strings, lists, hashes, sets, sorted
    sets, streams), one block per key; and how many keys there were."""
    with redis.Redis.from_url(url) as client:
        info = client.info("keyspace")
    databases = sorted(int(name[2:]) for name in info if name.startswith("db"))
    out: list[bytes] = []
    count = 0
    for db in databases:
        view = redis.Redis.from_url(url, db=db)
        try:
            for key in view.scan_iter(count=1000):
                kind = view.type(key)
                kind = kind.decode() if isinstance(kind, bytes) else str(kind)
                out.append(b"db%d %s %s:" % (db, key, kind.encode()))
                out.extend(b"  " + value for value in _values(view, key, kind))
                count += 1
        finally:
            view.close()
    return b"\n".join(out), count


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def _values(view: redis.Redis, key: bytes, kind: str) -> list[bytes]:  # noqa: PLR0911
    client: Any = view  # redis-py's return types are unions of sync and async results
    if kind == "string":
        value = client.get(key)
        return [] if value is None else [_b(value)]
    if kind == "list":
        return [_b(v) for v in client.lrange(key, 0, -1)]
    if kind == "hash":
        return [_b(k) + b" = " + _b(v) for k, v in client.hgetall(key).items()]
    if kind == "set":
        return sorted(_b(v) for v in client.smembers(key))
    if kind == "zset":
        return [_b(m) + b" " + _b(s) for m, s in client.zrange(key, 0, -1, withscores=True)]
    if kind == "stream":
        return [
            _b(i) + b" " + b" ".join(_b(k) + b"=" + _b(v) for k, v in fields.items())
            for i, fields in client.xrange(key)
        ]
    return [b"(type " + kind.encode() + b" not dumped)"]
