"""The extra UDP sockets of birthday rounds (engine/birthday.py), and where UDP leaves from.

On a hard NAT a mapping belongs to a (socket, destination) pair, so a direct path that a birthday
round found through extra socket k works only through k. `ExtraSockets` is the shell around the
engine's decisions:

    send_batch(datagrams, addr)   PeerTransport's UDP: from the extra socket the engine binds
                                  `addr` to (`PathEngine.socket_routes`), else the WireGuard socket
    send_via(out)                 a DISCO ping of a round, from the socket it names
    reconcile()                   open and close sockets until they match the engine's
                                  `extra_sockets()` (only when `sockets_version` moved); a bound
                                  socket gets the WireGuard socket's buffer sizes
    reading                       a socket's datagrams from the endpoint bound to it go to the
                                  data plane (`DataPlane.on_datagrams`: WireGuard, and DISCO
                                  through its foreign hook); anything else that is DISCO goes to
                                  the engine with the socket's id (`receive_disco(via=)`: a hit
                                  of the round); the rest is counted and dropped
    close()                       every extra socket, at shutdown

Sockets are IPv4 (the engine aims only at public IPv4 endpoints), bound to port 0, marked like
the WireGuard socket (`fwmark`). Opening stops at the first failure (EMFILE, say): the engine's
pings through a socket that is not open are counted in `unsent` and dropped. Owned by the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Final

from agent.engine.engine import PathEngine
from agent.engine.events import Outgoing
from agent.log import get_logger
from agent.node.dataplane import DataPlane
from agent.node.udp import DEFAULT_BUFFER_BYTES, Endpoint, UdpSocket, open_udp
from agent.proto import disco

__all__ = ["ExtraSockets", "ROUND_BUFFER_BYTES"]

log = get_logger("agent.birthday")

ROUND_BUFFER_BYTES: Final = 64 << 10  # a round's socket carries a few DISCO messages
_MAX_READ: Final = 256
_SO_MARK: Final = 36
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33

Buffer = bytes | bytearray | memoryview


class ExtraSockets:
    """Birthday rounds' sockets; also the UDP sender PeerTransport uses."""

    def __init__(
        self,
        main: UdpSocket,
        paths: PathEngine,
        *,
        fwmark: int = 0,
        opener: Callable[[], UdpSocket] | None = None,
    ) -> None:
        self.main = main  # static after construction
        self.paths = paths
        self.fwmark = fwmark
        self._opener = opener or _open_round_socket
        self._routes = paths.socket_routes  # the engine's own dict: endpoint -> socket id
        self.dataplane: DataPlane | None = None  # set by the daemon once it exists
        self.on_activity: Callable[[], None] = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socks: dict[int, UdpSocket] = {}
        self._bound: set[int] = set()
        self._version = paths.sockets_version
        self.opened = 0  # sockets opened, ever
        self.open_failed = 0
        self.unsent = 0  # datagrams for a socket that was not open
        self.dropped = 0  # non-DISCO datagrams on a socket from an endpoint not bound to it

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __len__(self) -> int:
        return len(self._socks)

    # -- sending -----------------------------------------------------------------------------
    def send_batch(self, datagrams: Sequence[Buffer], addr: Endpoint) -> int:
        """Send to `addr` from the socket the engine says; how many were not sent."""
        routes = self._routes
        if routes:
            sid = routes.get(addr)
            if sid:
                sock = self._socks.get(sid)
                if sock is None:
                    self.unsent += len(datagrams)
                    return len(datagrams)
                return sock.send_batch(datagrams, addr)
        return self.main.send_batch(datagrams, addr)

    def sends_from_main(self, addr: Endpoint) -> bool:
        return not self._routes.get(addr)

    def send_via(self, out: Outgoing) -> None:
        sock = self._socks.get(out.via)
        if sock is None:
            self.unsent += 1
        else:
            sock.send_batch([out.payload], out.endpoint)

    # -- the set of sockets --------------------------------------------------------------------
    def reconcile(self) -> None:
        """Open and close sockets to match the engine (cheap when nothing changed)."""
        paths = self.paths
        if paths.sockets_version == self._version:
            return
        self._version = paths.sockets_version
        wanted = paths.extra_sockets()
        for sid in [s for s in self._socks if s not in wanted]:
            self._close(sid)
        failed = False
        for sid in sorted(wanted - self._socks.keys()):
            if failed:
                self.open_failed += 1
                continue
            try:
                sock = self._opener()
            except OSError as e:
                failed = True
                self.open_failed += 1
                log.warning("birthday socket not opened", error=str(e), open=len(self._socks))
                continue
            if self.fwmark:
                sock.sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, self.fwmark)
            if self.main.native is not None:  # a bound socket carries the peer's traffic
                sock.use_native(self.main.native)
            self._socks[sid] = sock
            self.opened += 1
            if self._loop is not None:
                self._loop.add_reader(sock.fileno(), self._readable, sid)
        bound = set(self._routes.values()) & self._socks.keys()
        for sid in bound - self._bound:
            _grow_buffers(self._socks[sid].sock)
            log.info("birthday path bound to an extra socket", port=self._socks[sid].port)
        self._bound = bound

    def _close(self, sid: int) -> None:
        sock = self._socks.pop(sid)
        self._bound.discard(sid)
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        for sid in list(self._socks):
            self._close(sid)

    # -- receiving ---------------------------------------------------------------------------
    def _readable(self, sid: int) -> None:
        sock = self._socks.get(sid)
        loop = self._loop
        if sock is None or loop is None:
            return
        now = loop.time()
        data: list[tuple[Sequence[Buffer], Endpoint]] = []
        for parts, src in sock.recv_batch(_MAX_READ):
            if self._routes.get(src) == sid:
                data.append((parts, src))
                continue
            for d in map(bytes, parts):
                if disco.looks_like_disco(d):
                    self.paths.receive_disco(d, src, now, via=sid)
                else:
                    self.dropped += 1
        if data and self.dataplane is not None:
            self.dataplane.on_datagrams(data)  # calls on_activity itself
        else:
            self.on_activity()

    def status(self) -> dict[str, int]:
        return {
            "sockets": len(self._socks),
            "opened": self.opened,
            "open_failed": self.open_failed,
            "unsent": self.unsent,
            "dropped": self.dropped,
        }


def _open_round_socket() -> UdpSocket:
    return open_udp(0, host="0.0.0.0", buffer_bytes=ROUND_BUFFER_BYTES)


def _grow_buffers(sock: socket.socket) -> None:
    """A bound socket carries the peer's WireGuard traffic: the main socket's buffers."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, DEFAULT_BUFFER_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, DEFAULT_BUFFER_BYTES)
