"""Decode the header fields the packet filter decides on, from a raw IPv4/IPv6 packet.

    IPv4  0      1      2    3    4 .. 5  6 .. 7        8    9      10 .. 11  12 .. 15  16 .. 19
          ver|ihl tos   total len   id    flags|frag     ttl  proto  checksum  src       dst
    IPv6  0 .. 3                    4 .. 5       6       7      8 .. 23   24 .. 39
          ver|class|flow label      payload len  next    hops   src       dst
    then  TCP/UDP/SCTP: src port (2), dst port (2); TCP flags at offset 13 (SYN 0x02, ACK 0x10)
          ICMP/ICMPv6:  type (1), code (1), checksum (2), echo identifier (2)

IPv6 extension headers (hop-by-hop, routing, destination options, fragment, AH) are walked, at
most `_MAX_EXTENSIONS` of them. A fragment that is not the first carries no transport header;
it is reported as such (`fragment=True`) and the filter lets it follow its first fragment, as
Tailscale does. Anything truncated or inconsistent raises `MalformedPacket`; nothing else is
ever raised, whatever the bytes.

`flow_key` is the bytes the filter's cache is keyed by: source and destination address and the
two ports, sliced straight from the packet (12 bytes for IPv4, 36 for IPv6).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

__all__ = ["MalformedPacket", "Parsed", "parse", "ICMP_ERRORS", "PORTED"]

PORTED = frozenset({6, 17, 132})  # TCP, UDP, SCTP
ICMP_ERRORS = {  # by IP version: ICMP types that report an error about a packet we sent
    4: frozenset({3, 4, 11, 12}),  # unreachable, source quench, time exceeded, parameter problem
    6: frozenset({1, 2, 3, 4}),  # unreachable, packet too big, time exceeded, parameter problem
}
_EXTENSIONS = frozenset({0, 43, 44, 51, 60})
_MAX_EXTENSIONS = 8


class MalformedPacket(ValueError):
    """The bytes are not a well-formed IP packet (truncated, bad version or lengths)."""


class Parsed(NamedTuple):
    version: int
    protocol: int
    src: bytes  # 4 or 16 bytes
    dst: bytes
    src_port: int  # 0 unless TCP/UDP/SCTP
    dst_port: int
    tcp_flags: int  # 0 unless TCP
    icmp_type: int  # -1 unless ICMP (v4) or ICMPv6 (v6)
    icmp_id: int  # echo identifier, 0 unless an echo request or reply
    fragment: bool  # a non-first fragment: no transport header to look at
    flow_key: bytes | None  # the filter cache key, or None when the packet cannot be cached

    @property
    def src_address(self) -> IPv4Address | IPv6Address:
        return IPv4Address(self.src) if self.version == 4 else IPv6Address(self.src)

    @property
    def dst_address(self) -> IPv4Address | IPv6Address:
        return IPv4Address(self.dst) if self.version == 4 else IPv6Address(self.dst)

    @property
    def is_tcp_syn(self) -> bool:
        """A connection opener: SYN without ACK (a SYN-ACK answers a flow we opened)."""
        return self.protocol == 6 and self.tcp_flags & 0x12 == 0x02


_new = tuple.__new__  # builds a Parsed without NamedTuple's Python-level __new__


def parse(packet: bytes) -> Parsed:
    """Decode `packet`; raise `MalformedPacket` if it is not a well-formed IP packet."""
    if not packet:
        raise MalformedPacket("empty")
    version = packet[0] >> 4
    if version == 4:
        return _parse4(packet)
    if version == 6:
        return _parse6(packet)
    raise MalformedPacket(f"IP version {version}")


def _parse4(packet: bytes) -> Parsed:
    n = len(packet)
    ihl = (packet[0] & 0x0F) * 4
    if n < 20 or ihl < 20 or n < ihl:
        raise MalformedPacket("truncated IPv4 header")
    total = packet[2] << 8 | packet[3]
    if total < ihl or total > n:
        raise MalformedPacket("bad IPv4 total length")
    end = total  # ignore anything after the datagram (link padding)
    protocol = packet[9]
    src, dst = packet[12:16], packet[16:20]
    frag_offset = (packet[6] & 0x1F) << 8 | packet[7]
    if frag_offset:
        return _new(Parsed, (4, protocol, src, dst, 0, 0, 0, -1, 0, True, None))
    key = src + dst + packet[ihl : ihl + 4] if ihl == 20 else None
    return _transport(4, protocol, src, dst, packet, ihl, end, key, icmp=1)


def _parse6(packet: bytes) -> Parsed:
    n = len(packet)
    if n < 40:
        raise MalformedPacket("truncated IPv6 header")
    end = 40 + (packet[4] << 8 | packet[5])
    if end > n:
        raise MalformedPacket("bad IPv6 payload length")
    src, dst = packet[8:24], packet[24:40]
    protocol, offset = packet[6], 40
    direct = protocol not in _EXTENSIONS
    for _ in range(_MAX_EXTENSIONS):
        if protocol not in _EXTENSIONS:
            break
        if offset + 8 > end:
            raise MalformedPacket("truncated IPv6 extension header")
        following = packet[offset]
        if protocol == 44:  # fragment: fixed 8 bytes
            if (packet[offset + 2] << 8 | packet[offset + 3]) >> 3:
                return _new(Parsed, (6, following, src, dst, 0, 0, 0, -1, 0, True, None))
            size = 8
        elif protocol == 51:  # authentication header: length in 4-byte units, minus 2
            size = (packet[offset + 1] + 2) * 4
        else:
            size = (packet[offset + 1] + 1) * 8
        protocol, offset = following, offset + size
    else:
        if protocol in _EXTENSIONS:
            raise MalformedPacket("too many IPv6 extension headers")
    if offset > end:
        raise MalformedPacket("truncated IPv6 extension header")
    key = src + dst + packet[40:44] if direct else None
    return _transport(6, protocol, src, dst, packet, offset, end, key, icmp=58)


def _transport(
    version: int,
    protocol: int,
    src: bytes,
    dst: bytes,
    packet: bytes,
    offset: int,
    end: int,
    key: bytes | None,
    icmp: int,
) -> Parsed:
    if protocol in PORTED:
        need = 20 if protocol == 6 else 8 if protocol == 17 else 12
        if end - offset < need:
            raise MalformedPacket(f"truncated protocol {protocol} header")
        sport = packet[offset] << 8 | packet[offset + 1]
        dport = packet[offset + 2] << 8 | packet[offset + 3]
        flags = packet[offset + 13] if protocol == 6 else 0
        return _new(Parsed, (version, protocol, src, dst, sport, dport, flags, -1, 0, False, key))
    if protocol == icmp:
        if end - offset < 8:
            raise MalformedPacket("truncated ICMP header")
        kind = packet[offset]
        echo = (8, 0) if version == 4 else (128, 129)
        ident = packet[offset + 4] << 8 | packet[offset + 5] if kind in echo else 0
        return _new(Parsed, (version, protocol, src, dst, 0, 0, 0, kind, ident, False, None))
    return _new(Parsed, (version, protocol, src, dst, 0, 0, 0, -1, 0, False, None))
