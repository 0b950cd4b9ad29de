"""The compiled transport batches against their Python twin: same keys, counters and bytes in,
byte-identical datagrams, plaintexts, drops and counters out (agent/proto/wireguard/transport.py
and native/crypto.c)."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proto.wireguard.constants import REJECT_AFTER_MESSAGES
from agent.proto.wireguard.replay import WINDOW_SIZE
from agent.proto.wireguard.transport import PYTHON, OpenedRun, Transport

fastpath = pytest.importorskip(
    "agent._fastpath", reason="agent._fastpath is not built (pip install -e . with gcc, libssl-dev)"
)

from agent.node.fastpath import native_transport  # noqa: E402

NATIVE: Transport = native_transport(fastpath)
KEY = bytes(range(32))


def ipv4(src: bytes, payload: bytes = b"", *, length: int | None = None) -> bytes:
    total = 20 + len(payload) if length is None else length
    return (
        bytes([0x45, 0])
        + struct.pack(">H", total)
        + bytes(8)
        + src
        + bytes([100, 64, 0, 9])
        + payload
    )


def ipv6(src: bytes, payload: bytes = b"", *, plen: int | None = None) -> bytes:
    n = len(payload) if plen is None else plen
    return (
        bytes([0x60, 0, 0, 0]) + struct.pack(">H", n) + bytes([17, 64]) + src + bytes(16) + payload
    )


sizes = st.integers(0, 2000) | st.sampled_from([0, 1, 15, 16, 17, 1420, 8192, 65535])


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    data=st.binary(max_size=3000),
    aad=st.none() | st.binary(max_size=64),
)
def test_aead_matches_cryptography(
    key: bytes, nonce: bytes, data: bytes, aad: bytes | None
) -> None:
    py, c = PYTHON.aead(key), NATIVE.aead(key)
    sealed = py.encrypt(nonce, data, aad)
    assert c.encrypt(nonce, data, aad) == sealed
    assert c.decrypt(nonce, sealed, aad) == data
    bad = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(InvalidTag):
        c.decrypt(nonce, bad, aad)
    with pytest.raises(InvalidTag):
        c.decrypt(nonce, sealed[:15], aad)


def test_aead_refuses_bad_key_and_nonce() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NATIVE.aead(bytes(31))
    with pytest.raises(ValueError, match="12 bytes"):
        NATIVE.aead(KEY).encrypt(bytes(8), b"x", None)


@settings(max_examples=100, deadline=None)
@given(
    index=st.integers(0, 2**32 - 1),
    counter=st.integers(0, 2**64 - 2**13 - 200),
    lengths=st.lists(sizes, max_size=20),
    seed=st.integers(0, 255),
)
def test_seal_is_byte_identical(index: int, counter: int, lengths: list[int], seed: int) -> None:
    packets: list[bytes | memoryview] = [
        bytes((seed + i) & 0xFF for i in range(n)) for n in lengths
    ]
    if packets:
        packets[0] = memoryview(b"xx" + bytes(packets[0]))[2:]  # buffers, not only bytes
    py = PYTHON.seal(PYTHON.aead(KEY), index, counter, packets)
    assert NATIVE.seal(NATIVE.aead(KEY), index, counter, packets) == py


def test_seal_refuses_an_exhausted_counter() -> None:
    with pytest.raises(OverflowError):
        NATIVE.seal(NATIVE.aead(KEY), 1, REJECT_AFTER_MESSAGES, [b"x"])


counters = st.integers(0, 3 * WINDOW_SIZE) | st.sampled_from(
    [0, 1, 63, 64, WINDOW_SIZE, WINDOW_SIZE + 1, REJECT_AFTER_MESSAGES - 1, REJECT_AFTER_MESSAGES,
     2**64 - 1]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(counters | st.integers(0, 2**64 - 1), max_size=200))
def test_replay_window_matches(sequence: list[int]) -> None:
    py, c = PYTHON.replay(), NATIVE.replay()
    assert [c.accept(x) for x in sequence] == [py.accept(x) for x in sequence]


def test_replay_window_refuses_negative_and_huge() -> None:
    w = NATIVE.replay()
    assert not w.accept(-1)
    assert not w.accept(2**64)
    assert w.accept(5)
    assert not w.accept(5)


# One datagram of a run: what it is before it is sealed (or how it is broken afterwards).
V4_A, V4_B = bytes([100, 64, 0, 2]), bytes([100, 64, 0, 3])
V6_A = bytes.fromhex("fd7a115ce1a000000000000000000002")
payloads = st.sampled_from(
    [
        b"",  # keepalive
        ipv4(V4_A, b"hello"),
        ipv4(V4_B, bytes(100)),
        ipv4(V4_A, b"pad", length=20),  # trimmed to its length
        ipv4(V4_A, length=19),  # malformed: below 20
        ipv4(V4_A, length=400),  # malformed: beyond the payload
        ipv6(V6_A, b"six"),
        ipv6(V6_A, plen=999),  # malformed
        bytes([0x45]) * 10,  # not IP: too short for its version
        bytes([0x70]) * 64,  # not IP: version 7
        bytes(1),
    ]
) | st.binary(max_size=120)
kinds = st.sampled_from(["ok", "ok", "ok", "corrupt", "other_index", "truncated", "handshake"])


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[bytes], int, list[int]]:
    """Datagrams for index 7 (with some that stop or break the run) and replay history."""
    n = draw(st.integers(0, 24))
    counters_used = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    seal = PYTHON.seal
    aead = PYTHON.aead(KEY)
    out: list[bytes] = []
    for ctr in counters_used:
        kind = draw(kinds)
        payload = draw(payloads)
        index = 8 if kind == "other_index" else 7
        (d,) = seal(aead, index, ctr, [payload])
        if kind == "corrupt":
            d = d[:-1] + bytes([d[-1] ^ 0x80])
        elif kind == "truncated":
            d = d[:31]
        elif kind == "handshake":
            d = bytes([1, 0, 0, 0]) + d[4:]
        out.append(d)
    history = draw(st.lists(st.integers(0, 40), max_size=6))
    return out, draw(st.integers(0, max(n, 1))), history


@settings(max_examples=400, deadline=None)
@given(runs())
def test_open_run_matches(case: tuple[list[bytes], int, list[int]]) -> None:
    datagrams, start, history = case
    results: list[OpenedRun] = []
    for impl in (PYTHON, NATIVE):
        replay = impl.replay()
        for ctr in history:
            replay.accept(ctr)
        views = [memoryview(d) for d in datagrams]
        results.append(impl.open_run(impl.aead(KEY), replay, views, start, 7))
    assert results[1] == results[0]


def test_open_run_counts_every_drop_reason() -> None:
    aead = PYTHON.aead(KEY)
    good = PYTHON.seal(aead, 7, 0, [ipv4(V4_A, b"x")])[0]
    datagrams = [
        good,
        good,  # replay
        PYTHON.seal(aead, 7, 1, [bytes([0x70]) * 30])[0],  # not IP
        PYTHON.seal(aead, 7, 2, [ipv4(V4_A, length=300)])[0],  # malformed
        good[:-1] + b"\0",  # authentication
        PYTHON.seal(aead, 7, 3, [b""])[0],  # keepalive: no packet, still bytes
        PYTHON.seal(aead, 9, 4, [b""])[0],  # another index: the run ends here
    ]
    for impl in (PYTHON, NATIVE):
        run = impl.open_run(impl.aead(KEY), impl.replay(), datagrams, 0, 7)
        assert run.next == 6
        assert run.packets == [ipv4(V4_A, b"x")]
        assert run.sources == [V4_A]
        assert (run.authentication, run.replay, run.not_ip, run.malformed) == (1, 1, 1, 1)
        assert run.wire_bytes == len(good) + len(datagrams[2]) + len(datagrams[3]) + 32
        assert run.data


def test_open_run_of_large_packets() -> None:
    big = ipv4(V4_A, os.urandom(65535 - 20))
    datagrams = PYTHON.seal(PYTHON.aead(KEY), 7, 0, [big, ipv6(V6_A, os.urandom(9000))])
    runs_ = [i.open_run(i.aead(KEY), i.replay(), datagrams, 0, 7) for i in (PYTHON, NATIVE)]
    assert runs_[0] == runs_[1]
    assert runs_[1].packets[0] == big
