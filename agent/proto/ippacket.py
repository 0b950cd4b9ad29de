"""Peek at IPv4/IPv6 headers: version, addresses and the real length of a packet.

    IPv4: byte 0 = version<<4 | IHL, bytes 2-3 total length, 12-15 source, 16-19 destination
    IPv6: byte 0 = version<<4 | ..., bytes 4-5 payload length, 8-23 source, 24-39 destination

Decrypted WireGuard payloads carry zero padding, so the receiver trims to `packet_length`.
"""

from __future__ import annotations

from agent.proto.errors import MalformedPacket

__all__ = ["destination", "source", "packet_length"]

Buffer = bytes | bytearray | memoryview


def destination(packet: Buffer) -> bytes:
    """Raw destination address bytes (4 or 16); MalformedPacket if not a complete IP header."""
    v = packet[0] >> 4 if packet else 0
    if v == 4 and len(packet) >= 20:
        return bytes(packet[16:20])
    if v == 6 and len(packet) >= 40:
        return bytes(packet[24:40])
    raise MalformedPacket("not an IPv4/IPv6 packet")


def source(packet: Buffer) -> bytes:
    """Raw source address bytes (4 or 16); MalformedPacket if not a complete IP header."""
    v = packet[0] >> 4 if packet else 0
    if v == 4 and len(packet) >= 20:
        return bytes(packet[12:16])
    if v == 6 and len(packet) >= 40:
        return bytes(packet[8:24])
    raise MalformedPacket("not an IPv4/IPv6 packet")


def packet_length(packet: Buffer) -> int:
    """Length the IP header claims; MalformedPacket if it exceeds the buffer or is too short."""
    v = packet[0] >> 4 if packet else 0
    if v == 4 and len(packet) >= 20:
        n = int.from_bytes(packet[2:4], "big")
        if 20 <= n <= len(packet):
            return n
    elif v == 6 and len(packet) >= 40:
        n = 40 + int.from_bytes(packet[4:6], "big")
        if n <= len(packet):
            return n
    raise MalformedPacket("bad IP length")
