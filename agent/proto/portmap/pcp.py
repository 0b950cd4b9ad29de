"""PCP (RFC 6887) codec, sans-I/O: ANNOUNCE (probe) and MAP for one UDP port.

Flow (client C on the LAN, PCP server G on UDP 5351):

    C -> G  ANNOUNCE request        G -> C  ANNOUNCE response     result, epoch
    C -> G  MAP request (nonce N)   G -> C  MAP response (N)      lifetime, epoch, external ip:port

The client keeps N for the mapping's life: a renewal re-sends it, a delete is MAP with lifetime 0
and the same N, and an answer whose nonce is not N is not ours (RFC 6887 §11.3). The epoch
("server epoch time") lets the client notice a server that lost its state (§8.5).

Request header, 24 bytes:                   Response header, 24 bytes:
     0  version  u8 = 2                          0  version  u8 = 2
     1  R=0 | opcode (7 bits)                    1  R=1 | opcode
     2  reserved u16                             2  reserved u8
     4  requested lifetime u32                   3  result code u8
     8  client IP (16, IPv4-mapped IPv6)         4  lifetime u32 (granted; error: retry hint)
                                                 8  epoch u32
                                                12  reserved 12

MAP opcode payload, 36 bytes (request and response):
     0  mapping nonce 12
    12  protocol u8 (17 = UDP)
    13  reserved 3
    16  internal port u16
    18  suggested (request) / assigned (response) external port u16
    20  suggested / assigned external IP (16, IPv4-mapped; all zero = no preference)

Options (after the payload) are skipped. A NAT-PMP-only server answers our version-2 request with a
version-0 header and result 1 (unsupported version); `parse_response` returns that as
`VersionMismatch`. Result codes are `ResultCode`. Parsers raise only RemoteProtocolError.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Self

from agent.proto.errors import LocalProtocolError

from .errors import MalformedAnswer

__all__ = [
    "VERSION",
    "NONCE_SIZE",
    "MAX_MESSAGE",
    "PROTO_UDP",
    "Opcode",
    "ResultCode",
    "AnnounceRequest",
    "MapRequest",
    "Response",
    "MapResponse",
    "VersionMismatch",
    "parse_response",
]

VERSION: Final = 2
NONCE_SIZE: Final = 12
MAX_MESSAGE: Final = 1100  # RFC 6887 §7: messages are at most 1100 bytes
PROTO_UDP: Final = 17
RESPONSE_BIT: Final = 0x80

_REQ_HEAD = struct.Struct("!BBHI16s")
_RESP_HEAD = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3sHH16s")
_ANY = b"\x00" * 16


class Opcode(IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def _v6(addr: ipaddress.IPv4Address | None) -> bytes:
    return _ANY if addr is None else b"\x00" * 10 + b"\xff\xff" + addr.packed


def _v4(raw: bytes) -> ipaddress.IPv4Address | None:
    """The IPv4 address in an IPv4-mapped field; None for all zeros or a real IPv6 address."""
    if raw == _ANY:
        return None
    return ipaddress.IPv6Address(raw).ipv4_mapped


@dataclass(frozen=True, slots=True)
class AnnounceRequest:
    """ANNOUNCE with lifetime 0: the cheapest "is a PCP server there, and its epoch?" probe."""

    client: ipaddress.IPv4Address

    def encode(self) -> bytes:
        return _REQ_HEAD.pack(VERSION, Opcode.ANNOUNCE, 0, 0, _v6(self.client))


@dataclass(frozen=True, slots=True)
class MapRequest:
    """MAP `internal_port`/UDP of `client` (our LAN address, as the server sees the source)."""

    client: ipaddress.IPv4Address
    nonce: bytes
    internal_port: int
    lifetime: int
    suggested_external_port: int = 0
    suggested_external_ip: ipaddress.IPv4Address | None = None
    protocol: int = PROTO_UDP

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"PCP nonce must be {NONCE_SIZE} bytes")
        if not 1 <= self.internal_port <= 0xFFFF or not 0 <= self.suggested_external_port <= 0xFFFF:
            raise LocalProtocolError("PCP MAP ports out of range")
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise LocalProtocolError(f"lifetime {self.lifetime} out of range")

    def encode(self) -> bytes:
        return _REQ_HEAD.pack(VERSION, Opcode.MAP, 0, self.lifetime, _v6(self.client)) + _MAP.pack(
            self.nonce, self.protocol, b"\x00" * 3, self.internal_port,
            self.suggested_external_port, _v6(self.suggested_external_ip),
        )  # fmt: skip

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """The request as a server sees it (lab responders and tests)."""
        if not _REQ_HEAD.size + _MAP.size <= len(data) <= MAX_MESSAGE:
            raise MalformedAnswer(f"PCP MAP request of {len(data)} bytes")
        version, op, _, lifetime, client = _REQ_HEAD.unpack_from(data)
        nonce, proto, _, internal, external, ext_ip = _MAP.unpack_from(data, _REQ_HEAD.size)
        addr = _v4(client)
        if version != VERSION or op != Opcode.MAP or addr is None or internal == 0:
            raise MalformedAnswer("not a PCP MAP request for an IPv4 client")
        return cls(addr, nonce, internal, lifetime, external, _v4(ext_ip), proto)


@dataclass(frozen=True, slots=True)
class Response:
    """A PCP response header (ANNOUNCE, or any opcode answered with an error and no payload)."""

    opcode: int
    result: int
    lifetime: int
    epoch: int

    def encode(self) -> bytes:
        return _RESP_HEAD.pack(
            VERSION, RESPONSE_BIT | self.opcode, 0, self.result, self.lifetime, self.epoch,
            b"\x00" * 12,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class MapResponse:
    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: ipaddress.IPv4Address | None

    def encode(self) -> bytes:
        head = Response(Opcode.MAP, self.result, self.lifetime, self.epoch).encode()
        return head + _MAP.pack(
            self.nonce, self.protocol, b"\x00" * 3, self.internal_port, self.external_port,
            _v6(self.external_ip),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class VersionMismatch:
    """A version-0 (NAT-PMP) header answering our PCP request: the server speaks only NAT-PMP."""

    result: int


def parse_response(data: bytes) -> Response | MapResponse | VersionMismatch:
    """Any PCP answer; MalformedAnswer for anything else (requests, short or long messages)."""
    if len(data) > MAX_MESSAGE:
        raise MalformedAnswer(f"PCP answer of {len(data)} bytes")
    if len(data) >= 4 and data[0] == 0:
        return VersionMismatch(data[3])  # RFC 6887 §9: the NAT-PMP header's result code
    if len(data) < _RESP_HEAD.size or len(data) % 4:
        raise MalformedAnswer(f"PCP answer of {len(data)} bytes")
    version, op, _, result, lifetime, epoch, _ = _RESP_HEAD.unpack_from(data)
    if version != VERSION:
        raise MalformedAnswer(f"PCP answer with version {version}")
    if not op & RESPONSE_BIT:
        raise MalformedAnswer("a PCP request where an answer was expected")
    opcode = op & ~RESPONSE_BIT
    if opcode == Opcode.MAP and len(data) >= _RESP_HEAD.size + _MAP.size:
        nonce, proto, _, internal, external, ext_ip = _MAP.unpack_from(data, _RESP_HEAD.size)
        addr = _v4(ext_ip)
        if result == ResultCode.SUCCESS and lifetime and (addr is None or external == 0):
            raise MalformedAnswer("PCP MAP grant without an IPv4 external address and port")
        return MapResponse(result, lifetime, epoch, nonce, proto, internal, external, addr)
    if opcode == Opcode.MAP and result == ResultCode.SUCCESS:
        raise MalformedAnswer("PCP MAP success without its payload")
    return Response(opcode, result, lifetime, epoch)
