"""TUN offload arithmetic: segmentation of TSO/USO super-packets and TCP coalescing.

Every checksum is verified with an independent word-by-word one's-complement sum written
here, not with the module's own helper.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proto import offload
from agent.proto.errors import MalformedPacket
from agent.proto.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    ZERO_VNET_HDR,
    VirtioNetHdr,
    coalesce,
    segment,
)

SRC4 = ipaddress.IPv4Address("100.64.0.1").packed
DST4 = ipaddress.IPv4Address("100.64.0.2").packed
SRC6 = ipaddress.IPv6Address("fd7a:115c:a1e0::1").packed
DST6 = ipaddress.IPv6Address("fd7a:115c:a1e0::2").packed

FIN, SYN, PSH, ACK, CWR = 0x01, 0x02, 0x08, 0x10, 0x80


# --------------------------------------------------------------------------- reference


def ones_sum(data: bytes, initial: int = 0) -> int:
    """Textbook RFC 1071 sum: 16-bit big-endian words with end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        ph = src + dst + bytes([0, proto]) + struct.pack("!H", length)
    else:
        ph = src + dst + struct.pack("!I", length) + bytes([0, 0, 0, proto])
    return ones_sum(ph)


def verify_l4(pkt: bytes, l3len: int, proto: int) -> None:
    v4 = pkt[0] >> 4 == 4
    src, dst = (pkt[12:16], pkt[16:20]) if v4 else (pkt[8:24], pkt[24:40])
    l4 = pkt[l3len:]
    assert ones_sum(l4, pseudo_sum(src, dst, proto, len(l4))) == 0xFFFF
    if proto == 17:
        assert l4[6:8] != b"\0\0"


def verify_ip(pkt: bytes) -> None:
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        assert ones_sum(pkt[:ihl]) == 0xFFFF
        assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt)
    else:
        assert struct.unpack_from("!H", pkt, 4)[0] == len(pkt) - 40


# --------------------------------------------------------------------------- builders


def ip_header(
    version: int, l4len: int, proto: int, ip_id: int = 0x1234, opts: bytes = b""
) -> bytes:
    if version == 4:
        ihl = 5 + len(opts) // 4
        h = struct.pack(
            "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + l4len, ip_id, 0x4000, 64, proto, 0, SRC4, DST4
        )
        h += opts
        csum = ~ones_sum(h) & 0xFFFF
        return h[:10] + struct.pack("!H", csum) + h[12:]
    return struct.pack("!IHBB16s16s", 0x60000000, l4len, proto, 64, SRC6, DST6)


def tcp_header(seq: int, flags: int, opts: bytes = b"", ack: int = 777, window: int = 500) -> bytes:
    doff = (20 + len(opts)) // 4
    return struct.pack("!HHIIBBHHH", 40000, 5201, seq, ack, doff << 4, flags, window, 0, 0) + opts


def tcp_packet(
    version: int,
    payload: bytes,
    seq: int = 1000,
    flags: int = ACK,
    opts: bytes = b"",
    ip_opts: bytes = b"",
    ip_id: int = 0x1234,
) -> bytes:
    """A complete TCP/IP packet with valid checksums."""
    th = tcp_header(seq, flags, opts)
    ih = ip_header(version, len(th) + len(payload), 6, ip_id, ip_opts)
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    csum = ~ones_sum(th + payload, pseudo_sum(src, dst, 6, len(th) + len(payload))) & 0xFFFF
    th = th[:16] + struct.pack("!H", csum) + th[18:]
    return ih + th + payload


def tcp_super(
    version: int,
    payload: bytes,
    mss: int,
    seq: int = 1000,
    flags: int = ACK | PSH,
    opts: bytes = b"",
    ip_opts: bytes = b"",
) -> tuple[VirtioNetHdr, bytes]:
    """A TSO super-packet the way the kernel hands it over: partial checksum in the field."""
    th = tcp_header(seq, flags, opts)
    ih = ip_header(version, len(th) + len(payload), 6, opts=ip_opts)
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    partial = pseudo_sum(src, dst, 6, len(th) + len(payload))
    th = th[:16] + struct.pack("!H", partial) + th[18:]
    hdr = VirtioNetHdr(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV4 if version == 4 else GSO_TCPV6,
        hdr_len=len(ih) + len(th),
        gso_size=mss,
        csum_start=len(ih),
        csum_offset=16,
    )
    return hdr, ih + th + payload


def udp_super(version: int, payload: bytes, mss: int) -> tuple[VirtioNetHdr, bytes]:
    uh = struct.pack("!HHHH", 5353, 9999, 8 + len(payload), 0)
    ih = ip_header(version, len(uh) + len(payload), 17)
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_UDP_L4, len(ih) + 8, mss, len(ih), 6)
    return hdr, ih + uh + payload


def pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


def check_tcp_segments(
    segs: list[bytes], version: int, payload: bytes, mss: int, seq0: int, flags: int, hlen: int
) -> None:
    joined = b""
    n = len(segs)
    assert n == max(1, -(-len(payload) // mss))
    for i, seg in enumerate(segs):
        verify_ip(seg)
        l3 = (seg[0] & 0xF) * 4 if version == 4 else 40
        verify_l4(seg, l3, 6)
        doff = (seg[l3 + 12] >> 4) * 4
        body = seg[l3 + doff :]
        assert len(body) == (mss if i < n - 1 else len(payload) - mss * (n - 1))
        assert struct.unpack_from("!I", seg, l3 + 4)[0] == (seq0 + i * mss) & 0xFFFFFFFF
        f = seg[l3 + 13]
        want = flags
        if i < n - 1:
            want &= ~(FIN | PSH)
        if i > 0:
            want &= ~CWR
        assert f == want
        if version == 4:
            assert struct.unpack_from("!H", seg, 4)[0] == (0x1234 + i) & 0xFFFF
        joined += body
    assert joined == payload


# --------------------------------------------------------------------------- tests


def test_vnet_hdr_roundtrip() -> None:
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 52, 1368, 20, 16)
    raw = hdr.encode()
    assert len(raw) == 10
    assert raw == struct.pack("<BBHHHH", 1, 1, 52, 1368, 20, 16)
    assert VirtioNetHdr.parse(raw) == hdr
    assert VirtioNetHdr.parse(ZERO_VNET_HDR).gso_type == GSO_NONE
    with pytest.raises(MalformedPacket):
        VirtioNetHdr.parse(b"\0" * 9)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("vectorise", [True, False])
@pytest.mark.parametrize(
    ("size", "mss"), [(64000, 1368), (5000, 1000), (1368 * 3, 1368), (10, 1368), (7777, 333)]
)
def test_tso_segments_are_valid(version: int, vectorise: bool, size: int, mss: int) -> None:
    payload = pattern(size)
    flags = ACK | PSH | FIN | CWR
    hdr, pkt = tcp_super(version, payload, mss, seq=0xFFFFF000, flags=flags)
    segs = [bytes(s) for s in segment(hdr, pkt, vectorise=vectorise)]
    check_tcp_segments(segs, version, payload, mss, 0xFFFFF000, flags, hdr.hdr_len)


@pytest.mark.parametrize("version", [4, 6])
def test_tso_with_tcp_and_ip_options(version: int) -> None:
    opts = bytes([1, 1, 8, 10]) + struct.pack("!II", 123456, 654321)  # NOP NOP timestamps
    ip_opts = bytes([1, 1, 1, 0]) if version == 4 else b""
    payload = pattern(20000)
    hdr, pkt = tcp_super(version, payload, 1356, opts=opts, ip_opts=ip_opts)
    for vec in (True, False):
        segs = [bytes(s) for s in segment(hdr, pkt, vectorise=vec)]
        check_tcp_segments(segs, version, payload, 1356, 1000, ACK | PSH, hdr.hdr_len)
        assert all(s[hdr.csum_start + 20 : hdr.csum_start + 32] == opts for s in segs)


def test_kernel_hdr_len_is_not_trusted() -> None:
    payload = pattern(4000)
    hdr, pkt = tcp_super(4, payload, 1000)
    wrong = VirtioNetHdr(hdr.flags, hdr.gso_type, 1052, hdr.gso_size, 20, 16)
    segs = [bytes(s) for s in segment(wrong, pkt)]
    check_tcp_segments(segs, 4, payload, 1000, 1000, ACK | PSH, 40)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("vectorise", [True, False])
def test_uso_segments_are_valid(version: int, vectorise: bool) -> None:
    payload = pattern(1200 * 10 + 77)
    hdr, pkt = udp_super(version, payload, 1200)
    segs = [bytes(s) for s in segment(hdr, pkt, vectorise=vectorise)]
    assert len(segs) == 11
    l3 = 20 if version == 4 else 40
    joined = b""
    for i, seg in enumerate(segs):
        verify_ip(seg)
        verify_l4(seg, l3, 17)
        assert struct.unpack_from("!H", seg, l3 + 4)[0] == len(seg) - l3
        assert seg[l3 : l3 + 4] == struct.pack("!HH", 5353, 9999)
        if version == 4:
            assert struct.unpack_from("!H", seg, 4)[0] == 0x1234 + i
        joined += seg[l3 + 8 :]
    assert joined == payload


@pytest.mark.parametrize("version", [4, 6])
def test_needs_csum_single_packet_is_completed(version: int) -> None:
    payload = pattern(333)
    uh = struct.pack("!HHHH", 1, 2, 8 + len(payload), 0)
    ih = ip_header(version, 8 + len(payload), 17)
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    partial = pseudo_sum(src, dst, 17, 8 + len(payload))
    pkt = ih + uh[:6] + struct.pack("!H", partial) + payload
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, len(ih), 6)
    (out,) = segment(hdr, pkt)
    verify_l4(bytes(out), len(ih), 17)
    plain = tcp_packet(version, b"xyz")
    assert segment(offload.NO_OFFLOAD, plain) == [plain]


def test_malformed_super_packets_raise() -> None:
    hdr, pkt = tcp_super(4, pattern(3000), 1000)
    with pytest.raises(MalformedPacket):
        segment(VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 0, 20, 16), pkt)
    with pytest.raises(MalformedPacket):
        segment(hdr, pkt[:30])
    with pytest.raises(MalformedPacket):
        segment(VirtioNetHdr(F_NEEDS_CSUM, 9, 40, 1000, 20, 16), pkt)
    with pytest.raises(MalformedPacket):
        segment(VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 1000, 60000, 16), pkt)
    with pytest.raises(MalformedPacket):
        segment(hdr, b"\x00" * 100)


# --------------------------------------------------------------------------- coalesce


def check_coalesced(item: tuple[bytes, list[offload.Buffer]], version: int, mss: int) -> bytes:
    """Validate one GSO item as the kernel would take it; return its TCP payload."""
    head, bufs = item
    vnet = VirtioNetHdr.parse(head)
    ip = head[10:]
    whole = ip + b"".join(bytes(b) for b in bufs)
    l3 = 20 if version == 4 else 40
    assert vnet.flags == F_NEEDS_CSUM
    assert vnet.gso_type == (GSO_TCPV4 if version == 4 else GSO_TCPV6)
    assert vnet.csum_start == l3
    assert vnet.csum_offset == 16
    assert vnet.hdr_len == len(ip)
    assert vnet.gso_size == mss
    verify_ip(whole)
    src, dst = (whole[12:16], whole[16:20]) if version == 4 else (whole[8:24], whole[24:40])
    partial = pseudo_sum(src, dst, 6, len(whole) - l3)
    assert struct.unpack_from("!H", whole, l3 + 16)[0] == partial
    return whole[vnet.hdr_len :]


@pytest.mark.parametrize("version", [4, 6])
def test_coalesce_of_segments_restores_the_stream(version: int) -> None:
    payload = pattern(40000)
    hdr, pkt = tcp_super(version, payload, 1368)
    segs = [bytes(s) for s in segment(hdr, pkt)]
    items = coalesce(segs)
    assert len(items) == 1
    assert check_coalesced(items[0], version, 1368) == payload
    # and segmenting the coalesced packet again gives byte-identical segments
    head, bufs = items[0]
    again = segment(VirtioNetHdr.parse(head), head[10:] + b"".join(bytes(b) for b in bufs))
    assert [bytes(s) for s in again] == segs


def test_coalesce_caps_at_64k_and_keeps_order() -> None:
    segs: list[bytes] = []
    seq = 5000
    for i in range(100):  # 100 x 1368 B > 64 KB
        segs.append(tcp_packet(4, pattern(1368), seq=seq, ip_id=i))
        seq += 1368
    items = coalesce(segs)
    assert len(items) == 3
    payload = b""
    for item in items:
        assert len(item[0]) == 10 + 40
        assert 40 + sum(len(b) for b in item[1]) <= 0xFFFF
        payload += check_coalesced(item, 4, 1368)
    assert payload == pattern(1368) * 100


def test_coalesce_leaves_other_packets_alone() -> None:
    a = [tcp_packet(4, pattern(1000), seq=1 + 1000 * i) for i in range(3)]
    syn = tcp_packet(4, b"", seq=0, flags=SYN)
    fin = tcp_packet(4, b"", seq=3001, flags=FIN | ACK)
    udp = ip_header(4, 8, 17) + struct.pack("!HHHH", 1, 2, 8, 0)
    gap = tcp_packet(4, pattern(1000), seq=9999)
    items = coalesce([syn, *a, udp, fin, gap])
    kinds = [VirtioNetHdr.parse(h).gso_type for h, _ in items]
    assert kinds == [GSO_NONE, GSO_TCPV4, GSO_NONE, GSO_NONE, GSO_NONE]
    assert items[0] == (ZERO_VNET_HDR, [syn]) or bytes(items[0][1][0]) == syn
    assert bytes(items[2][1][0]) == udp
    assert bytes(items[3][1][0]) == fin
    assert bytes(items[4][1][0]) == gap
    assert check_coalesced(items[1], 4, 1000) == pattern(1000) * 3


def test_coalesce_interleaved_flows_and_out_of_order() -> None:
    f1 = [tcp_packet(4, pattern(500), seq=100 + 500 * i) for i in range(4)]
    f2 = [tcp_packet(6, pattern(600), seq=7 + 600 * i) for i in range(4)]
    mixed = [f1[0], f2[0], f1[1], f2[1], f1[2], f2[2], f1[3], f2[3]]
    items = coalesce(mixed)
    assert len(items) == 2
    assert check_coalesced(items[0], 4, 500) == pattern(500) * 4
    assert check_coalesced(items[1], 6, 600) == pattern(600) * 4
    # an out-of-order segment starts a new run, and only the newest run of a flow grows,
    # so nothing is reordered within the flow
    items = coalesce([f1[0], f1[2], f1[1], f1[3]])
    seqs = [
        struct.unpack_from("!I", h[10:] if len(h) > 10 else bytes(b[0]), 24)[0] for h, b in items
    ]
    assert seqs == [100, 1100, 600, 1600]


def test_coalesce_short_segment_ends_run_and_psh_is_kept() -> None:
    segs = [tcp_packet(4, pattern(1000), seq=1 + 1000 * i) for i in range(3)]
    segs.append(tcp_packet(4, pattern(10), seq=3001, flags=ACK | PSH))
    segs.append(tcp_packet(4, pattern(1000), seq=3011))
    items = coalesce(segs)
    assert len(items) == 2
    head = items[0][0]
    assert head[10 + 33] & PSH
    assert check_coalesced(items[0], 4, 1000) == pattern(1000) * 3 + pattern(10)


@settings(max_examples=60, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    size=st.integers(min_value=1, max_value=60000),
    mss=st.integers(min_value=200, max_value=1460),
    seq=st.integers(min_value=0, max_value=0xFFFFFFFF),
)
def test_segment_then_coalesce_property(version: int, size: int, mss: int, seq: int) -> None:
    payload = pattern(size)
    hdr, pkt = tcp_super(version, payload, mss, seq=seq)
    vec = [bytes(s) for s in segment(hdr, pkt, vectorise=True)]
    pure = [bytes(s) for s in segment(hdr, pkt, vectorise=False)]
    assert vec == pure
    check_tcp_segments(vec, version, payload, mss, seq, ACK | PSH, hdr.hdr_len)
    items = coalesce(vec)
    out = b""
    for head, bufs in items:
        if VirtioNetHdr.parse(head).gso_type == GSO_NONE:
            (only,) = bufs
            hl = (20 if version == 4 else 40) + 20
            out += bytes(only)[hl:]
        else:
            out += check_coalesced((head, bufs), version, mss)
    assert out == payload


# --------------------------------------------------------------------------- UDP (USO)


def udp_packet(
    version: int,
    payload: bytes,
    ip_id: int = 0x1234,
    ports: tuple[int, int] = (5353, 9999),
    ttl: int = 64,
    frag: int = 0x4000,
) -> bytes:
    """A complete UDP/IP packet with valid checksums."""
    ulen = 8 + len(payload)
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    uh = struct.pack("!HHHH", *ports, ulen, 0)
    csum = ~ones_sum(uh + payload, pseudo_sum(src, dst, 17, ulen)) & 0xFFFF or 0xFFFF
    uh = uh[:6] + struct.pack("!H", csum)
    if version == 4:
        ih = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ip_id, frag, ttl, 17, 0, SRC4, DST4)
        ih = ih[:10] + struct.pack("!H", ~ones_sum(ih) & 0xFFFF) + ih[12:]
    else:
        ih = struct.pack("!IHBB16s16s", 0x60000000, ulen, 17, ttl, SRC6, DST6)
    return ih + uh + payload


def check_uso(item: tuple[bytes, list[offload.Buffer]], version: int, mss: int) -> bytes:
    """Validate one UDP_L4 GSO item as the kernel would take it; return the joined payloads."""
    head, bufs = item
    vnet = VirtioNetHdr.parse(head)
    l3 = 20 if version == 4 else 40
    whole = head[10:] + b"".join(bytes(b) for b in bufs)
    assert vnet == VirtioNetHdr(F_NEEDS_CSUM, GSO_UDP_L4, l3 + 8, mss, l3, 6)
    verify_ip(whole)
    ulen = len(whole) - l3
    assert struct.unpack_from("!H", whole, l3 + 4)[0] == ulen
    src, dst = (whole[12:16], whole[16:20]) if version == 4 else (whole[8:24], whole[24:40])
    assert struct.unpack_from("!H", whole, l3 + 6)[0] == pseudo_sum(src, dst, 17, ulen)
    return whole[l3 + 8 :]


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [64, 1392])
def test_udp_datagrams_of_one_flow_become_one_uso_packet(version: int, size: int) -> None:
    dgrams = [
        udp_packet(version, pattern(size)[::-1] + bytes([i]), ip_id=0x1234 + i) for i in range(20)
    ]
    items = coalesce(dgrams, udp=True)
    assert len(items) == 1
    payload = check_uso(items[0], version, size + 1)
    assert payload == b"".join(d[(20 if version == 4 else 40) + 8 :] for d in dgrams)
    # the kernel's cut (our own segment() stands in for it) gives back the very datagrams
    head, bufs = items[0]
    again = segment(VirtioNetHdr.parse(head), head[10:] + b"".join(bytes(b) for b in bufs))
    assert [bytes(s) for s in again] == dgrams


def test_udp_coalescing_is_off_unless_asked() -> None:
    dgrams = [udp_packet(4, pattern(100)) for _ in range(5)]
    items = coalesce(dgrams)
    assert [bytes(b[0]) for _, b in items] == dgrams
    assert all(h == ZERO_VNET_HDR for h, _ in items)


def test_udp_short_datagram_ends_a_run_and_runs_cap_at_64() -> None:
    flow = [udp_packet(4, pattern(500)) for _ in range(3)] + [udp_packet(4, pattern(20))]
    flow += [udp_packet(4, pattern(500)) for _ in range(2)]
    items = coalesce(flow, udp=True)
    assert len(items) == 2
    assert check_uso(items[0], 4, 500) == pattern(500) * 3 + pattern(20)
    assert check_uso(items[1], 4, 500) == pattern(500) * 2
    many = [udp_packet(6, pattern(64)) for _ in range(150)]
    items = coalesce(many, udp=True)
    assert [len(b) for _, b in items] == [64, 64, 22]
    # a larger datagram does not join a run (gso_size is the first datagram's size)
    items = coalesce([udp_packet(4, pattern(100)), udp_packet(4, pattern(200))], udp=True)
    assert len(items) == 2
    assert all(h == ZERO_VNET_HDR for h, _ in items)


def test_udp_flows_interleave_and_odd_packets_stay_alone_in_order() -> None:
    a = [udp_packet(4, pattern(300), ports=(1, 2)) for _ in range(4)]
    b = [udp_packet(4, pattern(300), ports=(3, 4)) for _ in range(4)]
    mixed = [x for pair in zip(a, b, strict=True) for x in pair]
    items = coalesce(mixed, udp=True)
    assert len(items) == 2
    assert check_uso(items[0], 4, 300) == pattern(300) * 4
    assert items[0][0][10 + 20 : 10 + 24] == struct.pack("!HH", 1, 2)
    assert items[1][0][10 + 20 : 10 + 24] == struct.pack("!HH", 3, 4)
    # a fragment, another TTL, or a bad UDP length: each alone, and the run of its flow ends
    # there, so that no later datagram of the flow overtakes it
    frag = udp_packet(4, pattern(300), ports=(1, 2), frag=0x2000)
    other_ttl = udp_packet(4, pattern(300), ports=(1, 2), ttl=9)
    bad = bytearray(udp_packet(4, pattern(300), ports=(1, 2)))
    bad[25] ^= 1
    for odd in (frag, other_ttl, bytes(bad)):
        seq = [a[0], a[1], odd, a[2], a[3]]
        items = coalesce(seq, udp=True)
        flat = []
        for head, bufs in items:
            if head == ZERO_VNET_HDR:
                flat.append(bytes(bufs[0]))
            else:
                flat.append(check_uso((head, bufs), 4, 300))
        assert flat == [pattern(300) * 2, odd, pattern(300) * 2]


def test_udp_and_tcp_in_one_batch() -> None:
    tcp = [tcp_packet(4, pattern(1000), seq=1 + 1000 * i) for i in range(3)]
    udp = [udp_packet(4, pattern(1000)) for _ in range(3)]
    items = coalesce([tcp[0], udp[0], tcp[1], udp[1], tcp[2], udp[2]], udp=True)
    kinds = [VirtioNetHdr.parse(h).gso_type for h, _ in items]
    assert kinds == [GSO_TCPV4, GSO_UDP_L4]
    assert check_coalesced(items[0], 4, 1000) == pattern(1000) * 3
    assert check_uso(items[1], 4, 1000) == pattern(1000) * 3


@settings(max_examples=60, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    sizes=st.lists(st.integers(min_value=0, max_value=1400), min_size=1, max_size=80),
)
def test_udp_coalesce_keeps_every_datagram_in_order(version: int, sizes: list[int]) -> None:
    # consecutive IP ids, as a sender makes them and as segmentation restores them
    dgrams = [udp_packet(version, pattern(n)[::-1], ip_id=i) for i, n in enumerate(sizes)]
    out: list[bytes] = []
    for head, bufs in coalesce(dgrams, udp=True):
        if head == ZERO_VNET_HDR:
            out.append(bytes(bufs[0]))
            continue
        vnet = VirtioNetHdr.parse(head)
        check_uso((head, bufs), version, vnet.gso_size)
        segs = segment(vnet, head[10:] + b"".join(bytes(b) for b in bufs))
        out.extend(bytes(s) for s in segs)
    assert out == dgrams


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [0, 1, 2, 333, 1023, 1024, 1025, 1392, 4001])
def test_complete_checksum_small_and_large(version: int, size: int) -> None:
    payload = pattern(size)
    ulen = 8 + size
    ih = ip_header(version, ulen, 17)
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    partial = pseudo_sum(src, dst, 17, ulen)
    pkt = ih + struct.pack("!HHHH", 1, 2, ulen, partial) + payload
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, len(ih), 6)
    out = offload.complete_checksum(hdr, memoryview(pkt))
    verify_l4(bytes(out), len(ih), 17)
    assert out[: len(ih) + 6] == pkt[: len(ih) + 6]
    assert out[len(ih) + 8 :] == payload


def test_complete_checksum_zero_result_is_ffff_for_udp_only() -> None:
    # a UDP header whose checksum comes out as 0 must be sent as 0xFFFF (0 means "none");
    # for TCP 0 stays 0. Data whose sum is 0xFFFF yields a computed checksum of 0.
    body = struct.pack("!HHHH", 0xFFFF, 0, 0, 0)  # ports + length + field: sum 0xFFFF
    pkt = bytes(20) + body
    out_udp = offload.complete_checksum(VirtioNetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 6), pkt)
    assert out_udp[26:28] == b"\xff\xff"
    tcp = bytes(20) + struct.pack("!HH", 0xFFFF, 0) + bytes(16)
    out_tcp = offload.complete_checksum(VirtioNetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 16), tcp)
    assert out_tcp[36:38] == b"\0\0"
    with pytest.raises(MalformedPacket):
        offload.complete_checksum(VirtioNetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 16), bytes(30))
