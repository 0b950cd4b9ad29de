"""Hand-built IPv4/IPv6 packets for the filter tests (checksums are not checked, so zero)."""

from __future__ import annotations

import struct
from ipaddress import ip_address

TCP, UDP, ICMP, ICMPV6, SCTP, GRE = 6, 17, 1, 58, 132, 47
SYN, ACK, SYN_ACK = 0x02, 0x10, 0x12


def ip(src: str, dst: str, protocol: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 packet (by the address family) carrying `payload`."""
    s, d = ip_address(src), ip_address(dst)
    if s.version == 4:
        header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 1, 0, 64, protocol, 0)
        return header + s.packed + d.packed + payload
    header = struct.pack("!IHBB", 6 << 28, len(payload), protocol, 64)
    return header + s.packed + d.packed + payload


def tcp(src: str, sport: int, dst: str, dport: int, flags: int = SYN) -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    return ip(src, dst, TCP, segment)


def udp(src: str, sport: int, dst: str, dport: int, data: bytes = b"x" * 16) -> bytes:
    return ip(src, dst, UDP, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def sctp(src: str, sport: int, dst: str, dport: int) -> bytes:
    return ip(src, dst, SCTP, struct.pack("!HHII", sport, dport, 0, 0))


def icmp(src: str, dst: str, kind: int, ident: int = 7, code: int = 0) -> bytes:
    protocol = ICMP if ip_address(src).version == 4 else ICMPV6
    return ip(src, dst, protocol, struct.pack("!BBHHH", kind, code, 0, ident, 1) + b"ping")


def echo_request(src: str, dst: str, ident: int = 7) -> bytes:
    return icmp(src, dst, 8 if ip_address(src).version == 4 else 128, ident)


def echo_reply(src: str, dst: str, ident: int = 7) -> bytes:
    return icmp(src, dst, 0 if ip_address(src).version == 4 else 129, ident)


def fragment4(src: str, dst: str, protocol: int, offset_units: int, data: bytes) -> bytes:
    """A non-first IPv4 fragment (offset in 8-byte units): no transport header."""
    packet = bytearray(ip(src, dst, protocol, data))
    packet[6:8] = struct.pack("!H", offset_units & 0x1FFF)
    return bytes(packet)


def ipv6_with_extensions(src: str, dst: str, extensions: list[tuple[int, bytes]], last: int,
                         payload: bytes) -> bytes:  # fmt: skip
    """IPv6 with extension headers: each (type, body) becomes a header whose next is the next."""
    types = [t for t, _ in extensions] + [last]
    chain = b""
    for i, (_, body) in enumerate(extensions):
        chain += bytes([types[i + 1]]) + body
    packet = ip(src, dst, types[0], chain + payload)
    return packet
