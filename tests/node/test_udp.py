"""The data-plane UDP socket on loopback: GSO send, GRO receive, dual-stack, fallbacks."""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Iterator

import pytest

from agent.node.udp import (
    MAX_GSO_SEGMENTS,
    SOL_UDP,
    UDP_SEGMENT,
    UdpSocket,
    open_udp,
)


def payload(i: int, size: int) -> bytes:
    return bytes([i & 0xFF]) * size


def recv_all(sock: UdpSocket, want: int, timeout: float = 3.0) -> list[tuple[list[bytes], str]]:
    """recv_batch until `want` datagrams arrived; each entry (datagrams, source host)."""
    got: list[tuple[list[bytes], str]] = []
    deadline = time.monotonic() + timeout
    count = 0
    while count < want and time.monotonic() < deadline:
        select.select([sock.fileno()], [], [], 0.2)
        for parts, (host, _port) in sock.recv_batch(1024):
            got.append(([bytes(p) for p in parts], host))
            count += len(parts)
    return got


@pytest.fixture
def plain_receiver() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    s.settimeout(3.0)
    try:
        yield s
    finally:
        s.close()


def test_gso_send_arrives_as_separate_datagrams(plain_receiver: socket.socket) -> None:
    port = plain_receiver.getsockname()[1]
    sent = [payload(i, 1400) for i in range(45)]
    with open_udp(0) as tx:
        assert tx.send_batch(sent, ("127.0.0.1", port)) == 0
        assert tx.gso, "the kernel refused UDP GSO on loopback"
    got = [plain_receiver.recv(65535) for _ in range(45)]
    assert got == sent


def test_gro_receiver_splits_runs() -> None:
    sent = [payload(i, 1000) for i in range(45)] + [payload(99, 300)]
    with open_udp(0, gro=True) as rx, open_udp(0) as tx:
        assert tx.send_batch(sent, ("127.0.0.1", rx.port)) == 0
        got = recv_all(rx, len(sent))
        flat = [d for parts, _ in got for d in parts]
        assert flat == sent
        assert all(host == "127.0.0.1" for _, host in got)
        if rx.gro:
            assert any(len(parts) > 1 for parts, _ in got), "GRO delivered no merged run"


def test_dual_stack_socket_talks_to_ipv4_peer() -> None:
    with open_udp(0) as dual:
        assert dual.family == socket.AF_INET6
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            v4.bind(("127.0.0.1", 0))
            v4.settimeout(3.0)
            v4.sendto(b"hello", ("127.0.0.1", dual.port))
            ((parts, (host, port)),) = recv_all_with_ports(dual, 1)
            assert [bytes(p) for p in parts] == [b"hello"]
            assert (host, port) == v4.getsockname()
            assert dual.send_batch([b"world"], (host, port)) == 0
            assert v4.recv(100) == b"world"
        finally:
            v4.close()


def recv_all_with_ports(
    sock: UdpSocket, want: int
) -> list[tuple[list[memoryview], tuple[str, int]]]:
    out: list[tuple[list[memoryview], tuple[str, int]]] = []
    deadline = time.monotonic() + 3.0
    while len(out) < want and time.monotonic() < deadline:
        select.select([sock.fileno()], [], [], 0.2)
        out += sock.recv_batch(64)
    return out


def test_ipv4_only_socket() -> None:
    with open_udp(0, host="127.0.0.1") as a, open_udp(0, ipv6=False) as b:
        assert a.family == socket.AF_INET
        assert b.send_batch([b"x", b"y"], ("127.0.0.1", a.port)) == 0
        got = recv_all(a, 2)
        assert [d for parts, _ in got for d in parts] == [b"x", b"y"]


def test_a_source_is_normalised_once_and_reused() -> None:
    with open_udp(0) as dual:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            v4.bind(("127.0.0.1", 0))
            for i in range(2):
                v4.sendto(bytes([i]) * (10 + i), ("127.0.0.1", dual.port))  # no GRO merge
            got = recv_all_with_ports(dual, 2)
            assert [src for _, src in got] == [v4.getsockname()] * 2
            assert got[0][1] is got[1][1]  # the same Endpoint object: cheap comparisons
        finally:
            v4.close()


def test_one_read_asked_gives_one_receive() -> None:
    with open_udp(0) as rx, open_udp(0) as tx:
        for i in range(3):
            tx.send_batch([bytes([i]) * (10 + i)], ("127.0.0.1", rx.port))
        select.select([rx.fileno()], [], [], 3.0)
        time.sleep(0.05)
        assert len(rx.recv_batch(1)) == 1
        assert len(recv_all_with_ports(rx, 2)) == 2


def test_recv_batch_returns_empty_when_nothing_waits() -> None:
    with open_udp(0) as s:
        assert s.recv_batch(64) == []


# --------------------------------------------------------------------------- grouping


class FakeSock:
    """Records sendmsg/sendto calls; can be told to fail GSO sends."""

    family = socket.AF_INET6

    def __init__(self, gso_error: int | None = None, sendto_error: int | None = None) -> None:
        self.calls: list[tuple[str, list[int], int | None, tuple[str, int]]] = []
        self.gso_error = gso_error
        self.sendto_error = sendto_error

    def sendmsg(
        self,
        bufs: list[bytes],
        cmsg: list[tuple[int, int, bytes]],
        flags: int,
        addr: tuple[str, int],
    ) -> int:
        ((level, kind, data),) = cmsg
        assert (level, kind) == (SOL_UDP, UDP_SEGMENT)
        if self.gso_error is not None:
            raise OSError(self.gso_error, "refused")
        self.calls.append(("gso", [len(b) for b in bufs], int.from_bytes(data, "little"), addr))
        return sum(map(len, bufs))

    def sendto(self, buf: bytes, addr: tuple[str, int]) -> int:
        if self.sendto_error is not None:
            raise OSError(self.sendto_error, "nope")
        self.calls.append(("one", [len(buf)], None, addr))
        return len(buf)


def fake_udp(**kw: int) -> tuple[UdpSocket, FakeSock]:
    fake = FakeSock(**kw)
    return UdpSocket(fake, gso=True, gro=False), fake  # type: ignore[arg-type]


def test_send_batch_groups_equal_size_runs() -> None:
    udp, fake = fake_udp()
    sizes = [1400] * 10 + [500] + [1400] * 3 + [200] + [1500]
    assert udp.send_batch([b"a" * n for n in sizes], ("198.18.0.2", 51820)) == 0
    assert [(k, lens, seg) for k, lens, seg, _ in fake.calls] == [
        ("gso", [1400] * 10 + [500], 1400),
        ("gso", [1400] * 3 + [200], 1400),
        ("one", [1500], None),
    ]
    assert {addr for *_, addr in fake.calls} == {("::ffff:198.18.0.2", 51820)}


def test_send_batch_respects_segment_and_byte_limits() -> None:
    udp, fake = fake_udp()
    udp.send_batch([b"a" * 100] * 150, ("fd00::2", 1))
    assert [len(lens) for _, lens, _, _ in fake.calls] == [MAX_GSO_SEGMENTS, MAX_GSO_SEGMENTS, 22]
    assert fake.calls[0][3] == ("fd00::2", 1)
    fake.calls.clear()
    udp.send_batch([b"a" * 1400] * 50, ("10.0.0.1", 1))  # 46 x 1400 = 64400 <= 65507
    assert [len(lens) for _, lens, _, _ in fake.calls] == [46, 4]


@pytest.mark.parametrize("err", [errno.EIO, errno.EINVAL])
def test_gso_refused_falls_back_to_one_send_each(err: int) -> None:
    udp, fake = fake_udp(gso_error=err)
    assert udp.send_batch([b"a" * 1000] * 5, ("10.0.0.1", 1)) == 0
    assert [k for k, *_ in fake.calls] == ["one"] * 5
    assert not udp.gso
    fake.calls.clear()
    udp.send_batch([b"a" * 1000] * 3, ("10.0.0.1", 1))
    assert [k for k, *_ in fake.calls] == ["one"] * 3


def test_full_queue_drops_and_counts() -> None:
    udp, _fake = fake_udp(gso_error=errno.ENOBUFS)
    assert udp.send_batch([b"a" * 1000] * 5, ("10.0.0.1", 1)) == 5
    assert udp.send_dropped == 5
    assert udp.gso
    udp2, _ = fake_udp(sendto_error=errno.ENETUNREACH)
    assert udp2.send_batch([b"x"], ("10.0.0.1", 1)) == 1
    assert udp2.send_errors == 1
    assert udp2.last_error is not None
