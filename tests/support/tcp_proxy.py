"""A TCP proxy for fault-injection tests: put it between a client and a real server, then cut
or stall the traffic on demand.

Typical use (PostgreSQL that goes away in the middle of a refresh)::

    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{db}"
        ...                 # the code under test connects through the proxy
        proxy.cut()         # every live connection is reset; new ones are reset on accept
        ...                 # the code under test sees the database gone
        proxy.restore()     # new connections reach the server again
        proxy.pause()       # connections are accepted, but no byte moves either way (a hang)
        proxy.resume()      # held bytes flow again

Semantics:

* ``cut()`` aborts every live connection on both sides with a TCP reset (``SO_LINGER`` 0), so
  a client blocked in a read fails at once instead of waiting for a timeout. Until
  ``restore()``, each new connection is accepted and immediately reset: the client sees
  ``connection reset`` / ``server closed the connection unexpectedly`` rather than
  ``connection refused`` (the listening socket stays ours, so the port cannot be taken by
  anything else in between). ``cut()`` is synchronous: when it returns, the sockets are closed.
* ``pause()`` stops reading and writing on every connection, including ones accepted while
  paused (the upstream connection is still opened). Bytes already read stay buffered in the
  proxy, everything else waits in the kernel's socket buffers; ``resume()`` lets it all flow
  in order. A paused client therefore hangs until its own timeout, as with a stuck server.
* ``connections`` is the number of live client connections; ``accepted`` counts all accepted
  (including those reset while cut).

Implementation: one background thread runs a ``selectors`` loop over non-blocking sockets
(epoll on Linux), so hundreds of connections cost two file descriptors each and no threads.
Control methods take the same lock as the loop, so they act between two rounds of events.
``stop()`` closes every socket it opened and joins the thread: nothing leaks, and no
``ResourceWarning`` is emitted.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

Side = Literal["client", "upstream", "listener", "wakeup"]

CHUNK = 65536
# Stop reading from one side while this many bytes wait to be written to the other.
HIGH_WATER = 1 << 20
BACKLOG = 1024
_RESET = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Pipe:
    client: socket.socket
    upstream: socket.socket
    connecting: bool = True
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    upstream_eof: bool = False
    upstream_shut: bool = False
    client_shut: bool = False
    closed: bool = False
    masks: dict[Side, int] = field(default_factory=dict)


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``; see the module docstring."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._lock = threading.RLock()
        self._pipes: set[_Pipe] = set()
        self._cut = False
        self._paused = False
        self._stopping = False
        self._accepted = 0
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind, listen and start forwarding; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("TcpProxy already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.listen_host, self._listen_port))
            listener.listen(BACKLOG)
            listener.setblocking(False)
            wake_r, wake_w = socket.socketpair()
        except BaseException:
            listener.close()
            raise
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, (None, "listener"))
        selector.register(wake_r, selectors.EVENT_READ, (None, "wakeup"))
        self._listener, self._selector = listener, selector
        self._wake_r, self._wake_w = wake_r, wake_w
        self._listen_port = listener.getsockname()[1]
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"TcpProxy-{self._listen_port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listening socket, and join the thread. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
        self._wake()
        thread.join(timeout)
        if thread.is_alive():  # pragma: no cover - the loop wakes at least every 0.5 s
            raise RuntimeError("TcpProxy thread did not stop")
        with self._lock:
            for pipe in list(self._pipes):
                self._close_pipe(pipe, reset=True)
            assert self._selector is not None
            self._selector.close()
            for sock in (self._listener, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._listener = self._selector = self._wake_r = self._wake_w = None
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("TcpProxy loop failed") from error

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- controls --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (known once started; or the fixed ``listen_port`` given)."""
        return self._listen_port

    @property
    def host(self) -> str:
        return self.listen_host

    @property
    def connections(self) -> int:
        """Live proxied connections."""
        with self._lock:
            return len(self._pipes)

    @property
    def accepted(self) -> int:
        """Connections accepted since start (including those reset while cut)."""
        with self._lock:
            return self._accepted

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def is_paused(self) -> bool:
        return self._paused

    def cut(self) -> None:
        """Reset every live connection now, and reset new ones until :meth:`restore`."""
        with self._lock:
            self._cut = True
            for pipe in list(self._pipes):
                self._close_pipe(pipe, reset=True)
        self._wake()

    def restore(self) -> None:
        """Forward new connections again after :meth:`cut`."""
        with self._lock:
            self._cut = False
        self._wake()

    def pause(self) -> None:
        """Hold all traffic (connections are still accepted) until :meth:`resume`."""
        with self._lock:
            self._paused = True
            for pipe in list(self._pipes):
                self._update(pipe)
        self._wake()

    def resume(self) -> None:
        """Let traffic held by :meth:`pause` flow again."""
        with self._lock:
            self._paused = False
            for pipe in list(self._pipes):
                self._update(pipe)
        self._wake()

    # -- event loop ------------------------------------------------------------------------

    def _wake(self) -> None:
        wake_w = self._wake_w
        if wake_w is None:
            return
        with contextlib.suppress(OSError):  # already full of wake-ups, or closing
            wake_w.send(b"\0")

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        return
                events = selector.select(0.5)
                with self._lock:
                    if self._stopping:
                        return
                    for key, mask in events:
                        pipe, side = key.data
                        if side == "listener":
                            self._accept()
                        elif side == "wakeup":
                            self._drain_wakeups()
                        elif not pipe.closed:
                            self._handle(pipe, side, mask)
        except Exception as exc:  # noqa: BLE001 - re-raised by stop(), never swallowed
            self._error = exc

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}:
                    return  # out of descriptors: leave the rest in the backlog for now
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            self._accepted += 1
            if self._cut:
                _abort(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                _abort(client)
                continue
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = upstream.connect_ex((self.target_host, self.target_port))
            if err not in {0, errno.EINPROGRESS, errno.EWOULDBLOCK}:
                _abort(client)
                upstream.close()
                continue
            pipe = _Pipe(client=client, upstream=upstream)
            self._pipes.add(pipe)
            self._update(pipe)

    def _handle(self, pipe: _Pipe, side: Side, mask: int) -> None:
        try:
            if side == "upstream" and pipe.connecting and mask & selectors.EVENT_WRITE:
                err = pipe.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._close_pipe(pipe, reset=True)  # target refused: reset the client
                    return
                pipe.connecting = False
            if side == "client":
                if mask & selectors.EVENT_READ:
                    pipe.client_eof = _recv_into(pipe.client, pipe.to_upstream)
                if mask & selectors.EVENT_WRITE:
                    _send_from(pipe.client, pipe.to_client)
            elif side == "upstream" and not pipe.connecting:
                if mask & selectors.EVENT_READ:
                    pipe.upstream_eof = _recv_into(pipe.upstream, pipe.to_client)
                if mask & selectors.EVENT_WRITE:
                    _send_from(pipe.upstream, pipe.to_upstream)
            self._half_close(pipe)
        except OSError:
            self._close_pipe(pipe, reset=True)
            return
        if pipe.client_shut and pipe.upstream_shut:
            self._close_pipe(pipe, reset=False)
        else:
            self._update(pipe)

    def _half_close(self, pipe: _Pipe) -> None:
        """Pass an end of stream on once everything before it was delivered."""
        if self._paused:
            return
        if (
            pipe.client_eof
            and not pipe.to_upstream
            and not pipe.connecting
            and not pipe.upstream_shut
        ):
            pipe.upstream.shutdown(socket.SHUT_WR)
            pipe.upstream_shut = True
        if pipe.upstream_eof and not pipe.to_client and not pipe.client_shut:
            pipe.client.shutdown(socket.SHUT_WR)
            pipe.client_shut = True

    def _update(self, pipe: _Pipe) -> None:
        """Register the events each socket of ``pipe`` needs now."""
        if pipe.closed:
            return
        moving = not self._paused
        client = 0
        upstream = 0
        if moving and not pipe.client_eof and len(pipe.to_upstream) < HIGH_WATER:
            client |= selectors.EVENT_READ
        if moving and pipe.to_client:
            client |= selectors.EVENT_WRITE
        if pipe.connecting:
            upstream |= selectors.EVENT_WRITE
        else:
            if moving and not pipe.upstream_eof and len(pipe.to_client) < HIGH_WATER:
                upstream |= selectors.EVENT_READ
            if moving and pipe.to_upstream:
                upstream |= selectors.EVENT_WRITE
        self._set_mask(pipe, "client", pipe.client, client)
        self._set_mask(pipe, "upstream", pipe.upstream, upstream)

    def _set_mask(self, pipe: _Pipe, side: Side, sock: socket.socket, mask: int) -> None:
        selector = self._selector
        assert selector is not None
        current = pipe.masks.get(side, 0)
        if mask == current:
            return
        if current == 0:
            selector.register(sock, mask, (pipe, side))
        elif mask == 0:
            selector.unregister(sock)
        else:
            selector.modify(sock, mask, (pipe, side))
        pipe.masks[side] = mask

    def _close_pipe(self, pipe: _Pipe, *, reset: bool) -> None:
        if pipe.closed:
            return
        pipe.closed = True
        self._pipes.discard(pipe)
        selector = self._selector
        sides: tuple[tuple[Side, socket.socket], ...] = (
            ("client", pipe.client),
            ("upstream", pipe.upstream),
        )
        for side, sock in sides:
            if pipe.masks.get(side) and selector is not None:
                selector.unregister(sock)
            if reset:
                _abort(sock)
            else:
                sock.close()
        pipe.masks.clear()
        pipe.to_client.clear()
        pipe.to_upstream.clear()


def _recv_into(sock: socket.socket, buffer: bytearray) -> bool:
    """Read what is available into ``buffer``; True once the peer ended its stream."""
    try:
        data = sock.recv(CHUNK)
    except (BlockingIOError, InterruptedError):
        return False
    if not data:
        return True
    buffer += data
    return False


def _send_from(sock: socket.socket, buffer: bytearray) -> None:
    try:
        sent = sock.send(buffer)
    except (BlockingIOError, InterruptedError):
        return
    del buffer[:sent]


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset rather than an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    sock.close()
