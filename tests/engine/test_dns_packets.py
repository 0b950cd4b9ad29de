"""IP/UDP framing of the DNS service: parse, build, round trip, checksums, hostile packets."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine.dns_packets import (
    BadServicePacket,
    build_udp,
    is_service_packet,
    parse_udp,
    reply_packet,
)
from agent.proto.dns.drops import DnsDrop
from agent.proto.dns.names import SERVICE_V4, SERVICE_V6

CLIENT4 = ipaddress.IPv4Address("100.64.0.7")
CLIENT6 = ipaddress.IPv6Address("fd7a:115c:a1e0::7")


def ones_sum(data: bytes) -> int:
    """RFC 1071 the slow way, independent of offload.internet_sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_checksum_ok(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        src, dst, udp = packet[12:16], packet[16:20], packet[ihl:]
    else:
        src, dst, udp = packet[8:24], packet[24:40], packet[40:]
    pseudo = src + dst + struct.pack("!HH", 17, len(udp))
    return ones_sum(pseudo + udp) == 0xFFFF


@pytest.mark.parametrize(("client", "service"), [(CLIENT4, SERVICE_V4), (CLIENT6, SERVICE_V6)])
def test_round_trip(client: ipaddress.IPv4Address, service: ipaddress.IPv4Address) -> None:
    query = build_udp(client, 40000, service, 53, b"hello dns")
    assert is_service_packet(query)
    assert udp_checksum_ok(query)
    if client.version == 4:
        assert ones_sum(query[:20]) == 0xFFFF  # IPv4 header checksum
        assert struct.unpack("!H", query[2:4])[0] == len(query)
        assert query[6] & 0x40  # DF
    else:
        assert struct.unpack("!H", query[4:6])[0] == len(query) - 40
    datagram = parse_udp(query)
    assert (datagram.src, datagram.sport, datagram.dst, datagram.dport) == (
        client,
        40000,
        service,
        53,
    )
    assert datagram.payload == b"hello dns"
    reply = reply_packet(datagram, b"answer!")
    assert udp_checksum_ok(reply)
    assert not is_service_packet(reply)
    assert reply[-7:] == b"answer!"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=1500), st.booleans(), st.integers(1, 65535))
def test_checksums_for_any_payload(payload: bytes, v6: bool, sport: int) -> None:
    client, service = (CLIENT6, SERVICE_V6) if v6 else (CLIENT4, SERVICE_V4)
    packet = build_udp(service, 53, client, sport, payload)
    assert udp_checksum_ok(packet)
    assert struct.unpack("!H", packet[(40 if v6 else 20) + 6 :][:2])[0] != 0


def test_ipv4_options_are_skipped() -> None:
    packet = bytearray(build_udp(CLIENT4, 1234, SERVICE_V4, 53, b"q"))
    with_options = bytes([0x46]) + packet[1:20] + b"\x01\x01\x01\x00" + packet[20:]
    with_options = with_options[:2] + struct.pack("!H", len(with_options)) + with_options[4:]
    assert parse_udp(with_options).payload == b"q"


@pytest.mark.parametrize(
    ("mangle", "drop"),
    [
        (lambda p: b"", DnsDrop.MALFORMED_PACKET),
        (lambda p: p[:10], DnsDrop.MALFORMED_PACKET),
        (lambda p: p[:24], DnsDrop.MALFORMED_PACKET),
        (lambda p: bytes([0x55]) + p[1:], DnsDrop.MALFORMED_PACKET),
        (lambda p: p[:2] + b"\xff\xff" + p[4:], DnsDrop.MALFORMED_PACKET),
        (lambda p: p[:6] + b"\x20\x00" + p[8:], DnsDrop.FRAGMENT),
        (lambda p: p[:9] + b"\x06" + p[10:], DnsDrop.NOT_DNS_PACKET),
        (lambda p: p[:22] + b"\x00\x36" + p[24:], DnsDrop.NOT_DNS_PACKET),
        (lambda p: p[:24] + b"\x00\x02" + p[26:], DnsDrop.MALFORMED_PACKET),
    ],
)
def test_bad_packets(mangle: object, drop: DnsDrop) -> None:
    packet = build_udp(CLIENT4, 1234, SERVICE_V4, 53, b"query")
    assert callable(mangle)
    with pytest.raises(BadServicePacket) as info:
        parse_udp(mangle(packet))
    assert info.value.drop is drop


def test_is_service_packet_filters() -> None:
    assert not is_service_packet(b"")
    assert not is_service_packet(
        build_udp(CLIENT4, 1, ipaddress.IPv4Address("100.64.0.8"), 53, b"")
    )
    assert not is_service_packet(build_udp(CLIENT4, 1, SERVICE_V4, 54, b""))
    assert not is_service_packet(build_udp(CLIENT6, 1, SERVICE_V6, 5353, b""))
    assert is_service_packet(memoryview(build_udp(CLIENT6, 1, SERVICE_V6, 53, b"")))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_parse_raises_only_typed(data: bytes) -> None:
    with contextlib.suppress(BadServicePacket):
        parse_udp(data)
    is_service_packet(data)
