"""agent._fastpath.segment and .coalesce against their Python references, byte for byte.

segment: the same packets, or MalformedPacket with the same message, for valid TSO/USO
super-packets of every size and MSS, NEEDS_CSUM singles, corrupted and truncated headers and
random bytes. coalesce: the same TUN writes for interleaved flows with gaps, flags, shape
changes, padding and damage, with and without UDP.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proto.errors import MalformedPacket
from agent.proto.offload import VirtioNetHdr, coalesce, segment

from .packets import (
    ACK,
    PSH,
    Super,
    any_segment_input,
    batches,
    ip_header,
    pseudo,
    super_packets,
    tcp_header,
    tcp_packet,
    udp_packet,
)

fp = pytest.importorskip(
    "agent._fastpath",
    reason="agent._fastpath is not built (needs gcc, python3-dev, libssl-dev; reinstall)",
)

Outcome = list[bytes] | tuple[str, str]

SLOW = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_segment(hdr: bytes, packet: bytes) -> Outcome:
    try:
        return [bytes(p) for p in segment(VirtioNetHdr.parse(hdr), packet)]
    except MalformedPacket as e:
        return ("MalformedPacket", str(e))


def native_segment(hdr: bytes, packet: bytes) -> Outcome:
    try:
        out = fp.segment(hdr, packet)
    except MalformedPacket as e:
        return ("MalformedPacket", str(e))
    assert all(type(p) is bytes for p in out)
    return list(out)


def ref_coalesce(packets: list[bytes], udp: bool) -> list[bytes]:
    return [head + b"".join(bytes(b) for b in bufs) for head, bufs in coalesce(packets, udp=udp)]


def check_segment(sp: Super) -> Outcome:
    expected = ref_segment(sp.hdr, sp.packet)
    assert native_segment(sp.hdr, sp.packet) == expected
    return expected


# --------------------------------------------------------------------------- segment


@SLOW
@given(super_packets())
def test_segment_super_packets(sp: Super) -> None:
    check_segment(sp)


@SLOW
@given(any_segment_input())
def test_segment_any_input(sp: Super) -> None:
    check_segment(sp)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=10, max_size=10), st.binary(max_size=2000))
def test_segment_random_bytes(hdr: bytes, packet: bytes) -> None:
    check_segment(Super(hdr, packet))


def test_segment_seeded_mutations() -> None:
    """Many cheap inputs: valid super-packets with 1-4 random bytes changed or cut."""
    rng = random.Random(7)
    kinds: dict[str, int] = {}
    for _ in range(4000):
        version = rng.choice((4, 6))
        udp = rng.random() < 0.3
        payload = rng.randbytes(rng.randrange(0, 4000))
        if udp:
            l4 = struct.pack("!HHHH", 1, 2, 8 + len(payload), 0)
        else:
            l4 = tcp_header(rng.getrandbits(32), rng.getrandbits(8))
        field = 6 if udp else 16
        proto = 17 if udp else 6
        ih = ip_header(version, len(l4) + len(payload), proto)
        l4 = (
            l4[:field]
            + struct.pack("!H", pseudo(version, proto, len(l4) + len(payload)))
            + l4[field + 2 :]
        )
        gso = 5 if udp else (1 if version == 4 else 4)
        hdr = bytearray(VirtioNetHdr(1, gso, 0, rng.randrange(1, 1500), len(ih), field).encode())
        pkt = bytearray(ih + l4 + payload)
        for _ in range(rng.randrange(1, 5)):
            r = rng.random()
            if r < 0.3:
                hdr[rng.randrange(10)] = rng.getrandbits(8)
            elif r < 0.8 and pkt:
                pkt[rng.randrange(min(len(pkt), 80))] = rng.getrandbits(8)
            else:
                del pkt[rng.randrange(len(pkt) + 1) :]
        out = check_segment(Super(bytes(hdr), bytes(pkt)))
        key = out[1] if isinstance(out, tuple) else "ok"
        kinds[key] = kinds.get(key, 0) + 1
    assert kinds.get("ok", 0) > 100, kinds  # both outcomes were exercised
    assert len(kinds) > 8, kinds


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [0, 1, 1447, 1448, 1449, 64000, 65535 - 52, 65535 - 72])
@pytest.mark.parametrize("mss", [1, 3, 536, 1448, 65535])
def test_segment_edges(version: int, size: int, mss: int) -> None:
    th = tcp_header(0xFFFFFFF0, ACK | PSH | 0x80 | 0x01)
    ih = ip_header(version, len(th) + size, 6, ip_id=0xFFFE)
    if len(ih) + len(th) + size > 0xFFFF + 20:
        pytest.skip("longer than any TUN read")
    th = th[:16] + struct.pack("!H", pseudo(version, 6, len(th) + size)) + th[18:]
    gso = 1 if version == 4 else 4
    hdr = VirtioNetHdr(1, gso | 0x80, 0, mss, len(ih), 16).encode()
    out = check_segment(Super(hdr, ih + th + bytes(range(256)) * (size // 256) + bytes(size % 256)))
    if len(ih) + len(th) + size <= 0xFFFF:
        assert isinstance(out, list)
        assert len(out) == max(1, -(-size // mss))


def test_segment_takes_any_buffer_and_short_headers() -> None:
    sp = Super(VirtioNetHdr(1, 0, 0, 0, 20, 16).encode(), tcp_packet(4, b"x" * 99, 5))
    expected = ref_segment(sp.hdr, sp.packet)
    for wrap in (bytes, bytearray, memoryview):
        assert fp.segment(wrap(sp.hdr), wrap(sp.packet)) == expected
    plain = tcp_packet(6, b"abc", 1)
    (same,) = fp.segment(bytes(10), plain)
    assert same is plain  # passed through, not copied
    for short in (b"", bytes(9)):
        with pytest.raises(MalformedPacket, match="short virtio_net_hdr"):
            fp.segment(short, plain)
    with pytest.raises(MalformedPacket, match="unsupported gso_type 131"):
        fp.segment(bytes([0, 131]) + bytes(8), plain)
    with pytest.raises(TypeError):
        fp.segment(bytes(10), "text")


# --------------------------------------------------------------------------- coalesce


@SLOW
@given(batches(), st.booleans())
def test_coalesce_batches(packets: list[bytes], udp: bool) -> None:
    assert fp.coalesce(packets, udp) == ref_coalesce(packets, udp)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=40), st.booleans())
def test_coalesce_random_bytes(packets: list[bytes], udp: bool) -> None:
    assert fp.coalesce(packets, udp) == ref_coalesce(packets, udp)


@SLOW
@given(super_packets(), st.booleans(), st.integers(0, 4))
def test_coalesce_segmented_super_packets(sp: Super, udp: bool, pad: int) -> None:
    """Cut a super-packet with segment, coalesce the cuts back (every one padded by `pad`)."""
    segs = ref_segment(sp.hdr, sp.packet)
    if isinstance(segs, tuple):
        return
    segs = [s + bytes(pad) for s in segs]
    assert fp.coalesce(segs, udp) == ref_coalesce(segs, udp)


def test_coalesce_limits_and_buffers() -> None:
    """300 in-order 1-byte-payload segments pass the 256-segment cap; 200 equal datagrams pass
    the 64-datagram cap; 60 KB segments pass the 64 KB cap. Any buffer type goes in."""
    tcp = [tcp_packet(4, b"z", 100 + i) for i in range(300)]
    big = [tcp_packet(6, bytes(30000), 9 + 30000 * i) for i in range(5)]
    udps = [udp_packet(4, bytes(50)) for _ in range(200)] + [udp_packet(6, bytes(900))] * 90
    for batch in (tcp, big, udps, tcp + udps + big):
        for udp in (False, True):
            expected = ref_coalesce(batch, udp)
            assert fp.coalesce(batch, udp) == expected
            assert fp.coalesce([memoryview(p) for p in batch], udp) == expected
            assert fp.coalesce(tuple(bytearray(p) for p in batch), udp) == expected
    assert len(fp.coalesce(tcp, False)) == 2
    assert len(fp.coalesce(udps, True)) == 6
    assert fp.coalesce([], True) == []
    with pytest.raises(TypeError):
        fp.coalesce([b"ok", 5], False)
    with pytest.raises(TypeError):
        fp.coalesce(7, False)


def test_coalesce_first_segment_padding_is_not_merged() -> None:
    """A first segment with bytes past its IP length: the merged packet carries its payload
    only (the reference put the padding in the middle of the stream)."""
    segs = [tcp_packet(4, bytes([i]) * 100, 1000 + 100 * i) for i in range(3)]
    segs[0] += b"\xee" * 12
    (item,) = ref_coalesce(segs, False)
    assert b"\xee" not in item
    assert fp.coalesce(segs, False) == [item]


def _tso(version: int, size: int = 3000, **hdr: int) -> tuple[bytes, bytearray]:

    th = tcp_header(1, ACK)
    ih = ip_header(version, len(th) + size, 6)
    fields = {"flags": 1, "gso_type": 1 if version == 4 else 4, "gso_size": 1000}
    fields |= {"csum_start": len(ih), "csum_offset": 16} | hdr
    return VirtioNetHdr(**fields).encode(), bytearray(ih + th + bytes(size))


def _error_cases() -> list[tuple[str, bytes, bytes]]:
    cases: list[tuple[str, bytes, bytes]] = []

    def add(message: str, hdr: bytes, pkt: bytes | bytearray) -> None:
        cases.append((message, hdr, bytes(pkt)))

    add("short virtio_net_hdr", bytes(5), b"")
    add("checksum offsets outside the packet", VirtioNetHdr(1, 0, 0, 0, 19, 0).encode(), bytes(40))
    add("checksum offsets outside the packet", VirtioNetHdr(1, 0, 0, 0, 20, 19).encode(), bytes(40))
    add("unsupported gso_type 3", VirtioNetHdr(0, 3, 0, 9).encode(), bytes(40))
    add("gso_size 0", *_tso(4, gso_size=0))
    add("GSO super-packet longer than 65535 bytes", *_tso(6, 0xFFFF - 59))
    h, p = _tso(4)
    add("short IP packet", h, p[:19])
    p[0] = 0x44
    add("bad IPv4 header length", h, p)
    p[0] = 0x55
    add("not IPv4/IPv6", h, p)
    h, p = _tso(6)
    add("not IPv4/IPv6", h, p[:39])
    h, p = _tso(6, flags=0)
    p[6] = 0  # hop-by-hop header pointing past the end
    add("truncated IPv6 extension header", h, p[:47])
    h, p = _tso(4, csum_start=len(p) - 10)
    add("truncated TCP header", h, p)
    h, p = _tso(4)
    p[20 + 12] = 0x40
    add("bad TCP data offset", h, p)
    h, p = _tso(6, csum_start=20)
    p[32] = 0x50  # a TCP data offset where csum_start says the header is, inside the IPv6 one
    add("transport header outside the packet", h, p)
    h, p = _tso(4, 0, gso_type=5)
    add("transport header outside the packet", VirtioNetHdr(1, 5, 0, 9, 20, 6).encode(), p[:27])
    h, p = _tso(4, csum_start=21)
    p[21 + 12] = 0x50
    add("transport header at an odd offset", h, p)
    add("gso_type does not match the IP version", *_tso(4, gso_type=4))
    add("gso_type does not match the IP version", *_tso(6, gso_type=0x81))
    return cases


@pytest.mark.parametrize(("message", "hdr", "packet"), _error_cases())
def test_segment_each_malformed_case(message: str, hdr: bytes, packet: bytes) -> None:
    assert ref_segment(hdr, packet) == ("MalformedPacket", message)
    assert native_segment(hdr, packet) == ("MalformedPacket", message)
