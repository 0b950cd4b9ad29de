"""node/birthday_io.ExtraSockets on loopback: the sockets follow the engine's set, UDP leaves
from the socket the engine binds an endpoint to, and what arrives on an extra socket goes to
the engine (DISCO, with the socket's id) or to the data plane (from the bound endpoint only)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from agent.engine.events import Outgoing
from agent.keys import NodePrivate
from agent.node.birthday_io import ExtraSockets
from agent.node.udp import UdpSocket, open_udp
from agent.proto import disco

DISCO_LIKE = disco.MAGIC + bytes(80)
KEY = NodePrivate.generate().public()


class FakeEngine:
    def __init__(self) -> None:
        self.socket_routes: dict[tuple[str, int], int] = {}
        self.sockets_version = 0
        self.wanted: frozenset[int] = frozenset()
        self.disco: list[tuple[bytes, tuple[str, int], int]] = []

    def extra_sockets(self) -> frozenset[int]:
        return self.wanted

    def want(self, ids: set[int]) -> None:
        self.wanted = frozenset(ids)
        self.sockets_version += 1

    def receive_disco(
        self, packet: bytes, src: tuple[str, int], now: float, *, via: int = 0
    ) -> None:
        self.disco.append((packet, src, via))


class FakeDataPlane:
    def __init__(self) -> None:
        self.got: list[tuple[list[bytes], tuple[str, int]]] = []

    def on_datagrams(self, batches: Sequence[tuple[Sequence[Any], tuple[str, int]]]) -> None:
        self.got += [([bytes(d) for d in parts], src) for parts, src in batches]


def _loopback() -> UdpSocket:
    return open_udp(0, host="127.0.0.1", buffer_bytes=1 << 16)


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2)
    yield s
    s.close()


@pytest.fixture
def parts() -> Iterator[tuple[ExtraSockets, FakeEngine, UdpSocket]]:
    main = _loopback()
    engine = FakeEngine()
    extra = ExtraSockets(main, engine, opener=_loopback)  # type: ignore[arg-type]
    yield extra, engine, main
    extra.close()
    main.close()


def _addr(s: socket.socket) -> tuple[str, int]:
    host, port = s.getsockname()[:2]
    return str(host), int(port)


def test_sockets_follow_the_engine(parts: tuple[ExtraSockets, FakeEngine, UdpSocket]) -> None:
    extra, engine, _ = parts
    extra.reconcile()
    assert len(extra) == 0
    engine.want({1, 2, 3})
    extra.reconcile()
    assert len(extra) == 3
    assert extra.opened == 3
    engine.want({2})
    extra.reconcile()
    assert len(extra) == 1
    assert extra.status()["sockets"] == 1


def test_opening_stops_at_the_first_failure() -> None:
    main = _loopback()
    engine = FakeEngine()
    made: list[UdpSocket] = []

    def opener() -> UdpSocket:
        if len(made) == 2:
            raise OSError(24, "Too many open files")
        made.append(_loopback())
        return made[-1]

    extra = ExtraSockets(main, engine, opener=opener)  # type: ignore[arg-type]
    engine.want({1, 2, 3, 4})
    extra.reconcile()
    assert len(extra) == 2
    assert extra.open_failed == 2
    extra.send_via(Outgoing(b"x", ("127.0.0.1", 9), KEY, via=4))  # not open: counted
    assert extra.unsent == 1
    extra.close()
    main.close()


def test_udp_leaves_from_the_bound_socket(
    parts: tuple[ExtraSockets, FakeEngine, UdpSocket], peer: socket.socket
) -> None:
    extra, engine, main = parts
    to = _addr(peer)
    assert extra.send_batch([b"plain"], to) == 0
    _, src = peer.recvfrom(100)
    assert src[1] == main.port  # unbound: the WireGuard socket
    engine.want({7, 8})
    extra.reconcile()
    extra.send_via(Outgoing(b"ping", to, KEY, via=8))
    data, src = peer.recvfrom(100)
    assert data == b"ping"
    eight = src[1]
    assert eight != main.port
    engine.socket_routes[to] = 8
    engine.want({8})
    extra.reconcile()
    assert extra.send_batch([b"wg1", b"wg2"], to) == 0
    assert {peer.recvfrom(100)[1][1] for _ in range(2)} == {eight}
    other = ("127.0.0.1", 9)
    assert extra.send_batch([b"x"], other) == 0  # another endpoint: the WireGuard socket


def test_received_disco_and_bound_data(
    parts: tuple[ExtraSockets, FakeEngine, UdpSocket], peer: socket.socket
) -> None:
    extra, engine, _ = parts
    plane = FakeDataPlane()
    extra.dataplane = plane  # type: ignore[assignment]
    activity: list[int] = []
    extra.on_activity = lambda: activity.append(1)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        extra.attach(loop)
        engine.want({5})
        extra.reconcile()
        to = extra._socks[5].sock.getsockname()[:2]  # its port
        peer.sendto(DISCO_LIKE, to)
        peer.sendto(b"\x04wireguard-like", to)  # not bound yet: dropped
        await _until(lambda: len(engine.disco) == 1 and extra.dropped == 1)
        engine.socket_routes[_addr(peer)] = 5
        peer.sendto(b"\x04data", to)
        await _until(lambda: len(plane.got) == 1)

    asyncio.run(run())
    assert engine.disco == [(DISCO_LIKE, _addr(peer), 5)]
    assert plane.got == [([b"\x04data"], _addr(peer))]
    assert activity  # the daemon flushes after DISCO (its replies go out then)


async def _until(cond: Any) -> None:
    """Poll `cond` for up to 2 s (the sockets' readers run in between)."""
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_extra_sockets_send_like_the_main_socket(peer: socket.socket) -> None:
    """With the compiled data plane, a bound extra socket sends through it too."""
    fastpath = pytest.importorskip("agent._fastpath", reason="the compiled module is not built")
    main = _loopback()
    main.use_native(fastpath)
    engine = FakeEngine()
    extra = ExtraSockets(main, engine, opener=_loopback)  # type: ignore[arg-type]
    try:
        engine.want({3})
        extra.reconcile()
        to = _addr(peer)
        engine.socket_routes[to] = 3
        assert extra.send_batch([b"wg"], to) == 0
        data, src = peer.recvfrom(100)
        assert data == b"wg"
        assert src[1] != main.port
        assert all(s.native is fastpath for s in extra._socks.values())
    finally:
        extra.close()
        main.close()
