"""Lean non-blocking TCP and TLS streams on the event loop's selector, for a server holding many
mostly idle connections (`agent derper`).

Why not `loop.create_server(ssl=...)`: Python 3.11's asyncio TLS transport (asyncio.sslproto)
allocates a 256 KiB read buffer per connection and layers two transports and two memory BIOs;
an idle DERP connection cost ~279 KiB there. Here each accepted socket is wrapped by
`SSLContext.wrap_socket` (OpenSSL reads and writes the socket itself; Python sets
SSL_MODE_RELEASE_BUFFERS, so an idle connection holds no record buffers) and registered with
`loop.add_reader`. What an idle TLS connection costs (OpenSSL 3.0, measured): ~13.5 KiB inside
OpenSSL (the SSL object 7.4 KiB, two AES-GCM contexts 1.9 KiB, session 0.9 KiB, certificate
references, the kept key shares), ~0.6 KiB for the socket objects and the selector entry, and the
protocol's own objects.

    accept (listening socket readable, up to ACCEPT_BATCH at a time)
      -> Stream(HANDSHAKE): protocol.connection_made(stream) right away, so the protocol's own
         timer also bounds the TLS handshake; writes made now wait in the pending buffer
      -> do_handshake on readable/writable until done -> OPEN
    OPEN     readable: read records into one buffer shared by every stream (up to READ_BUDGET
             per event, so one busy sender cannot starve the others), then
             protocol.data_received(bytes) once
             write(data): sent at once if nothing is pending; what the socket does not take
             waits in a bytearray (get_write_buffer_size) flushed when writable. For TLS the
             pending buffer keeps its whole prefix until OpenSSL reports it all written: after
             a "want write" SSL_write must be retried with the same bytes (it may be longer)
    pause_reading() / resume_reading()
             the socket leaves / rejoins the selector (writes go on); the kernel's receive
             buffer fills and TCP pushes back on the sender. On resume, records OpenSSL already
             decrypted (SSL_pending) are delivered first: the selector would not report them
    close()  flush pending output (CLOSE_TIMEOUT at most), send close_notify, close; abort():
             close now
    EOF, reset or a TLS error -> closed; protocol.connection_lost(exc) runs soon after (call_soon)

Plain TCP (no SSL context) uses the same class with `ssl_context=None`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable
from enum import Enum, auto
from typing import Any, Final, cast

__all__ = [
    "ACCEPT_BATCH",
    "CLOSE_TIMEOUT",
    "READ_BUFFER",
    "READ_BUDGET",
    "ReadBuffer",
    "Stream",
    "StreamServer",
    "create_listeners",
    "serve_streams",
]

ACCEPT_BATCH: Final = 64  # connections accepted per readable event of a listening socket
READ_BUFFER: Final = 256 << 10  # shared by every stream of a loop
_RECORD_ROOM: Final = 17 << 10  # stop reading with less room than one TLS record left
READ_BUDGET: Final = READ_BUFFER - _RECORD_ROOM
CLOSE_TIMEOUT: Final = 10.0  # close() gives pending output this long, then aborts
_ACCEPT_RETRY: Final = 1.0  # after EMFILE/ENFILE/ENOBUFS/ENOMEM, as asyncio does
_BACKLOG: Final = 4096
_WOULD_BLOCK: Final = (
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
    BlockingIOError,
    InterruptedError,
)
_ACCEPT_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _State(Enum):
    HANDSHAKE = auto()
    OPEN = auto()
    CLOSING = auto()  # close() with output pending: write it, then close
    CLOSED = auto()


class ReadBuffer:
    """One read buffer shared by all streams of a server (loop callbacks never overlap)."""

    __slots__ = ("view",)

    def __init__(self, size: int = READ_BUFFER) -> None:
        self.view = memoryview(bytearray(size))


class Stream(asyncio.Transport):
    """One accepted connection; the subset of asyncio.Transport a server protocol needs
    (write, close, abort, is_closing, get_write_buffer_size, get_extra_info("peername"))."""

    __slots__ = ("_buffer", "_close_timer", "_fd", "_loop", "_paused", "_pending", "_protocol",
                 "_read_wants_write", "_sock", "_state", "_tls", "_writing")  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        *,
        tls: bool,
        buffer: ReadBuffer | None = None,
    ) -> None:
        # No super().__init__(): it would give every stream an extra dict; get_extra_info below.
        # Static after construction.
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._tls = tls
        self._protocol = cast(asyncio.Protocol, protocol)
        self._buffer = buffer if buffer is not None else ReadBuffer()
        # Owned by the stream.
        self._state = _State.HANDSHAKE if tls else _State.OPEN
        self._pending: bytearray | None = None
        self._writing = False  # a writer callback is registered
        self._read_wants_write = False  # an SSL read asked for the socket to be writable
        self._paused = False  # pause_reading(): not in the selector for reading
        self._close_timer: asyncio.TimerHandle | None = None  # only while CLOSING
        loop.add_reader(self._fd, self._on_readable)
        self._protocol.connection_made(self)
        if tls and self._state is _State.HANDSHAKE:
            self._handshake()

    # --- the Transport subset -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._state is _State.CLOSED:
            return default
        try:
            if name == "peername":
                return self._sock.getpeername()
            if name == "sockname":
                return self._sock.getsockname()
        except OSError:
            return default
        if name == "socket":
            return self._sock
        if name == "ssl_object" and self._tls:
            return self._sock
        return default

    def is_closing(self) -> bool:
        return self._state is _State.CLOSING or self._state is _State.CLOSED

    def get_write_buffer_size(self) -> int:
        return len(self._pending) if self._pending is not None else 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_reading(self) -> bool:
        return not self._paused and (self._state is _State.OPEN or self._state is _State.HANDSHAKE)

    def pause_reading(self) -> None:
        """Stop delivering data_received (no-op when paused or closing); writes go on."""
        if self._paused or self.is_closing():
            return
        self._paused = True
        if self._state is _State.OPEN:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._state is not _State.OPEN:
            return
        self._loop.add_reader(self._fd, self._on_readable)
        if self._tls and cast(ssl.SSLSocket, self._sock).pending():
            self._loop.call_soon(self._on_readable)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        state = self._state
        if state is _State.CLOSING or state is _State.CLOSED or not data:
            return
        pending = self._pending
        if pending is not None:
            pending += data
        elif state is _State.HANDSHAKE:
            self._pending = bytearray(data)
        else:
            self._send(data)

    def close(self) -> None:
        if self._state is _State.CLOSING or self._state is _State.CLOSED:
            return
        if self._pending is not None and self._state is _State.OPEN:
            self._state = _State.CLOSING
            self._loop.remove_reader(self._fd)
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)
            return
        self._finish(None, graceful=True)

    def abort(self) -> None:
        if self._state is not _State.CLOSED:
            self._finish(None, graceful=False)

    # --- I/O ------------------------------------------------------------------------------------

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Write with nothing pending; keep what the socket did not take."""
        try:
            sent = self._sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except (ssl.SSLError, OSError) as exc:
            self._finish(exc, graceful=False)
            return
        if sent == len(data):
            return
        # TLS: SSL_write is all or nothing and must be retried with the same bytes (OpenSSL
        # remembers what it already wrote), so keep all of them. TCP: keep the unsent tail.
        self._pending = bytearray(data) if self._tls else bytearray(memoryview(data)[sent:])
        self._want_write(True)

    def _flush_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            sent = self._sock.send(pending)
        except _WOULD_BLOCK:
            return
        except (ssl.SSLError, OSError) as exc:
            self._finish(exc, graceful=False)
            return
        if sent < len(pending):  # plain TCP only: TLS writes all of it or raises
            del pending[:sent]
            return
        self._pending = None
        if self._state is _State.CLOSING:
            self._finish(None, graceful=True)
        elif not self._read_wants_write:
            self._want_write(False)

    def _want_write(self, on: bool) -> None:
        if on and not self._writing:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        elif not on and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _handshake(self) -> bool:
        """One handshake step; True once it is complete (the stream is OPEN)."""
        sock = cast(ssl.SSLSocket, self._sock)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want_write(False)
            return False
        except ssl.SSLWantWriteError:
            self._want_write(True)
            return False
        except (ssl.SSLError, OSError) as exc:
            self._finish(exc, graceful=False)
            return False
        self._state = _State.OPEN
        if self._paused:
            self._loop.remove_reader(self._fd)
        self._want_write(self._pending is not None)
        return True

    def _on_writable(self) -> None:
        if self._state is _State.HANDSHAKE:
            if self._handshake():
                self._flush_pending()
            return
        if self._read_wants_write:
            self._read_wants_write = False
            if self._pending is None:
                self._want_write(False)
            if not self._paused:
                self._on_readable()
        if self._state is _State.OPEN or self._state is _State.CLOSING:
            self._flush_pending()

    def _on_readable(self) -> None:
        if self._state is _State.HANDSHAKE:
            if not self._handshake():
                return
            self._flush_pending()
        if self._state is not _State.OPEN or self._paused:
            return
        sock, view = self._sock, self._buffer.view
        got = 0
        budget = len(view) - _RECORD_ROOM
        eof = False
        error: Exception | None = None
        while got < budget:
            try:
                n = sock.recv_into(view[got:])
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                break
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                self._want_write(True)
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                eof = True
                break
            except (ssl.SSLError, OSError) as exc:
                error = exc
                break
            if n == 0:
                eof = True
                break
            got += n
        else:
            if self._tls and cast(ssl.SSLSocket, sock).pending():
                self._loop.call_soon(self._on_readable)
        if got:
            self._protocol.data_received(bytes(view[:got]))
        if eof or error is not None:
            self._finish(error, graceful=False)  # no-op if data_received closed us

    def _finish(self, exc: Exception | None, *, graceful: bool) -> None:
        """Close the socket now; connection_lost(exc) follows from the loop."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._pending = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._loop.remove_reader(self._fd)
        self._want_write(False)
        self._read_wants_write = False
        if graceful and self._tls:
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                cast(ssl.SSLSocket, self._sock).unwrap()  # sends close_notify; no wait for reply
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


class StreamServer:
    """Listening sockets that hand each accepted connection to a new protocol as a Stream."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._retry: asyncio.TimerHandle | None = None
        self._buffer = ReadBuffer()
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRNOS:  # out of descriptors or memory: back off
                    self._pause(listener)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl is not None:
                    sock = self._ssl.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
            except OSError:
                sock.close()
                continue
            tls = self._ssl is not None
            Stream(self._loop, sock, self._factory(), tls=tls, buffer=self._buffer)

    def _pause(self, listener: socket.socket) -> None:
        self._loop.remove_reader(listener.fileno())

        def resume() -> None:
            self._retry = None
            if listener.fileno() >= 0:
                self._loop.add_reader(listener.fileno(), self._accept, listener)

        self._retry = self._loop.call_later(_ACCEPT_RETRY, resume)

    def close(self) -> None:
        """Stop accepting; streams already accepted stay up."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()


def create_listeners(
    host: str | None, port: int, *, backlog: int = _BACKLOG
) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for `host` (every address family when None or
    empty, as asyncio's create_server). With port 0 every socket gets the first one's port."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve_streams(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
) -> StreamServer:
    """Listen on host:port; every accepted connection becomes a Stream with a new protocol."""
    loop = asyncio.get_running_loop()
    return StreamServer(loop, create_listeners(host, port), protocol_factory, ssl_context)
