"""agent._fastpath.tun_read / tun_write against agent/node/tun_batch.py on the same frames.

Two SOCK_SEQPACKET socketpairs stand in for TUN fds (one message per read or write): the same
frames go into both, each implementation reads one, and every result must be equal; for writes,
the messages that come out of the other ends must be equal too. tests/native/test_tun_native.py
does the same over real TUN devices.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.node import tun_batch

from .packets import Super, any_segment_input, batches, single_packets, super_packets

fp = pytest.importorskip(
    "agent._fastpath",
    reason="agent._fastpath is not built (needs gcc, python3-dev, libssl-dev; reinstall)",
)

SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Pair = tuple[socket.socket, socket.socket]


def comparable(result: tuple[object, ...]) -> tuple[object, ...]:
    """The result with its error (an OSError, not comparable by ==) as (type, errno)."""
    *rest, error = result
    assert error is None or isinstance(error, OSError)
    return (*rest, None if error is None else (type(error), error.errno))


@contextlib.contextmanager
def two_pairs() -> Iterator[tuple[Pair, Pair]]:
    made: list[socket.socket] = []
    try:
        out = []
        for _ in range(2):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            made += [a, b]
            for s in (a, b):
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            out.append((a, b))
        yield out[0], out[1]
    finally:
        for s in made:
            s.close()


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(0x20000))
        except BlockingIOError:
            return out


def read_both(frames: list[bytes], max_reads: int, vnet: bool) -> tuple[object, ...]:
    with two_pairs() as (native_pair, python_pair):
        for f in frames:
            native_pair[1].send(f)
            python_pair[1].send(f)
        native = comparable(fp.tun_read(native_pair[0].fileno(), max_reads, vnet))
        python = comparable(tun_batch.tun_read(python_pair[0].fileno(), max_reads, vnet))
        assert native == python
        assert drain(native_pair[0]) == drain(python_pair[0])  # both stopped at the same frame
        return native


def write_both(packets: list[bytes], vnet: bool, udp: bool) -> list[bytes]:
    with two_pairs() as (native_pair, python_pair):
        native = fp.tun_write(native_pair[0].fileno(), packets, vnet, udp)
        python = tun_batch.tun_write(python_pair[0].fileno(), packets, vnet, udp)
        assert native == python
        out = drain(native_pair[1])
        assert out == drain(python_pair[1])
        return out


def _frame(sp: Super) -> bytes:
    return (sp.hdr[:10] + sp.packet)[: 0xFFFF + 10]


frames_vnet = st.lists(
    st.one_of(
        any_segment_input().map(_frame),
        super_packets().map(_frame),
        st.binary(max_size=12),  # shorter than (or just) a vnet header
    ),
    max_size=12,
)
frames_plain = st.lists(
    st.one_of(single_packets().map(lambda sp: sp.packet), st.binary(min_size=1, max_size=80)),
    max_size=20,
)


@SLOW
@given(frames_vnet, st.integers(1, 16))
def test_tun_read_vnet_frames(frames: list[bytes], max_reads: int) -> None:
    read_both(frames, max_reads, True)


@SLOW
@given(frames_plain, st.integers(1, 24))
def test_tun_read_plain_frames(frames: list[bytes], max_reads: int) -> None:
    read_both(frames, max_reads, False)


@SLOW
@given(batches(), st.booleans(), st.booleans())
def test_tun_write_batches(packets: list[bytes], vnet: bool, udp: bool) -> None:
    write_both(packets, vnet, udp)


def test_tun_read_and_write_errors() -> None:
    r, w = os.pipe()
    try:
        # reading the write end of a pipe: EBADF; an empty read end: EAGAIN (no error)
        os.set_blocking(r, False)
        bad = comparable(fp.tun_read(w, 8, True))
        assert bad == comparable(tun_batch.tun_read(w, 8, True))
        assert bad[-1] == (OSError, errno.EBADF)
        assert fp.tun_read(r, 8, True) == tun_batch.tun_read(r, 8, True) == ([], [], 0, 0, 0, None)
        pkt = [bytes([0x45]) + bytes(39)] * 3
        for vnet in (True, False):
            assert fp.tun_write(r, pkt, vnet, True) == tun_batch.tun_write(r, pkt, vnet, True)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(TypeError):
        fp.tun_read("x", 8, True)
    with pytest.raises(TypeError):
        fp.tun_write(0, [1], True, True)
