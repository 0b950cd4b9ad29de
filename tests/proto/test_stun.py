"""Codec tests for agent.proto.stun: golden bytes, server and client rules (tailscale
net/stun/stun.go ParseBindingRequest and ParseResponse), classification (magicsock.go
packetLooksLike), round trips and hostile input.

The golden messages were built by hand from RFC 5389 (SOFTWARE "tailnode", FINGERPRINT,
XOR-MAPPED-ADDRESS) with the transaction ID below."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proto import stun
from agent.proto.errors import LocalProtocolError, MalformedPacket, RemoteProtocolError
from agent.proto.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)

# Transaction ID 0102…0c.
TXID = bytes.fromhex("0102030405060708090a0b0c")
REQUEST = bytes.fromhex(
    "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f"
)
RESPONSE_V4 = bytes.fromhex("0101000c2112a4420102030405060708090a0b0c00200008000183bbe112a645")
RESPONSE_V6 = bytes.fromhex(
    "010100182112a4420102030405060708090a0b0c00200014000283bb0113a9fa0102030405060708090a0b0b"
)
RESPONSE_MAPPED_V6 = bytes.fromhex(
    "010100182112a4420102030405060708090a0b0c00200014000283bb2112a442010203040506f8f7c90a090b"
)
PORT = 41641

txids = st.binary(min_size=12, max_size=12)
ports = st.integers(min_value=0, max_value=0xFFFF)
v4_hosts = st.ip_addresses(v=4).map(str)
v6_hosts = st.ip_addresses(v=6).map(str)


def canonical(host: str) -> str:
    """What parsing gives back for `host`: IPv4-mapped IPv6 un-mapped, text canonical."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def message(msg_type: int, txid: bytes, attrs: bytes) -> bytes:
    return struct.pack(">HH4s12s", msg_type, len(attrs), stun.MAGIC_COOKIE, txid) + attrs


def attr(attr_type: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return struct.pack(">HH", attr_type, len(value)) + value + bytes(pad)


def with_fingerprint(msg_type: int, txid: bytes, attrs: bytes) -> bytes:
    head = message(msg_type, txid, attrs + bytes(8))[: stun.HEADER_SIZE] + attrs
    crc = (zlib.crc32(head) ^ 0x5354554E) & 0xFFFFFFFF
    return head + struct.pack(">HHI", stun.ATTR_FINGERPRINT, 4, crc)


# --- golden bytes ---------------------------------------------------------------------------------


def test_binding_request_golden() -> None:
    assert stun.binding_request(TXID) == REQUEST
    assert len(REQUEST) == 40
    assert stun.BindingRequest(TXID).encode() == REQUEST


def test_parse_binding_request_golden() -> None:
    assert stun.parse_binding_request(REQUEST) == TXID
    assert stun.BindingRequest.parse(REQUEST) == stun.BindingRequest(TXID, b"tailnode")


@pytest.mark.parametrize(
    ("host", "wire"),
    [
        ("192.0.2.7", RESPONSE_V4),
        ("2001:db8::7", RESPONSE_V6),
        ("::ffff:192.0.2.7", RESPONSE_MAPPED_V6),
    ],
)
def test_binding_response_golden(host: str, wire: bytes) -> None:
    assert stun.binding_response(TXID, (host, PORT)) == wire


@pytest.mark.parametrize(
    ("wire", "host"),
    [(RESPONSE_V4, "192.0.2.7"), (RESPONSE_V6, "2001:db8::7"), (RESPONSE_MAPPED_V6, "192.0.2.7")],
)
def test_parse_response_golden(wire: bytes, host: str) -> None:
    # derper may report an IPv4 client as family 2, ::ffff:a.b.c.d; clients un-map.
    assert stun.parse_response(wire) == (TXID, (host, PORT))
    assert len(wire) == (32 if wire is RESPONSE_V4 else 44)


# --- server acceptance ----------------------------------------------------------------------------


def test_request_with_other_software_rejected_by_default() -> None:
    other = stun.binding_request(TXID, software=b"other")
    with pytest.raises(MalformedPacket):
        stun.parse_binding_request(other)
    assert stun.parse_binding_request(other, software=None) == TXID
    assert stun.BindingRequest.parse(other).software == b"other"


def test_request_without_software_rejected() -> None:
    with pytest.raises(MalformedPacket, match="SOFTWARE"):
        stun.parse_binding_request(with_fingerprint(0x0001, TXID, b""), software=None)


def test_request_with_bad_fingerprint_rejected() -> None:
    bad = REQUEST[:-1] + bytes([REQUEST[-1] ^ 1])
    with pytest.raises(MalformedPacket, match="FINGERPRINT"):
        stun.parse_binding_request(bad)


def test_request_fingerprint_must_be_last() -> None:
    good = with_fingerprint(0x0001, TXID, attr(stun.ATTR_SOFTWARE, b"tailnode"))
    assert stun.parse_binding_request(good) == TXID
    trailing = good + attr(0x8023, b"x")
    trailing = trailing[:2] + struct.pack(">H", len(trailing) - 20) + trailing[4:]
    with pytest.raises(MalformedPacket, match="FINGERPRINT"):
        stun.parse_binding_request(trailing)
    no_fp = message(0x0001, TXID, attr(stun.ATTR_SOFTWARE, b"tailnode"))
    with pytest.raises(MalformedPacket, match="FINGERPRINT"):
        stun.parse_binding_request(no_fp)


def test_request_software_odd_length_padded() -> None:
    wire = stun.binding_request(TXID, software=b"abc")
    assert len(wire) == 20 + 4 + 4 + 8
    assert stun.parse_binding_request(wire, software=b"abc") == TXID


def test_response_is_not_a_request() -> None:
    with pytest.raises(MalformedPacket):
        stun.parse_binding_request(RESPONSE_V4)


# --- client rules ---------------------------------------------------------------------------------


def test_response_mapped_address_fallback() -> None:
    value = struct.pack(">BBH", 0, 1, 1234) + bytes([198, 18, 0, 1])
    wire = message(0x0101, TXID, attr(stun.ATTR_MAPPED_ADDRESS, value))
    assert stun.parse_response(wire) == (TXID, ("198.18.0.1", 1234))


def test_response_xor_preferred_over_mapped() -> None:
    plain = attr(stun.ATTR_MAPPED_ADDRESS, struct.pack(">BBH", 0, 1, 1) + bytes(4))
    wire = message(0x0101, TXID, plain + RESPONSE_V4[20:])
    assert stun.parse_response(wire) == (TXID, ("192.0.2.7", PORT))


def test_response_alternate_xor_attribute() -> None:
    body = bytearray(RESPONSE_V6[20:])
    body[0:2] = b"\x80\x20"
    assert stun.parse_response(RESPONSE_V6[:20] + bytes(body)) == (TXID, ("2001:db8::7", PORT))


def test_response_trimmed_to_declared_length() -> None:
    assert stun.parse_response(RESPONSE_V4 + b"\xff" * 7) == (TXID, ("192.0.2.7", PORT))


def test_response_declared_length_beyond_datagram() -> None:
    with pytest.raises(MalformedPacket):
        stun.parse_response(RESPONSE_V4[:-1])


def test_response_without_address() -> None:
    with pytest.raises(MalformedPacket, match="no mapped address"):
        stun.parse_response(message(0x0101, TXID, attr(stun.ATTR_SOFTWARE, b"x")))


def test_response_unknown_family() -> None:
    value = struct.pack(">BBH", 0, 3, 1) + bytes(4)
    with pytest.raises(MalformedPacket, match="family"):
        stun.parse_response(message(0x0101, TXID, attr(stun.ATTR_XOR_MAPPED_ADDRESS, value)))


def test_request_is_not_a_response() -> None:
    with pytest.raises(MalformedPacket):
        stun.parse_response(REQUEST)


def test_error_response_rejected() -> None:
    with pytest.raises(MalformedPacket):
        stun.parse_response(b"\x01\x11" + RESPONSE_V4[2:])


# --- local misuse ---------------------------------------------------------------------------------


def test_new_txid_uses_randbytes() -> None:
    assert stun.new_txid(lambda n: b"\x07" * n) == b"\x07" * 12
    with pytest.raises(LocalProtocolError):
        stun.new_txid(lambda n: b"\x07" * (n - 1))


@pytest.mark.parametrize(
    ("txid", "addr"),
    [(b"short", ("192.0.2.7", 1)), (TXID, ("example.com", 1)), (TXID, ("192.0.2.7", 65536))],
)
def test_encode_misuse(txid: bytes, addr: tuple[str, int]) -> None:
    with pytest.raises(LocalProtocolError):
        stun.binding_response(txid, addr)


def test_request_bad_txid() -> None:
    with pytest.raises(LocalProtocolError):
        stun.binding_request(b"\x00" * 11)


# --- classification -------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [REQUEST, RESPONSE_V4, RESPONSE_V6, RESPONSE_MAPPED_V6])
def test_is_stun_golden(wire: bytes) -> None:
    assert stun.is_stun(wire)


def test_is_stun_rejects() -> None:
    assert not stun.is_stun(REQUEST[:19])
    assert not stun.is_stun(b"\x40" + REQUEST[1:])  # top bits set
    assert not stun.is_stun(REQUEST[:4] + b"\x21\x12\xa4\x43" + REQUEST[8:])  # cookie
    assert not stun.is_stun(b"\x00\x02" + REQUEST[2:])  # not the binding method
    assert not stun.is_stun(bytes.fromhex("5453f09f92ac") + bytes(74))  # disco magic


WIREGUARD = [
    (MSG_INITIATION, INITIATION_SIZE),
    (MSG_RESPONSE, RESPONSE_SIZE),
    (MSG_COOKIE_REPLY, COOKIE_REPLY_SIZE),
    (MSG_TRANSPORT, TRANSPORT_MIN_SIZE),
]


@given(kind=st.sampled_from(WIREGUARD), data=st.data())
def test_wireguard_never_stun(kind: tuple[int, int], data: st.DataObject) -> None:
    msg_type, size = kind
    extra = data.draw(st.integers(0, 1400)) if msg_type == MSG_TRANSPORT else 0
    rest = data.draw(st.binary(min_size=size - 4 + extra, max_size=size - 4 + extra))
    assert not stun.is_stun(struct.pack("<I", msg_type) + rest)


# --- round trips ----------------------------------------------------------------------------------


@given(txid=txids, software=st.binary(max_size=64))
def test_request_round_trip(txid: bytes, software: bytes) -> None:
    wire = stun.binding_request(txid, software=software)
    assert stun.is_stun(wire)
    assert len(wire) % 4 == 0
    assert stun.parse_binding_request(wire, software=software) == txid


@given(txid=txids, host=st.one_of(v4_hosts, v6_hosts), port=ports)
def test_response_round_trip(txid: bytes, host: str, port: int) -> None:
    wire = stun.binding_response(txid, (host, port))
    assert len(wire) == (32 if ipaddress.ip_address(host).version == 4 else 44)
    assert stun.is_stun(wire)
    assert stun.parse_response(wire) == (txid, (canonical(host), port))


# --- hostile input --------------------------------------------------------------------------------

PARSERS = [stun.parse_binding_request, stun.parse_response]


@given(data=st.binary(max_size=200))
def test_fuzz_raw(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(RemoteProtocolError):
            parse(data)


@given(
    prefix=st.sampled_from([REQUEST, RESPONSE_V4, RESPONSE_V6]),
    cut=st.integers(0, 60),
    flips=st.lists(st.tuples(st.integers(0, 59), st.integers(1, 255)), max_size=4),
    tail=st.binary(max_size=40),
)
def test_fuzz_mutated(prefix: bytes, cut: int, flips: list[tuple[int, int]], tail: bytes) -> None:
    data = bytearray(prefix[:cut] + tail)
    for pos, mask in flips:
        if pos < len(data):
            data[pos] ^= mask
    for parse in PARSERS:
        with contextlib.suppress(RemoteProtocolError):
            parse(bytes(data))
