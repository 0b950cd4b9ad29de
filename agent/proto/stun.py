"""STUN binding codec (RFC 5389 subset used by Tailscale), sans-I/O.

Follows RFC 5389 and tailscale's net/stun/stun.go (classifying a datagram; vectors from
stun_test.go).

Flow (client C on its WireGuard/disco UDP socket, derper S on UDP 3478):

    C -> S  Binding Request   txid, SOFTWARE "tailnode", FINGERPRINT (last)
    S -> C  Binding Success   txid, XOR-MAPPED-ADDRESS = the address S saw C's request come from

The client matches the response to its request by transaction ID.

Header, 20 bytes (every integer big-endian):
     0   type            u16      top two bits zero; 0x0001 request, 0x0101 success response
     2   length          u16      bytes of attributes after the header
     4   magic cookie    u32      0x2112a442
     8   transaction ID  12       random, chosen by the client

Attribute: type u16 | length u16 | value, zero-padded to a multiple of 4.
    0x8022 SOFTWARE            UTF-8 text ("tailnode")
    0x8028 FINGERPRINT         CRC-32 (IEEE) of all bytes before this attribute, XOR 0x5354554e;
                               the header length already counts the fingerprint
    0x0020 XOR-MAPPED-ADDRESS  0x00 | family u8 (1 IPv4, 2 IPv6) | port ^ 0x2112 |
                               address XOR (cookie || txid)
    0x8020 the same, under the pre-RFC number some servers still use
    0x0001 MAPPED-ADDRESS      0x00 | family | port | address, no XOR (fallback only)

derper may answer an IPv4 client with family 2 and an IPv4-mapped IPv6 address; parsing un-maps
it. Pure computation; the parse functions raise only MalformedPacket.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Self, TypeAlias

from agent.proto.errors import LocalProtocolError, MalformedPacket

__all__ = [
    "MAGIC_COOKIE",
    "HEADER_SIZE",
    "TXID_SIZE",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS_ALT",
    "ATTR_SOFTWARE",
    "ATTR_FINGERPRINT",
    "SOFTWARE",
    "Address",
    "BindingRequest",
    "BindingResponse",
    "new_txid",
    "binding_request",
    "is_stun",
    "parse_binding_request",
    "binding_response",
    "parse_response",
]

Address: TypeAlias = tuple[str, int]

MAGIC_COOKIE: Final = b"\x21\x12\xa4\x42"
HEADER_SIZE: Final = 20
TXID_SIZE: Final = 12
BINDING_REQUEST: Final = 0x0001
BINDING_SUCCESS: Final = 0x0101
ATTR_MAPPED_ADDRESS: Final = 0x0001
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT: Final = 0x8020
ATTR_SOFTWARE: Final = 0x8022
ATTR_FINGERPRINT: Final = 0x8028
FINGERPRINT_XOR: Final = 0x5354554E
SOFTWARE: Final = b"tailnode"
FAMILY_IPV4: Final = 0x01
FAMILY_IPV6: Final = 0x02

_HEADER: Final = struct.Struct(">HH4s12s")
_ATTR: Final = struct.Struct(">HH")
_FINGERPRINT: Final = struct.Struct(">HHI")
_ADDR_HEAD: Final = struct.Struct(">BBH")


def new_txid(randbytes: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    """A fresh 12-byte transaction ID drawn from `randbytes`."""
    txid = randbytes(TXID_SIZE)
    if len(txid) != TXID_SIZE:
        raise LocalProtocolError("randbytes returned the wrong number of bytes")
    return txid


def is_stun(data: bytes) -> bool:
    """At least a header, top two bits zero, the magic cookie, binding method: the first test of
    tailscale wgengine/magicsock/magicsock.go packetLooksLike (net/stun/stun.go Is)."""
    return (
        len(data) >= HEADER_SIZE
        and data[0] & 0xC0 == 0
        and data[1] == 0x01
        and data[4:8] == MAGIC_COOKIE
    )


# --- helpers --------------------------------------------------------------------------------------


def _check_txid(txid: bytes) -> None:
    if len(txid) != TXID_SIZE:
        raise LocalProtocolError(f"transaction ID must be {TXID_SIZE} bytes, got {len(txid)}")


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def _attr(attr_type: int, value: bytes) -> bytes:
    return _ATTR.pack(attr_type, len(value)) + value + bytes(_pad4(len(value)) - len(value))


def _fingerprint(data: bytes) -> int:
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _header(data: bytes) -> tuple[int, bytes, bytes]:
    """(type, txid, attribute bytes trimmed to the declared length) of a STUN message."""
    if len(data) < HEADER_SIZE:
        raise MalformedPacket(f"STUN message of {len(data)} bytes is shorter than its header")
    msg_type, length, cookie, txid = _HEADER.unpack_from(data)
    if msg_type & 0xC000 or cookie != MAGIC_COOKIE:
        raise MalformedPacket("not a STUN message")
    if HEADER_SIZE + length > len(data):
        raise MalformedPacket(f"STUN length {length} exceeds the {len(data)}-byte datagram")
    return msg_type, txid, bytes(data[HEADER_SIZE : HEADER_SIZE + length])


def _attrs(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(offset in body, type, value) of each attribute; values are unpadded."""
    offset = 0
    while offset < len(body):
        if len(body) - offset < _ATTR.size:
            raise MalformedPacket("truncated STUN attribute header")
        attr_type, attr_len = _ATTR.unpack_from(body, offset)
        start = offset + _ATTR.size
        if start + _pad4(attr_len) > len(body):
            raise MalformedPacket(f"STUN attribute {attr_type:#06x} overruns the message")
        yield offset, attr_type, body[start : start + attr_len]
        offset = start + _pad4(attr_len)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError as exc:
        raise LocalProtocolError(f"not an IP address: {host!r}") from exc


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port}")


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _address_value(value: bytes, xor: bytes | None) -> Address:
    """Decode a (XOR-)MAPPED-ADDRESS value; `xor` is cookie || txid, or None for no XOR."""
    if len(value) < _ADDR_HEAD.size:
        raise MalformedPacket("truncated STUN address attribute")
    _, family, port = _ADDR_HEAD.unpack_from(value)
    if family == FAMILY_IPV4:
        size = 4
    elif family == FAMILY_IPV6:
        size = 16
    else:
        raise MalformedPacket(f"unknown STUN address family {family}")
    raw = value[_ADDR_HEAD.size : _ADDR_HEAD.size + size]
    if len(raw) != size:
        raise MalformedPacket("truncated STUN address")
    if xor is not None:
        port ^= 0x2112
        raw = bytes(a ^ b for a, b in zip(raw, xor, strict=False))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ip = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
    return _unmapped(ip), port


# --- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingRequest:
    """Binding Request with SOFTWARE and a trailing FINGERPRINT (RFC 5389 §15.10, §15.5), as
    tailscale net/stun/stun.go Request builds it: 40 bytes for "tailnode"."""

    txid: bytes
    software: bytes = SOFTWARE

    def encode(self) -> bytes:
        _check_txid(self.txid)
        attrs = _attr(ATTR_SOFTWARE, self.software)
        length = len(attrs) + _FINGERPRINT.size
        head = _HEADER.pack(BINDING_REQUEST, length, MAGIC_COOKIE, self.txid) + attrs
        fp = _FINGERPRINT.pack(ATTR_FINGERPRINT, 4, _fingerprint(head))
        return head + fp

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Accept as derper does (tailscale net/stun/stun.go ParseBindingRequest): binding type,
        SOFTWARE present, valid FINGERPRINT last.

        `software` is the first SOFTWARE attribute; checking its value is the caller's choice
        (see `parse_binding_request`).
        """
        msg_type, txid, body = _header(data)
        if msg_type != BINDING_REQUEST:
            raise MalformedPacket(f"STUN type {msg_type:#06x} is not a binding request")
        software: bytes | None = None
        last: tuple[int, int, bytes] | None = None
        for offset, attr_type, value in _attrs(body):
            if attr_type == ATTR_SOFTWARE and software is None:
                software = value
            last = (offset, attr_type, value)
        if software is None:
            raise MalformedPacket("STUN binding request without SOFTWARE")
        if last is None or last[1] != ATTR_FINGERPRINT or len(last[2]) != 4:
            raise MalformedPacket("STUN binding request without a trailing FINGERPRINT")
        covered = bytes(data[:HEADER_SIZE]) + body[: last[0]]
        if int.from_bytes(last[2], "big") != _fingerprint(covered):
            raise MalformedPacket("STUN FINGERPRINT mismatch")
        return cls(txid=txid, software=software)


@dataclass(frozen=True, slots=True)
class BindingResponse:
    """Binding Success Response carrying one XOR-MAPPED-ADDRESS (RFC 5389 §15.2; tailscale
    net/stun/stun.go Response): 32 (v4) or 44 (v6) bytes.

    An IPv4 `address` is sent with family 1; any IPv6 one, IPv4-mapped included, with family 2.
    `parse` returns IPv4-mapped addresses un-mapped.
    """

    txid: bytes
    address: Address

    def encode(self) -> bytes:
        _check_txid(self.txid)
        host, port = self.address
        _check_port(port)
        ip = _ip(host)
        family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
        xor = MAGIC_COOKIE + self.txid
        raw = bytes(a ^ b for a, b in zip(ip.packed, xor, strict=False))
        value = _ADDR_HEAD.pack(0, family, port ^ 0x2112) + raw
        attrs = _attr(ATTR_XOR_MAPPED_ADDRESS, value)
        return _HEADER.pack(BINDING_SUCCESS, len(attrs), MAGIC_COOKIE, self.txid) + attrs

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Client rules (tailscale net/stun/stun.go ParseResponse): success type only, trim to
        the declared length, prefer XOR-MAPPED-ADDRESS (0x0020 or 0x8020), fall back to
        MAPPED-ADDRESS, un-map v4-in-v6."""
        msg_type, txid, body = _header(data)
        if msg_type != BINDING_SUCCESS:
            raise MalformedPacket(f"STUN type {msg_type:#06x} is not a binding success response")
        xor_addr: Address | None = None
        plain_addr: Address | None = None
        for _, attr_type, value in _attrs(body):
            if attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
                if xor_addr is None:
                    xor_addr = _address_value(value, MAGIC_COOKIE + txid)
            elif attr_type == ATTR_MAPPED_ADDRESS and plain_addr is None:
                plain_addr = _address_value(value, None)
        address = xor_addr or plain_addr
        if address is None:
            raise MalformedPacket("STUN response carries no mapped address")
        return cls(txid=txid, address=address)


# --- function API ---------------------------------------------------------------------------------


def binding_request(txid: bytes, software: bytes = SOFTWARE) -> bytes:
    """The bytes of a Binding Request (see `BindingRequest`)."""
    return BindingRequest(txid, software).encode()


def parse_binding_request(data: bytes, *, software: bytes | None = SOFTWARE) -> bytes:
    """The transaction ID of a Binding Request a STUN server should answer.

    With `software` set (the default, as derper), the first SOFTWARE attribute must equal it.
    """
    request = BindingRequest.parse(data)
    if software is not None and request.software != software:
        raise MalformedPacket("STUN binding request from unexpected SOFTWARE")
    return request.txid


def binding_response(txid: bytes, addr: Address) -> bytes:
    """The bytes of a Binding Success Response telling the client it was seen as `addr`."""
    return BindingResponse(txid, addr).encode()


def parse_response(data: bytes) -> tuple[bytes, Address]:
    """(transaction ID, mapped address) of a Binding Success Response (see `BindingResponse`)."""
    response = BindingResponse.parse(data)
    return response.txid, response.address
