"""The compiled UDP send batch against UdpSocket's Python one, over real sockets on loopback:
the same datagrams arrive, in the same order, with the same counters (native/udp.c)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.node.udp import UdpSocket, open_udp

fastpath = pytest.importorskip(
    "agent._fastpath", reason="agent._fastpath is not built (pip install -e . with gcc, libssl-dev)"
)


def receive_all(sock: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            break
    return out


def send_with(udp: UdpSocket, datagrams: list[bytes], port: int) -> int:
    return udp.send_batch(datagrams, ("127.0.0.1", port))


@contextlib.contextmanager
def open_sockets() -> Iterator[tuple[UdpSocket, UdpSocket, socket.socket]]:
    """A Python-sending and a native-sending socket, and one receiver on loopback."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.setblocking(False)
    py, c = open_udp(0), open_udp(0)
    c.use_native(fastpath)
    try:
        yield py, c, rx
    finally:
        for s in (py, c):
            s.close()
        rx.close()


@pytest.fixture
def sockets() -> Iterator[tuple[UdpSocket, UdpSocket, socket.socket]]:
    with open_sockets() as s:
        yield s


sizes = st.lists(st.integers(0, 1500) | st.sampled_from([64, 64, 64, 1452, 65507]), max_size=150)


@settings(max_examples=40, deadline=None)
@given(lengths=sizes)
def test_the_same_datagrams_arrive(lengths: list[int]) -> None:
    with open_sockets() as (py, c, rx):
        check_same(py, c, rx, lengths)


def check_same(py: UdpSocket, c: UdpSocket, rx: socket.socket, lengths: list[int]) -> None:
    port = rx.getsockname()[1]
    datagrams = [bytes([i & 0xFF]) * n for i, n in enumerate(lengths)]
    assert send_with(py, datagrams, port) == 0
    got_py = receive_all(rx, len(datagrams) + 1)
    assert send_with(c, [memoryview(d) for d in datagrams], port) == 0
    got_c = receive_all(rx, len(datagrams) + 1)
    assert got_c == got_py == datagrams
    assert (c.send_dropped, c.send_errors, c.gso) == (py.send_dropped, py.send_errors, py.gso)


def test_errors_are_counted_not_raised(
    sockets: tuple[UdpSocket, UdpSocket, socket.socket],
) -> None:
    py, c, _ = sockets
    too_big = [bytes(70000)]  # EMSGSIZE
    assert send_with(py, too_big, 9) == send_with(c, too_big, 9) == 1
    assert c.send_errors == py.send_errors == 1
    assert c.last_error is not None
    assert py.last_error is not None
    assert c.last_error.errno == py.last_error.errno


def test_a_scoped_address_takes_the_python_path(
    sockets: tuple[UdpSocket, UdpSocket, socket.socket],
) -> None:
    _, c, _ = sockets
    c.send_batch([b"x"], ("not-an-address", 9))  # counted as an error, never raised
    assert c.send_errors == 1
    with pytest.raises(ValueError, match="not an IP address"):
        fastpath.sockaddr(socket.AF_INET, "::1", 9)
