"""WireGuard wire messages (whitepaper §5.4): parse/encode with exact sizes.

Flow (initiator I, responder R; each arrow is one UDP datagram):

    I -> R  HandshakeInitiation (type 1)   I's ephemeral, encrypted static and TAI64N timestamp
    R -> I  HandshakeResponse   (type 2)   R's ephemeral, empty AEAD payload; both derive keys
    R -> I  CookieReply         (type 3)   instead of a response, when R is under load
    I <-> R transport data      (type 4)   counter + AEAD(padded IP packet); empty = keepalive

Every message starts with a 4-byte little-endian word equal to its type (the type byte followed by
three zero bytes). Indexes and counters are little-endian; keys and MACs are raw bytes.

HandshakeInitiation, 148 bytes:
     0   type = 1        u8 + 3 zero bytes
     4   sender          u32 LE   initiator's index for this handshake
     8   ephemeral       32       initiator's ephemeral public key (unencrypted)
    40   encrypted_static 48      AEAD(initiator's static public key) = 32 + 16 tag
    88   encrypted_timestamp 28   AEAD(TAI64N) = 12 + 16 tag
   116   mac1            16       MAC(HASH("mac1----" || responder public), bytes 0..115)
   132   mac2            16       MAC(cookie, bytes 0..131), or zeros without a cookie

HandshakeResponse, 92 bytes:
     0   type = 2        u8 + 3 zero bytes
     4   sender          u32 LE   responder's index
     8   receiver        u32 LE   the initiator's sender index
    12   ephemeral       32       responder's ephemeral public key
    44   encrypted_nothing 16     AEAD(empty) = tag only
    60   mac1            16       MAC(HASH("mac1----" || initiator public), bytes 0..59)
    76   mac2            16       MAC(cookie, bytes 0..75), or zeros

CookieReply, 64 bytes:
     0   type = 3        u8 + 3 zero bytes
     4   receiver        u32 LE   sender index of the handshake message being answered
     8   nonce           24       XChaCha20-Poly1305 nonce
    32   encrypted_cookie 32      XAEAD(HASH("cookie--" || public of the replier), cookie; ad=mac1)

Transport data, 32 bytes or more (16 + padded payload + 16 tag):
     0   type = 4        u8 + 3 zero bytes
     4   receiver        u32 LE   the receiving side's index for this session
     8   counter         u64 LE   AEAD nonce counter
    16   encrypted packet ...     AEAD(packet zero-padded to a multiple of 16) + 16 tag

Pure computation; parse raises only MalformedPacket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Self, TypeAlias

from agent.proto.errors import LocalProtocolError, MalformedPacket
from agent.proto.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
)

__all__ = [
    "TYPE_WORD",
    "INITIATION",
    "RESPONSE",
    "COOKIE_REPLY",
    "TRANSPORT_HEADER",
    "HandshakeInitiation",
    "HandshakeResponse",
    "CookieReply",
    "TransportHeader",
    "Message",
    "message_type",
    "parse_any",
]

TYPE_WORD: Final = struct.Struct("<I")
INITIATION: Final = struct.Struct("<II32s48s28s16s16s")
RESPONSE: Final = struct.Struct("<III32s16s16s16s")
COOKIE_REPLY: Final = struct.Struct("<II24s32s")
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")

_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF

_Buffer: TypeAlias = bytes | bytearray | memoryview


def _check_len(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise LocalProtocolError(f"{name} must be {size} bytes, got {len(value)}")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise LocalProtocolError(f"{name} must fit in a u32, got {value}")


def _expect(data: _Buffer, msg_type: int, size: int, name: str) -> None:
    if len(data) != size:
        raise MalformedPacket(f"{name}: {len(data)} bytes, expected {size}")
    if TYPE_WORD.unpack_from(data)[0] != msg_type:
        raise MalformedPacket(f"{name}: bad type word")


@dataclass(frozen=True, slots=True)
class HandshakeInitiation:
    """Message type 1 (148 bytes)."""

    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def __post_init__(self) -> None:
        _check_u32("sender", self.sender)
        _check_len("ephemeral", self.ephemeral, 32)
        _check_len("encrypted_static", self.encrypted_static, 48)
        _check_len("encrypted_timestamp", self.encrypted_timestamp, 28)
        _check_len("mac1", self.mac1, 16)
        _check_len("mac2", self.mac2, 16)

    @classmethod
    def parse(cls, data: _Buffer) -> Self:
        _expect(data, MSG_INITIATION, INITIATION_SIZE, "initiation")
        _, sender, eph, enc_static, enc_ts, mac1, mac2 = INITIATION.unpack_from(data)
        return cls(sender, eph, enc_static, enc_ts, mac1, mac2)

    def encode(self) -> bytes:
        return INITIATION.pack(
            MSG_INITIATION,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """Message type 2 (92 bytes)."""

    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def __post_init__(self) -> None:
        _check_u32("sender", self.sender)
        _check_u32("receiver", self.receiver)
        _check_len("ephemeral", self.ephemeral, 32)
        _check_len("encrypted_nothing", self.encrypted_nothing, 16)
        _check_len("mac1", self.mac1, 16)
        _check_len("mac2", self.mac2, 16)

    @classmethod
    def parse(cls, data: _Buffer) -> Self:
        _expect(data, MSG_RESPONSE, RESPONSE_SIZE, "response")
        _, sender, receiver, eph, enc_nothing, mac1, mac2 = RESPONSE.unpack_from(data)
        return cls(sender, receiver, eph, enc_nothing, mac1, mac2)

    def encode(self) -> bytes:
        return RESPONSE.pack(
            MSG_RESPONSE,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    """Message type 3 (64 bytes)."""

    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def __post_init__(self) -> None:
        _check_u32("receiver", self.receiver)
        _check_len("nonce", self.nonce, 24)
        _check_len("encrypted_cookie", self.encrypted_cookie, 32)

    @classmethod
    def parse(cls, data: _Buffer) -> Self:
        _expect(data, MSG_COOKIE_REPLY, COOKIE_REPLY_SIZE, "cookie reply")
        _, receiver, nonce, enc_cookie = COOKIE_REPLY.unpack_from(data)
        return cls(receiver, nonce, enc_cookie)

    def encode(self) -> bytes:
        return COOKIE_REPLY.pack(MSG_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie)


@dataclass(frozen=True, slots=True)
class TransportHeader:
    """The 16-byte header of message type 4; the encrypted packet follows it."""

    receiver: int
    counter: int

    def __post_init__(self) -> None:
        _check_u32("receiver", self.receiver)
        if not 0 <= self.counter <= _U64_MAX:
            raise LocalProtocolError(f"counter must fit in a u64, got {self.counter}")

    @classmethod
    def parse(cls, data: _Buffer) -> Self:
        """Read the header of a whole transport datagram (at least 32 bytes: header + tag)."""
        if len(data) < TRANSPORT_MIN_SIZE:
            raise MalformedPacket(f"transport: {len(data)} bytes, minimum {TRANSPORT_MIN_SIZE}")
        msg_type, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        if msg_type != MSG_TRANSPORT:
            raise MalformedPacket("transport: bad type word")
        return cls(receiver, counter)

    def encode(self) -> bytes:
        return TRANSPORT_HEADER.pack(MSG_TRANSPORT, self.receiver, self.counter)


Message: TypeAlias = HandshakeInitiation | HandshakeResponse | CookieReply | TransportHeader

assert TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE
assert INITIATION.size == INITIATION_SIZE
assert RESPONSE.size == RESPONSE_SIZE
assert COOKIE_REPLY.size == COOKIE_REPLY_SIZE


def message_type(data: _Buffer) -> int:
    """The message type (1..4) from the first 4 bytes; MalformedPacket for anything else."""
    if len(data) < TYPE_WORD.size:
        raise MalformedPacket(f"datagram of {len(data)} bytes has no type word")
    msg_type: int = TYPE_WORD.unpack_from(data)[0]
    if not MSG_INITIATION <= msg_type <= MSG_TRANSPORT:
        raise MalformedPacket("unknown message type")
    return msg_type


def parse_any(data: _Buffer) -> Message:
    """Parse any WireGuard message; for transport data only the header is returned."""
    msg_type = message_type(data)
    if msg_type == MSG_INITIATION:
        return HandshakeInitiation.parse(data)
    if msg_type == MSG_RESPONSE:
        return HandshakeResponse.parse(data)
    if msg_type == MSG_COOKIE_REPLY:
        return CookieReply.parse(data)
    return TransportHeader.parse(data)
