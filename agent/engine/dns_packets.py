"""IP/UDP framing for the DNS service at 100.100.100.100 and [fd7a:115c:a1e0::53], port 53.

The data plane reads a packet from the TUN, sees (`is_service_packet`) that it is UDP to the
service address, and hands it here instead of to WireGuard: `parse_udp` gives the datagram,
the responder gives the answer, `reply_packet` wraps it for writing back to the TUN with the
addresses and ports swapped and every checksum computed (offload's one's-complement sums).

    IPv4 (20 B, no options on output)          IPv6 (40 B, no extension headers)
     0 ver/ihl tos totlen  id  flags/frag       0 ver/tc/flow  4 paylen  6 nh=17  7 hops
     8 ttl  proto=17  csum  12 src  16 dst       8 src (16 B)  24 dst (16 B)
    UDP (8 B): sport dport length checksum (pseudo-header: src dst 0 17 length)

Input checksums are not verified: the packet comes from the local kernel through the TUN, and
with offloads on its UDP checksum may legitimately be left partial (CHECKSUM_PARTIAL).
Fragments, IPv4 options we cannot skip and IPv6 extension headers are dropped: a DNS query
never needs them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from agent.proto.dns.drops import DnsDrop
from agent.proto.dns.names import SERVICE_V4, SERVICE_V6, IPAddress
from agent.proto.errors import MalformedPacket
from agent.proto.offload import Buffer, internet_sum

__all__ = [
    "DNS_PORT",
    "BadServicePacket",
    "UdpDatagram",
    "is_service_packet",
    "parse_udp",
    "build_udp",
    "reply_packet",
]

DNS_PORT: Final = 53
PROTO_UDP: Final = 17
TTL: Final = 64
IPV4_HDR: Final = 20
IPV6_HDR: Final = 40
UDP_HDR: Final = 8
_SERVICE_V4: Final = SERVICE_V4.packed
_SERVICE_V6: Final = SERVICE_V6.packed
_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_DF: Final = 0x4000
_MF_OFFSET: Final = 0x3FFF


class BadServicePacket(MalformedPacket):
    """A packet to the service that cannot be answered; `drop` says why."""

    def __init__(self, drop: DnsDrop, detail: str) -> None:
        super().__init__(f"{drop}: {detail}")
        self.drop = drop


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    payload: bytes


def is_service_packet(packet: Buffer) -> bool:
    """Cheap test for the data plane: IP to the service address, UDP, port 53 (if visible)."""
    n = len(packet)
    if n >= IPV4_HDR and packet[0] >> 4 == 4:
        if packet[9] != PROTO_UDP or bytes(packet[16:20]) != _SERVICE_V4:
            return False
        ihl = (packet[0] & 0x0F) * 4
        return n < ihl + 4 or packet[ihl + 2 : ihl + 4] == b"\x00\x35"
    if n >= IPV6_HDR + 4 and packet[0] >> 4 == 6:
        return (
            packet[6] == PROTO_UDP
            and bytes(packet[24:40]) == _SERVICE_V6
            and packet[42:44] == b"\x00\x35"
        )
    return False


def _udp(segment: bytes, src: IPAddress, dst: IPAddress) -> UdpDatagram:
    if len(segment) < UDP_HDR:
        raise BadServicePacket(DnsDrop.MALFORMED_PACKET, "short UDP header")
    sport, dport, length, _ = _UDP.unpack_from(segment)
    if length < UDP_HDR or length > len(segment):
        raise BadServicePacket(DnsDrop.MALFORMED_PACKET, f"UDP length {length}")
    if dport != DNS_PORT or sport == 0:
        raise BadServicePacket(DnsDrop.NOT_DNS_PACKET, f"UDP port {sport}->{dport}")
    return UdpDatagram(src, sport, dst, dport, segment[UDP_HDR:length])


def parse_udp(packet: Buffer) -> UdpDatagram:
    """The UDP datagram in an IPv4 or IPv6 packet to the service; BadServicePacket otherwise."""
    data = bytes(packet)
    if not data:
        raise BadServicePacket(DnsDrop.MALFORMED_PACKET, "empty packet")
    version = data[0] >> 4
    if version == 4:
        if len(data) < IPV4_HDR:
            raise BadServicePacket(DnsDrop.MALFORMED_PACKET, "short IPv4 header")
        vihl, _, total, _, frag, _, proto, _, src, dst = _V4.unpack_from(data)
        ihl = (vihl & 0x0F) * 4
        if ihl < IPV4_HDR or total < ihl or total > len(data):
            raise BadServicePacket(DnsDrop.MALFORMED_PACKET, f"IPv4 ihl {ihl} total {total}")
        if frag & _MF_OFFSET:
            raise BadServicePacket(DnsDrop.FRAGMENT, "IPv4 fragment")
        if proto != PROTO_UDP or dst != _SERVICE_V4:
            raise BadServicePacket(DnsDrop.NOT_DNS_PACKET, f"IPv4 proto {proto}")
        return _udp(data[ihl:total], ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst))
    if version == 6:
        if len(data) < IPV6_HDR:
            raise BadServicePacket(DnsDrop.MALFORMED_PACKET, "short IPv6 header")
        _, paylen, nh, _, src, dst = _V6.unpack_from(data)
        if IPV6_HDR + paylen > len(data):
            raise BadServicePacket(DnsDrop.MALFORMED_PACKET, f"IPv6 payload length {paylen}")
        if nh == 44:
            raise BadServicePacket(DnsDrop.FRAGMENT, "IPv6 fragment header")
        if nh != PROTO_UDP or dst != _SERVICE_V6:
            raise BadServicePacket(DnsDrop.NOT_DNS_PACKET, f"IPv6 next header {nh}")
        return _udp(
            data[IPV6_HDR : IPV6_HDR + paylen],
            ipaddress.IPv6Address(src),
            ipaddress.IPv6Address(dst),
        )
    raise BadServicePacket(DnsDrop.MALFORMED_PACKET, f"IP version {version}")


def _checksum(data: Buffer, initial: int = 0) -> int:
    return 0xFFFF ^ internet_sum(data, initial)


def build_udp(src: IPAddress, sport: int, dst: IPAddress, dport: int, payload: bytes) -> bytes:
    """A complete IPv4 or IPv6 packet carrying one UDP datagram, checksums filled in."""
    if src.version != dst.version:
        raise ValueError(f"address families differ: {src} -> {dst}")
    length = UDP_HDR + len(payload)
    limit = 0xFFFF - (IPV4_HDR if src.version == 4 else 0)
    if length > limit:
        raise ValueError(f"UDP payload of {len(payload)} bytes does not fit one packet")
    src_b, dst_b = src.packed, dst.packed
    pseudo = internet_sum(src_b + dst_b + struct.pack("!HH", PROTO_UDP, length))
    udp = _UDP.pack(sport, dport, length, 0) + payload
    csum = _checksum(udp, pseudo) or 0xFFFF  # 0 means "no checksum" in UDP: send all ones
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if src.version == 4:
        header = _V4.pack(0x45, 0, IPV4_HDR + length, 0, _DF, TTL, PROTO_UDP, 0, src_b, dst_b)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + udp
    return _V6.pack(6 << 28, length, PROTO_UDP, TTL, src_b, dst_b) + udp


def reply_packet(query: UdpDatagram, payload: bytes) -> bytes:
    """`payload` sent back from the service address and port to the querying socket."""
    return build_udp(query.dst, query.dport, query.src, query.sport, payload)
