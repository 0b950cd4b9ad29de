"""TCP segments inside IPv4 and IPv6 packets: parsed with their checksum checked, and built.

The wire codec of the DNS service's TCP responder (engine/dns_tcp.py), which answers TCP
packets read from the TUN without a kernel socket.

    IPv4 (20 B + options; no fragments)        IPv6 (40 B; next header 6, no extension headers)
     0 ver/ihl tos totlen  id  flags/frag        0 ver/tc/flow  4 paylen  6 nh=6  7 hops
     8 ttl  proto=6  csum  12 src  16 dst        8 src (16 B)  24 dst (16 B)
    TCP (20 B + options)
     0 sport  2 dport  4 seq  8 ack  12 data offset (4 bits) / flags  14 window
    16 checksum (pseudo-header: src dst 0 6 length)  18 urgent pointer  20 options
    options: 0 end, 1 no-op, 2 MSS (length 4); any other kind has a length byte

Input checksums are verified: the data plane hands over single packets whose checksum it has
already finished when the kernel left it partial (offload), so a wrong sum is a bad packet.
Only the MSS option is read; window scaling, SACK and timestamps are never offered, so a peer
does not use them. Output carries only MSS (on SYN-ACK), and no IP options.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from agent.proto.errors import MalformedPacket
from agent.proto.offload import Buffer, internet_sum

__all__ = [
    "FIN",
    "SYN",
    "RST",
    "PSH",
    "ACK",
    "PROTO_TCP",
    "IPAddress",
    "TcpDrop",
    "BadSegment",
    "Segment",
    "parse_segment",
    "build_segment",
    "header_size",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
PROTO_TCP: Final = 6
TTL: Final = 64
IPV4_HDR: Final = 20
IPV6_HDR: Final = 40
TCP_HDR: Final = 20
_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_DF: Final = 0x4000
_MF_OFFSET: Final = 0x3FFF
_OPT_END: Final = 0
_OPT_NOP: Final = 1
_OPT_MSS: Final = 2


class TcpDrop(StrEnum):
    """Why a packet on the TCP path was not looked at further; counters use these names."""

    MALFORMED = "malformed"  # bad IP or TCP header, lengths or version
    BAD_CHECKSUM = "bad_checksum"  # the TCP checksum does not verify
    FRAGMENT = "fragment"  # an IP fragment: never reassembled here
    NOT_TCP = "not_tcp"  # another protocol, or an IPv6 extension header before TCP


class BadSegment(MalformedPacket):
    """A packet that is not one well-formed TCP segment; `drop` says why."""

    def __init__(self, drop: TcpDrop, detail: str) -> None:
        super().__init__(f"{drop}: {detail}")
        self.drop = drop


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment and the addresses it travelled between."""

    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    seq: int
    ack: int
    flags: int
    window: int  # as sent: nobody here negotiates window scaling
    mss: int | None  # the MSS option (SYN segments carry it), None when absent
    payload: bytes

    @property
    def length(self) -> int:
        """The sequence space the segment takes: its data, plus one each for SYN and FIN."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)


def header_size(version: int) -> int:
    """IP and TCP header bytes of the segments `build_segment` makes (no options)."""
    return (IPV4_HDR if version == 4 else IPV6_HDR) + TCP_HDR


def _mss_option(options: bytes) -> int | None:
    """The MSS option's value; malformed options end the scan (as a kernel ignores them)."""
    i, n = 0, len(options)
    while i < n:
        kind = options[i]
        if kind == _OPT_END:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= n or options[i + 1] < 2 or i + options[i + 1] > n:
            break
        size = options[i + 1]
        if kind == _OPT_MSS and size == 4:
            return int.from_bytes(options[i + 2 : i + 4], "big")
        i += size
    return None


def _tcp(segment: bytes, src: IPAddress, dst: IPAddress) -> Segment:
    n = len(segment)
    if n < TCP_HDR:
        raise BadSegment(TcpDrop.MALFORMED, f"short TCP header ({n} bytes)")
    sport, dport, seq, ack, offset, flags, window, _, _ = _TCP.unpack_from(segment)
    hlen = (offset >> 4) * 4
    if hlen < TCP_HDR or hlen > n:
        raise BadSegment(TcpDrop.MALFORMED, f"TCP data offset {hlen} in {n} bytes")
    pseudo = internet_sum(src.packed + dst.packed + struct.pack("!HH", PROTO_TCP, n))
    if internet_sum(segment, pseudo) != 0xFFFF:
        raise BadSegment(TcpDrop.BAD_CHECKSUM, "TCP checksum")
    mss = _mss_option(segment[TCP_HDR:hlen]) if hlen > TCP_HDR else None
    return Segment(src, sport, dst, dport, seq, ack, flags, window, mss, segment[hlen:])


def parse_segment(packet: Buffer) -> Segment:
    """The TCP segment of an IPv4 or IPv6 packet; BadSegment when there is none to use."""
    data = bytes(packet)
    if not data:
        raise BadSegment(TcpDrop.MALFORMED, "empty packet")
    version = data[0] >> 4
    if version == 4:
        if len(data) < IPV4_HDR:
            raise BadSegment(TcpDrop.MALFORMED, "short IPv4 header")
        vihl, _, total, _, frag, _, proto, _, src, dst = _V4.unpack_from(data)
        ihl = (vihl & 0x0F) * 4
        if ihl < IPV4_HDR or total < ihl or total > len(data):
            raise BadSegment(TcpDrop.MALFORMED, f"IPv4 ihl {ihl} total {total}")
        if frag & _MF_OFFSET:
            raise BadSegment(TcpDrop.FRAGMENT, "IPv4 fragment")
        if proto != PROTO_TCP:
            raise BadSegment(TcpDrop.NOT_TCP, f"IPv4 protocol {proto}")
        return _tcp(data[ihl:total], ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst))
    if version == 6:
        if len(data) < IPV6_HDR:
            raise BadSegment(TcpDrop.MALFORMED, "short IPv6 header")
        _, paylen, nh, _, src, dst = _V6.unpack_from(data)
        if IPV6_HDR + paylen > len(data):
            raise BadSegment(TcpDrop.MALFORMED, f"IPv6 payload length {paylen}")
        if nh == 44:
            raise BadSegment(TcpDrop.FRAGMENT, "IPv6 fragment header")
        if nh != PROTO_TCP:
            raise BadSegment(TcpDrop.NOT_TCP, f"IPv6 next header {nh}")
        return _tcp(
            data[IPV6_HDR : IPV6_HDR + paylen],
            ipaddress.IPv6Address(src),
            ipaddress.IPv6Address(dst),
        )
    raise BadSegment(TcpDrop.MALFORMED, f"IP version {version}")


def build_segment(
    src: IPAddress,
    sport: int,
    dst: IPAddress,
    dport: int,
    *,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes = b"",
    mss: int | None = None,
) -> bytes:
    """A complete IPv4 or IPv6 packet carrying one TCP segment, checksums filled in."""
    if src.version != dst.version:
        raise ValueError(f"address families differ: {src} -> {dst}")
    options = struct.pack("!BBH", _OPT_MSS, 4, mss) if mss is not None else b""
    hlen = TCP_HDR + len(options)
    length = hlen + len(payload)
    if length > 0xFFFF - (IPV4_HDR if src.version == 4 else 0):
        raise ValueError(f"a TCP payload of {len(payload)} bytes does not fit one packet")
    src_b, dst_b = src.packed, dst.packed
    header = _TCP.pack(sport, dport, seq, ack, (hlen // 4) << 4, flags, window, 0, 0)
    tcp = header + options + payload
    pseudo = internet_sum(src_b + dst_b + struct.pack("!HH", PROTO_TCP, length))
    csum = 0xFFFF ^ internet_sum(tcp, pseudo)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    if src.version == 4:
        ip = _V4.pack(0x45, 0, IPV4_HDR + length, 0, _DF, TTL, PROTO_TCP, 0, src_b, dst_b)
        ip = ip[:10] + struct.pack("!H", 0xFFFF ^ internet_sum(ip)) + ip[12:]
        return ip + tcp
    return _V6.pack(6 << 28, length, PROTO_TCP, TTL, src_b, dst_b) + tcp
