"""Inputs that broke agent/proto/offload: found by the fuzzers (fuzz/) or by comparing it with its C
twin (tests/native/)."""

from __future__ import annotations

import struct

import pytest

from agent.proto.errors import MalformedPacket
from agent.proto.offload import F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, VirtioNetHdr, coalesce, segment


@pytest.mark.parametrize("vectorise", [False, True])
def test_odd_transport_offset_is_malformed(vectorise: bool) -> None:
    # csum_start 21: numpy's 16-bit view of the rows raised ValueError (the pure path went on)
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1041, 0, 0, 64, 6, 0, bytes(4), bytes(4))
    packet = ip + b"\0" + tcp + bytes(1000)
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 41, 100, 21, 16)
    with pytest.raises(MalformedPacket, match="odd offset"):
        segment(hdr, packet, vectorise=vectorise)


@pytest.mark.parametrize("vectorise", [False, True])
def test_super_packet_longer_than_64k_is_malformed(vectorise: bool) -> None:
    # Found comparing with the C twin: 40 + 65500 bytes of IPv6 cut at an MSS of 65500 made a
    # segment whose payload length passed 16 bits: struct.error on the pure path, a silently
    # wrapped length field on the numpy path. No TUN read is longer than 65535 bytes.
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!IHBB16s16s", 6 << 28, 20 + 65500, 6, 64, bytes(16), bytes(16))
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV6, 60, 65500, 40, 16)
    with pytest.raises(MalformedPacket, match="longer than 65535"):
        segment(hdr, ip + tcp + bytes(65500), vectorise=vectorise)
    assert len(segment(hdr, ip + tcp + bytes(65535 - 60), vectorise=vectorise)) == 1


def test_coalesced_first_segment_leaves_its_padding_out() -> None:
    # Found comparing with the C twin: the first segment of a merged run contributed all its
    # bytes after the headers, padding past its IP length included, into the middle of the
    # stream (the others were cut at their IP length).
    def seg(seq: int, payload: bytes) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", 1, 2, seq, 1, 5 << 4, 0x10, 65535, 0, 0)
        total = 40 + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0, bytes(4), bytes(4))
        return ip + tcp + payload

    packets = [seg(1, b"a" * 100) + b"\xee" * 12, seg(101, b"b" * 100)]
    ((_head, bufs),) = coalesce(packets)
    assert b"".join(bytes(b) for b in bufs) == b"a" * 100 + b"b" * 100
