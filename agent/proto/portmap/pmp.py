"""NAT-PMP (RFC 6886) codec, sans-I/O: the external-address and UDP-mapping exchanges.

Flow (client C on the LAN, gateway G on UDP 5351; every integer big-endian):

    C -> G  ExternalAddressRequest     G -> C  ExternalAddressResponse  epoch, external IPv4
    C -> G  MapRequest (UDP)           G -> C  MapResponse              epoch, ports, lifetime

A MapRequest with lifetime 0 (and suggested external port 0) deletes the mapping. The client
retransmits after 250 ms, doubling; an answer with result code != 0 is a refusal. A PCP server
answers a version-0 request with a version-0 header whose result code is 1 (unsupported
version), as RFC 6887 §9 asks, which is how a client learns to switch.

External address request, 2 bytes:     response, 12 bytes:
     0  version  u8 = 0                      0  version  u8 = 0
     1  opcode   u8 = 0                      1  opcode   u8 = 128
                                             2  result   u16
                                             4  epoch    u32   seconds since the table began
                                             8  address  4     external IPv4

Map UDP request, 12 bytes:               response, 16 bytes:
     0  version  u8 = 0                      0  version  u8 = 0
     1  opcode   u8 = 1 (UDP; 2 is TCP)      1  opcode   u8 = 129
     2  reserved u16 = 0                     2  result   u16
     4  internal port u16                    4  epoch    u32
     6  suggested external port u16          8  internal port u16
     8  lifetime u32 seconds                10  mapped external port u16
                                            12  lifetime u32 granted

Result codes: 0 success, 1 unsupported version, 2 not authorized/refused, 3 network failure,
4 out of resources, 5 unsupported opcode. A response may be longer than the layout (RFC 6886
§3.5 lets a client ignore trailing bytes); it may not be shorter. Parsers raise only
RemoteProtocolError subclasses.
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
    "PORT",
    "VERSION",
    "MAX_ANSWER",
    "Opcode",
    "ResultCode",
    "ExternalAddressRequest",
    "ExternalAddressResponse",
    "MapRequest",
    "MapResponse",
    "UnsupportedVersion",
    "parse_response",
]

PORT: Final = 5351  # the gateway's NAT-PMP/PCP port (RFC 6886 §3.1)
VERSION: Final = 0
MAX_ANSWER: Final = 1100  # PCP's maximum message size: no NAT-PMP/PCP answer is longer
RESPONSE_BIT: Final = 0x80

_ADDR_REQ = struct.Struct("!BB")
_ADDR_RESP = struct.Struct("!BBHI4s")
_MAP_REQ = struct.Struct("!BBHHHI")
_MAP_RESP = struct.Struct("!BBHIHHI")
_HEAD = struct.Struct("!BBH")


class Opcode(IntEnum):
    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def _port(value: int, name: str, *, zero_ok: bool) -> None:
    if not (0 if zero_ok else 1) <= value <= 0xFFFF:
        raise LocalProtocolError(f"{name} {value} is not a port")


@dataclass(frozen=True, slots=True)
class ExternalAddressRequest:
    def encode(self) -> bytes:
        return _ADDR_REQ.pack(VERSION, Opcode.EXTERNAL_ADDRESS)


@dataclass(frozen=True, slots=True)
class ExternalAddressResponse:
    result: int
    epoch: int
    address: ipaddress.IPv4Address

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) < _ADDR_RESP.size or len(data) > MAX_ANSWER:
            raise MalformedAnswer(f"NAT-PMP address response of {len(data)} bytes")
        version, op, result, epoch, raw = _ADDR_RESP.unpack_from(data)
        if version != VERSION or op != RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS:
            raise MalformedAnswer(f"NAT-PMP version {version} opcode {op}: not an address answer")
        return cls(result, epoch, ipaddress.IPv4Address(raw))

    def encode(self) -> bytes:
        return _ADDR_RESP.pack(
            VERSION, RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS, self.result, self.epoch,
            self.address.packed,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class MapRequest:
    """Map (or, with lifetime 0, delete) UDP `internal_port` of the sender's address."""

    internal_port: int
    suggested_external_port: int
    lifetime: int
    opcode: Opcode = Opcode.MAP_UDP

    def __post_init__(self) -> None:
        _port(self.internal_port, "internal port", zero_ok=False)
        _port(self.suggested_external_port, "external port", zero_ok=True)
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise LocalProtocolError(f"lifetime {self.lifetime} out of range")
        if self.opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
            raise LocalProtocolError(f"opcode {self.opcode} is not a mapping")

    def encode(self) -> bytes:
        return _MAP_REQ.pack(
            VERSION, self.opcode, 0, self.internal_port, self.suggested_external_port,
            self.lifetime,
        )  # fmt: skip

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """The request as a router sees it (lab responders and tests)."""
        if len(data) != _MAP_REQ.size:
            raise MalformedAnswer(f"NAT-PMP map request of {len(data)} bytes")
        version, op, _, internal, external, lifetime = _MAP_REQ.unpack(data)
        if version != VERSION or op not in (Opcode.MAP_UDP, Opcode.MAP_TCP) or internal == 0:
            raise MalformedAnswer(f"NAT-PMP version {version} opcode {op}: not a map request")
        return cls(internal, external, lifetime, Opcode(op))


@dataclass(frozen=True, slots=True)
class MapResponse:
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int
    opcode: Opcode = Opcode.MAP_UDP

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) < _MAP_RESP.size or len(data) > MAX_ANSWER:
            raise MalformedAnswer(f"NAT-PMP map response of {len(data)} bytes")
        version, op, result, epoch, internal, external, lifetime = _MAP_RESP.unpack_from(data)
        if version != VERSION or op not in (RESPONSE_BIT | Opcode.MAP_UDP,
                                            RESPONSE_BIT | Opcode.MAP_TCP):  # fmt: skip
            raise MalformedAnswer(f"NAT-PMP version {version} opcode {op}: not a map answer")
        return cls(result, epoch, internal, external, lifetime, Opcode(op & ~RESPONSE_BIT))

    def encode(self) -> bytes:
        return _MAP_RESP.pack(
            VERSION, RESPONSE_BIT | self.opcode, self.result, self.epoch, self.internal_port,
            self.external_port, self.lifetime,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class UnsupportedVersion:
    """A version-0 header with result 1 that is neither answer above: a PCP-only server's
    reply to our NAT-PMP request, or a truncated answer of any opcode carrying that result."""

    result: int


def parse_response(data: bytes) -> ExternalAddressResponse | MapResponse | UnsupportedVersion:
    """Any NAT-PMP answer; MalformedAnswer if it is none."""
    if len(data) < _HEAD.size or len(data) > MAX_ANSWER:
        raise MalformedAnswer(f"NAT-PMP answer of {len(data)} bytes")
    version, op, result = _HEAD.unpack_from(data)
    if version != VERSION:
        raise MalformedAnswer(f"NAT-PMP answer with version {version}")
    if op == RESPONSE_BIT | Opcode.EXTERNAL_ADDRESS and len(data) >= _ADDR_RESP.size:
        return ExternalAddressResponse.parse(data)
    if (
        op in (RESPONSE_BIT | Opcode.MAP_UDP, RESPONSE_BIT | Opcode.MAP_TCP)
        and len(data) >= _MAP_RESP.size
    ):
        return MapResponse.parse(data)
    if result == ResultCode.UNSUPPORTED_VERSION:
        return UnsupportedVersion(result)
    raise MalformedAnswer(f"NAT-PMP answer opcode {op} of {len(data)} bytes")
