"""tun_read / tun_write (agent/node/tun_batch.py, and its C twin when built) on a socketpair.

A SOCK_SEQPACKET socketpair keeps message boundaries, so it stands in for the TUN fd: each
message is one TUN read (vnet header and packet) or one TUN write.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

from agent.node import tun_batch
from agent.proto.offload import F_NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4, ZERO_VNET_HDR, VirtioNetHdr

SRC = bytes([100, 64, 0, 1])


def _impls() -> list[ModuleType | None]:
    try:
        from agent import _fastpath
    except ImportError:
        return [tun_batch, None]
    return [tun_batch, _fastpath]


@pytest.fixture(params=_impls(), ids=["python", "native"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param is None:
        pytest.skip("agent._fastpath is not built")
    module: ModuleType = request.param
    return module


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b


def ipv4(dst: int, payload: bytes, proto: int = 6, seq: int = 1) -> bytes:
    l4 = (
        struct.pack("!HHIIBBHHH", 1000, 2000, seq, 1, 5 << 4, 0x10, 1000, 0, 0)
        if proto == 6
        else struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0)
    )
    total = 20 + len(l4) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 7, 0x4000, 64, proto, 0, SRC, bytes([100, 64, 0, dst])
    )
    return ip + l4 + payload


def tso(dst: int, size: int, mss: int) -> bytes:
    """vnet header + TCPv4 super-packet of `size` payload bytes."""
    return VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16).encode() + ipv4(dst, bytes(size))


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(0x20000))
        except BlockingIOError:
            return out


def test_read_segments_counts_and_runs(
    impl: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    frames = [
        tso(2, 3000, 1000),  # 3 segments to .2
        ZERO_VNET_HDR + ipv4(2, b"x"),  # 1 more to .2: the same run
        ZERO_VNET_HDR + b"\x50" + bytes(30),  # not IP
        VirtioNetHdr(0, 3).encode() + ipv4(3, b"y"),  # unsupported gso_type: malformed
        b"\x01\x02\x03",  # shorter than the vnet header: not IP
        VirtioNetHdr(0, GSO_UDP_L4, 0, 0).encode() + ipv4(3, b"", 17),  # gso_size 0: malformed
        ZERO_VNET_HDR + ipv4(3, b"z"),
        tso(2, 10, 1000),
    ]
    for f in frames:
        b.send(f)
    packets, runs, reads, not_ip, malformed, error = impl.tun_read(a.fileno(), 64, True)
    assert (reads, not_ip, malformed, error) == (8, 2, 2, None)
    assert len(packets) == 6
    assert all(type(p) is bytes for p in packets)
    assert runs == [
        (bytes([100, 64, 0, 2]), 4),
        (bytes([100, 64, 0, 3]), 1),
        (bytes([100, 64, 0, 2]), 1),
    ]
    assert [len(p) for p in packets[:3]] == [1040, 1040, 1040]
    assert packets[3] == ipv4(2, b"x")


def test_read_stops_at_max_reads_and_eagain(
    impl: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    for i in range(5):
        b.send(ipv4(i, b"p"))
    packets, runs, reads, *_rest, error = impl.tun_read(a.fileno(), 3, False)
    assert (len(packets), reads, error) == (3, 3, None)
    assert [dst for dst, _ in runs] == [bytes([100, 64, 0, i]) for i in range(3)]
    packets, runs, reads, *_rest, error = impl.tun_read(a.fileno(), 10, False)
    assert (len(packets), reads, error) == (2, 2, None)
    assert impl.tun_read(a.fileno(), 10, False) == ([], [], 0, 0, 0, None)


def test_read_error_is_returned(impl: ModuleType) -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        packets, runs, reads, not_ip, malformed, error = impl.tun_read(w, 4, True)
    finally:
        os.close(w)
    assert (packets, runs, reads, not_ip, malformed) == ([], [], 0, 0, 0)
    assert isinstance(error, OSError)
    assert error.errno == errno.EBADF


def test_write_coalesces_with_vnet_header(
    impl: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    segs = [ipv4(2, bytes([i]) * 100, seq=1 + 100 * i) for i in range(10)]
    assert impl.tun_write(a.fileno(), segs, True, False) == (1, 0)
    (item,) = drain(b)
    hdr = VirtioNetHdr.parse(item)
    assert (hdr.gso_type, hdr.gso_size) == (GSO_TCPV4, 100)
    assert item[50:] == b"".join(bytes([i]) * 100 for i in range(10))
    udp = [ipv4(2, b"u" * 50, proto=17) for _ in range(4)]
    assert impl.tun_write(a.fileno(), udp, True, False) == (4, 0)
    assert drain(b) == [ZERO_VNET_HDR + p for p in udp]
    assert impl.tun_write(a.fileno(), udp, True, True) == (1, 0)
    assert VirtioNetHdr.parse(drain(b)[0]).gso_type == GSO_UDP_L4


def test_write_one_packet_each_without_coalescing(
    impl: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    segs = [ipv4(2, b"s", seq=1 + i) for i in range(3)]
    assert impl.tun_write(a.fileno(), segs, False, True) == (3, 0)
    assert drain(b) == segs
    assert impl.tun_write(a.fileno(), segs[:1], True, True) == (1, 0)
    assert drain(b) == [ZERO_VNET_HDR + segs[0]]
    assert impl.tun_write(a.fileno(), [memoryview(segs[1]), bytearray(segs[2])], False, False) == (
        2,
        0,
    )
    assert drain(b) == segs[1:]


@pytest.mark.parametrize("vnet", [True, False])
def test_write_failures_are_counted_never_blocking(
    impl: ModuleType, pair: tuple[socket.socket, socket.socket], vnet: bool
) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    packets = [ipv4(2, bytes(1000), seq=1 + 1000 * i) for i in range(40)]
    writes, failed = impl.tun_write(a.fileno(), packets[:1] * 40, vnet, False)
    assert writes == 40
    assert 0 < failed < 40  # the buffer filled up: EAGAIN, dropped
    assert len(drain(b)) == 40 - failed
    b.close()
    write: Callable[..., tuple[int, int]] = impl.tun_write
    assert write(a.fileno(), packets, vnet, False) == ((1, 40) if vnet else (40, 40))  # EPIPE
