"""DERP frame codec (tailscale derp/derp.go: frames, handshake).

Flow after the HTTP upgrade (§3.1; C = client, S = relay server, M = mesh-key holders only):

    S -> C  ServerKey      magic + server key; always the first frame
    C -> S  ClientInfo     client key + box(client priv -> server pub, JSON)
    S -> C  ServerInfo     box(server priv -> client pub, JSON); the frame right after ServerKey
    C -> S  NotePreferred  (home region only), WatchConns (mesh watchers only)
    steady  SendPacket -> RecvPacket, KeepAlive, Ping/Pong, PeerGone, PeerPresent (M),
            ForwardPacket (M), ClosePeer (M), Health, Restarting; unknown types are skipped

Every frame (§2.1) is a 5-byte header and a payload; integers are big-endian:

    +--------+----------------------+------------------------+
    | type   | length (u32 BE)      | payload (length bytes) |
    | 1 byte | 4 bytes              |                        |
    +--------+----------------------+------------------------+

Payloads (§2.3; "key" = 32-byte raw Curve25519 public key):

    0x01 ServerKey      magic(8) | server key(32) | [future bytes]      40..1024
    0x02 ClientInfo     client key(32) | nonce(24) | box(JSON)          56..256 KiB
    0x03 ServerInfo     nonce(24) | box(JSON)                           24..24 + 1 MiB
    0x04 SendPacket     dst key(32) | packet(<= 64 KiB)
    0x05 RecvPacket     src key(32) | packet(<= 64 KiB)
    0x06 KeepAlive      empty
    0x07 NotePreferred  1 byte: 0x01 home region, 0x00 not
    0x08 PeerGone       key(32) | [reason(1)]                           32, or 33+
    0x09 PeerPresent    key(32) | [ip(16) | port(2) | [flags(1)]]       32, 50 or 51+
    0x0a ForwardPacket  src key(32) | dst key(32) | packet(<= 64 KiB)
    0x10 WatchConns     empty
    0x11 ClosePeer      key(32)
    0x12 Ping           data(8) | [ignored, up to 1000 in all]
    0x13 Pong           data(8) | [ignored, up to 1000 in all]
    0x14 Health         UTF-8 text; empty means healthy again
    0x15 Restarting     reconnect_in ms(u32) | try_for ms(u32) | [future bytes]

A box is NaCl crypto_box (X25519 + XSalsa20-Poly1305, §3.5): `nonce | tag(16) | ciphertext`,
exactly what PyNaCl's `Box(priv, pub).encrypt(msg, nonce)` returns; the caller supplies the nonce.

`FrameBuffer` turns a byte stream into frames, refusing a header whose length is over the limit
before any of its body is buffered (as h11's max_incomplete_event_size). Receive paths raise only
RemoteProtocolError subclasses: MalformedPacket, FrameTooLarge, AuthenticationFailed.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Final, Self, TypeAlias

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from agent.proto.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    MalformedPacket,
    RemoteProtocolError,
)

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "KEY_LEN", "NONCE_LEN", "BOX_OVERHEAD", "FRAME_HEADER_LEN",
    "MAX_PACKET_SIZE", "MAX_INFO_LEN", "MAX_FRAME_SIZE", "MAX_WRITTEN_FRAME_SIZE",
    "MAX_CLIENT_INFO_LEN", "MAX_SERVER_KEY_LEN", "MAX_PING_LEN", "KEEPALIVE_INTERVAL",
    "KEEPALIVE_JITTER", "CLIENT_READ_TIMEOUT", "FRAME_HEADER",
    "FrameType", "PeerGoneReason", "PeerPresentFlags", "FrameTooLarge",
    "ServerKey", "ClientInfo", "ServerInfo", "SendPacket", "RecvPacket", "KeepAlive",
    "NotePreferred", "PeerGone", "PeerPresent", "ForwardPacket", "WatchConns", "ClosePeer",
    "Ping", "Pong", "Health", "Restarting", "UnknownFrame", "Frame",
    "seal_client_info", "open_client_info", "seal_server_info", "open_server_info",
    "max_payload_len", "parse_frame", "parse_any", "FrameBuffer",
]  # fmt: skip

# --- constants (§2.2) ---------------------------------------------------------------------------

MAGIC: Final = "DERP🔑".encode()  # 44 45 52 50 f0 9f 94 91
PROTOCOL_VERSION: Final = 2  # v2: RecvPacket carries the 32-byte source key
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
BOX_OVERHEAD: Final = 16  # Poly1305 tag in front of the ciphertext
FRAME_HEADER_LEN: Final = 5
MAX_PACKET_SIZE: Final = 64 << 10  # relayed packet bytes, excluding keys
MAX_INFO_LEN: Final = 1 << 20  # bound on the ServerInfo box a client accepts
MAX_FRAME_SIZE: Final = 1 << 20  # client read limit: a bigger frame is a fatal error
MAX_WRITTEN_FRAME_SIZE: Final = 10 << 20  # Go's WriteFrame refuses bigger
MAX_CLIENT_INFO_LEN: Final = 256 << 10  # server bound on the ClientInfo payload
MAX_SERVER_KEY_LEN: Final = 1024  # client bound on the ServerKey payload
MAX_PING_LEN: Final = 1000  # server closes on a longer Ping
KEEPALIVE_INTERVAL: Final = 60.0  # seconds between server KeepAlives, plus jitter
KEEPALIVE_JITTER: Final = 5.0  # jitter drawn once per connection from [0, 5 s)
CLIENT_READ_TIMEOUT: Final = 120.0  # clients give up after this long without a frame

# Our cap for control frames that may grow trailing fields (PeerGone, PeerPresent, Restarting).
_MAX_CONTROL_LEN: Final = 1024
_MAX_HEALTH_LEN: Final = MAX_PACKET_SIZE

FRAME_HEADER: Final = struct.Struct(">BI")
_U32_PAIR: Final = struct.Struct(">II")
_PORT: Final = struct.Struct(">H")
_U32_MAX: Final = 0xFFFFFFFF
_ZERO_KEY: Final = bytes(KEY_LEN)
_ZERO_IP: Final = bytes(16)
_PEER_ADDR_END: Final = KEY_LEN + 16 + 2  # PeerPresent key | ip | port

_Buffer: TypeAlias = bytes | bytearray | memoryview
_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class FrameType(IntEnum):
    """Frame type byte (§2.3)."""

    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    """PeerGone reason byte; other values are passed through as plain ints."""

    DISCONNECTED = 0x00
    NOT_HERE = 0x01


_KNOWN_REASONS: Final = frozenset(PeerGoneReason)


class PeerPresentFlags(IntFlag):
    """PeerPresent flag bits; zero means an old server that sends no flags."""

    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


class FrameTooLarge(RemoteProtocolError):
    """A frame header announced more payload than allowed for its type or this stream."""


# --- helpers ------------------------------------------------------------------------------------


def _header(ftype: int, length: int) -> bytes:
    if length > MAX_WRITTEN_FRAME_SIZE:
        raise LocalProtocolError(f"frame payload of {length} bytes is too large to write")
    return FRAME_HEADER.pack(ftype, length)


def _frame(ftype: int, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return _header(ftype, len(payload)) + payload


def _check_key(name: str, key: bytes) -> None:
    if len(key) != KEY_LEN:
        raise LocalProtocolError(f"{name} must be {KEY_LEN} bytes, got {len(key)}")


def _check_packet(packet: bytes) -> None:
    if len(packet) > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")


def _check_bounds(name: str, payload: _Buffer, low: int, high: int) -> None:
    if not low <= len(payload) <= high:
        raise MalformedPacket(f"{name}: payload of {len(payload)} bytes, need {low}..{high}")


def _check_exact(name: str, payload: _Buffer, size: int) -> None:
    if len(payload) != size:
        raise MalformedPacket(f"{name}: payload of {len(payload)} bytes, need {size}")


def _check_echo(data: bytes) -> None:
    if len(data) != 8:
        raise LocalProtocolError(f"ping/pong data must be 8 bytes, got {len(data)}")


def _parse_echo(name: str, payload: _Buffer) -> bytes:
    _check_bounds(name, payload, 8, MAX_PING_LEN)
    return bytes(payload[:8])


# --- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerKey:
    """0x01: magic | server public key. Bytes after the first 40 are ignored (§3.2)."""

    frame_type: ClassVar[FrameType] = FrameType.SERVER_KEY
    key: bytes

    def __post_init__(self) -> None:
        _check_key("server key", self.key)

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("ServerKey", payload, len(MAGIC) + KEY_LEN, MAX_SERVER_KEY_LEN)
        if bytes(payload[: len(MAGIC)]) != MAGIC:
            raise MalformedPacket("ServerKey: bad magic")
        return cls(bytes(payload[len(MAGIC) : len(MAGIC) + KEY_LEN]))

    def encode(self) -> bytes:
        return _frame(self.frame_type, MAGIC, self.key)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """0x02: client key | sealed, where sealed = nonce | box(JSON) (§3.3)."""

    frame_type: ClassVar[FrameType] = FrameType.CLIENT_INFO
    key: bytes
    sealed: bytes

    def __post_init__(self) -> None:
        _check_key("client key", self.key)
        if not NONCE_LEN <= len(self.sealed) <= MAX_CLIENT_INFO_LEN - KEY_LEN:
            raise LocalProtocolError(f"sealed ClientInfo of {len(self.sealed)} bytes")

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("ClientInfo", payload, KEY_LEN + NONCE_LEN, MAX_CLIENT_INFO_LEN)
        key = bytes(payload[:KEY_LEN])
        if key == _ZERO_KEY:
            raise MalformedPacket("ClientInfo: all-zero client key")
        return cls(key, bytes(payload[KEY_LEN:]))

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.key, self.sealed)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """0x03: sealed = nonce | box(JSON), server private key to client public key (§3.4)."""

    frame_type: ClassVar[FrameType] = FrameType.SERVER_INFO
    sealed: bytes

    def __post_init__(self) -> None:
        if not NONCE_LEN <= len(self.sealed) <= NONCE_LEN + MAX_INFO_LEN:
            raise LocalProtocolError(f"sealed ServerInfo of {len(self.sealed)} bytes")

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("ServerInfo", payload, NONCE_LEN, NONCE_LEN + MAX_INFO_LEN)
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.sealed)


@dataclass(frozen=True, slots=True)
class SendPacket:
    """0x04: destination key | packet (client to server)."""

    frame_type: ClassVar[FrameType] = FrameType.SEND_PACKET
    dst: bytes
    packet: bytes

    def __post_init__(self) -> None:
        _check_key("dst", self.dst)
        _check_packet(self.packet)

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("SendPacket", payload, KEY_LEN, KEY_LEN + MAX_PACKET_SIZE)
        return cls(bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:]))

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.dst, self.packet)


@dataclass(frozen=True, slots=True)
class RecvPacket:
    """0x05: source key | packet (server to client, protocol v2)."""

    frame_type: ClassVar[FrameType] = FrameType.RECV_PACKET
    src: bytes
    packet: bytes

    def __post_init__(self) -> None:
        _check_key("src", self.src)
        _check_packet(self.packet)

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("RecvPacket", payload, KEY_LEN, KEY_LEN + MAX_PACKET_SIZE)
        return cls(bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:]))

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.src, self.packet)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """0x06: empty; no reply expected."""

    frame_type: ClassVar[FrameType] = FrameType.KEEP_ALIVE

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_exact("KeepAlive", payload, 0)
        return cls()

    def encode(self) -> bytes:
        return _frame(self.frame_type)


@dataclass(frozen=True, slots=True)
class NotePreferred:
    """0x07: one byte, non-zero when this region is the client's home (stats only)."""

    frame_type: ClassVar[FrameType] = FrameType.NOTE_PREFERRED
    preferred: bool

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_exact("NotePreferred", payload, 1)
        return cls(payload[0] != 0)

    def encode(self) -> bytes:
        return _frame(self.frame_type, b"\x01" if self.preferred else b"\x00")


@dataclass(frozen=True, slots=True)
class PeerGone:
    """0x08: key | reason. `reason` is None when an old server sent the key alone (§2.3).

    Bytes after the reason are ignored (room for extension).
    """

    frame_type: ClassVar[FrameType] = FrameType.PEER_GONE
    key: bytes
    reason: int | None = PeerGoneReason.DISCONNECTED

    def __post_init__(self) -> None:
        _check_key("key", self.key)
        if self.reason is not None and not 0 <= self.reason <= 0xFF:
            raise LocalProtocolError(f"PeerGone reason {self.reason} is not a byte")

    @property
    def effective_reason(self) -> int:
        """The reason, with an absent byte read as Disconnected (what old servers meant)."""
        return PeerGoneReason.DISCONNECTED if self.reason is None else self.reason

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("PeerGone", payload, KEY_LEN, _MAX_CONTROL_LEN)
        reason: int | None = None
        if len(payload) > KEY_LEN:
            reason = payload[KEY_LEN]
            if reason in _KNOWN_REASONS:
                reason = PeerGoneReason(reason)
        return cls(bytes(payload[:KEY_LEN]), reason)

    def encode(self) -> bytes:
        if self.reason is None:
            return _frame(self.frame_type, self.key)
        return _frame(self.frame_type, self.key, bytes((self.reason,)))


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """0x09: key | ip(16) | port(2) | flags(1), mesh watchers only (§2.3, §4.4).

    `endpoint` is None when the server sent no address or an all-zero one; an IPv4-mapped
    address is un-mapped. `flags` is None when the server sent no flags byte. Encoding writes 32
    bytes (no endpoint, no flags), 50 (endpoint, no flags) or 51 (flags; zero address if none),
    and maps IPv4 to ::ffff:a.b.c.d as derper does.
    """

    frame_type: ClassVar[FrameType] = FrameType.PEER_PRESENT
    key: bytes
    endpoint: tuple[_IPAddress, int] | None = None
    flags: PeerPresentFlags | None = None

    def __post_init__(self) -> None:
        _check_key("key", self.key)
        if self.endpoint is not None and not 0 <= self.endpoint[1] <= 0xFFFF:
            raise LocalProtocolError(f"port {self.endpoint[1]} out of range")
        if self.flags is not None and not 0 <= self.flags <= 0xFF:
            raise LocalProtocolError(f"flags {self.flags} are not a byte")

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("PeerPresent", payload, KEY_LEN, _MAX_CONTROL_LEN)
        n = len(payload)
        if KEY_LEN < n < _PEER_ADDR_END:
            raise MalformedPacket(f"PeerPresent: truncated address ({n} bytes)")
        endpoint: tuple[_IPAddress, int] | None = None
        if n >= _PEER_ADDR_END:
            raw_ip = bytes(payload[KEY_LEN : KEY_LEN + 16])
            (port,) = _PORT.unpack_from(payload, KEY_LEN + 16)
            if raw_ip != _ZERO_IP or port:
                ip6 = ipaddress.IPv6Address(raw_ip)
                ip: _IPAddress = ip6.ipv4_mapped or ip6
                endpoint = (ip, port)
        flags = PeerPresentFlags(payload[_PEER_ADDR_END]) if n > _PEER_ADDR_END else None
        return cls(bytes(payload[:KEY_LEN]), endpoint, flags)

    def encode(self) -> bytes:
        if self.endpoint is None and self.flags is None:
            return _frame(self.frame_type, self.key)
        addr = _ZERO_IP + b"\x00\x00"
        if self.endpoint is not None:
            ip, port = self.endpoint
            if isinstance(ip, ipaddress.IPv4Address):
                ip = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
            addr = ip.packed + _PORT.pack(port)
        if self.flags is None:
            return _frame(self.frame_type, self.key, addr)
        return _frame(self.frame_type, self.key, addr, bytes((self.flags,)))


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    """0x0a: source key | destination key | packet, between mesh peers only (§4.4)."""

    frame_type: ClassVar[FrameType] = FrameType.FORWARD_PACKET
    src: bytes
    dst: bytes
    packet: bytes

    def __post_init__(self) -> None:
        _check_key("src", self.src)
        _check_key("dst", self.dst)
        _check_packet(self.packet)

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("ForwardPacket", payload, 2 * KEY_LEN, 2 * KEY_LEN + MAX_PACKET_SIZE)
        return cls(
            bytes(payload[:KEY_LEN]),
            bytes(payload[KEY_LEN : 2 * KEY_LEN]),
            bytes(payload[2 * KEY_LEN :]),
        )

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.src, self.dst, self.packet)


@dataclass(frozen=True, slots=True)
class WatchConns:
    """0x10: empty; a mesh peer asks for PeerPresent/PeerGone about every client."""

    frame_type: ClassVar[FrameType] = FrameType.WATCH_CONNS

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_exact("WatchConns", payload, 0)
        return cls()

    def encode(self) -> bytes:
        return _frame(self.frame_type)


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """0x11: key whose every local connection the server must close (mesh only)."""

    frame_type: ClassVar[FrameType] = FrameType.CLOSE_PEER
    key: bytes

    def __post_init__(self) -> None:
        _check_key("key", self.key)

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_exact("ClosePeer", payload, KEY_LEN)
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.key)


@dataclass(frozen=True, slots=True)
class Ping:
    """0x12: 8 opaque bytes; bytes after the 8th (up to 1000 in all) are discarded."""

    frame_type: ClassVar[FrameType] = FrameType.PING
    data: bytes

    def __post_init__(self) -> None:
        _check_echo(self.data)

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        return cls(_parse_echo("Ping", payload))

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.data)


@dataclass(frozen=True, slots=True)
class Pong:
    """0x13: the 8 bytes of the Ping it answers; later bytes are discarded."""

    frame_type: ClassVar[FrameType] = FrameType.PONG
    data: bytes

    def __post_init__(self) -> None:
        _check_echo(self.data)

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        return cls(_parse_echo("Pong", payload))

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.data)


@dataclass(frozen=True, slots=True)
class Health:
    """0x14: UTF-8 problem text from the server; empty means healthy again."""

    frame_type: ClassVar[FrameType] = FrameType.HEALTH
    text: str

    def __post_init__(self) -> None:
        if len(self.text.encode()) > _MAX_HEALTH_LEN:
            raise LocalProtocolError("health text too long")

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("Health", payload, 0, _MAX_HEALTH_LEN)
        try:
            text = bytes(payload).decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacket("Health: text is not UTF-8") from exc
        return cls(text)

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.text.encode())


@dataclass(frozen=True, slots=True)
class Restarting:
    """0x15: server restarting; reconnect after `reconnect_in` ms, keep trying for `try_for` ms."""

    frame_type: ClassVar[FrameType] = FrameType.RESTARTING
    reconnect_in: int
    try_for: int

    def __post_init__(self) -> None:
        for value in (self.reconnect_in, self.try_for):
            if not 0 <= value <= _U32_MAX:
                raise LocalProtocolError(f"Restarting field {value} does not fit a u32")

    @classmethod
    def parse(cls, payload: _Buffer) -> Self:
        _check_bounds("Restarting", payload, _U32_PAIR.size, _MAX_CONTROL_LEN)
        reconnect_in, try_for = _U32_PAIR.unpack_from(payload)
        return cls(reconnect_in, try_for)

    def encode(self) -> bytes:
        return _frame(self.frame_type, _U32_PAIR.pack(self.reconnect_in, self.try_for))


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame of a type this codec does not know; receivers skip it (§2.3)."""

    frame_type: int
    payload: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.frame_type <= 0xFF:
            raise LocalProtocolError(f"frame type {self.frame_type} is not a byte")

    def encode(self) -> bytes:
        return _frame(self.frame_type, self.payload)


Frame: TypeAlias = (
    ServerKey | ClientInfo | ServerInfo | SendPacket | RecvPacket | KeepAlive | NotePreferred
    | PeerGone | PeerPresent | ForwardPacket | WatchConns | ClosePeer | Ping | Pong | Health
    | Restarting | UnknownFrame
)  # fmt: skip

_KNOWN: Final = (
    ServerKey, ClientInfo, ServerInfo, SendPacket, RecvPacket, KeepAlive, NotePreferred, PeerGone,
    PeerPresent, ForwardPacket, WatchConns, ClosePeer, Ping, Pong, Health, Restarting,
)  # fmt: skip
_PARSERS: Final[dict[int, Callable[[_Buffer], Frame]]] = {
    cls.frame_type: cls.parse for cls in _KNOWN
}

# Largest payload each known type may carry; checked against the header before buffering.
_MAX_PAYLOAD: Final[dict[int, int]] = {
    FrameType.SERVER_KEY: MAX_SERVER_KEY_LEN,     FrameType.CLIENT_INFO: MAX_CLIENT_INFO_LEN,
    FrameType.SERVER_INFO: NONCE_LEN + MAX_INFO_LEN,
    FrameType.SEND_PACKET: KEY_LEN + MAX_PACKET_SIZE,
    FrameType.RECV_PACKET: KEY_LEN + MAX_PACKET_SIZE,
    FrameType.FORWARD_PACKET: 2 * KEY_LEN + MAX_PACKET_SIZE,
    FrameType.KEEP_ALIVE: 0,                      FrameType.NOTE_PREFERRED: 1,
    FrameType.PEER_GONE: _MAX_CONTROL_LEN,        FrameType.PEER_PRESENT: _MAX_CONTROL_LEN,
    FrameType.WATCH_CONNS: 0,                     FrameType.CLOSE_PEER: KEY_LEN,
    FrameType.PING: MAX_PING_LEN,                 FrameType.PONG: MAX_PING_LEN,
    FrameType.HEALTH: _MAX_HEALTH_LEN,            FrameType.RESTARTING: _MAX_CONTROL_LEN,
}  # fmt: skip


def max_payload_len(frame_type: int) -> int | None:
    """The largest payload a known frame type may carry, or None for an unknown type."""
    return _MAX_PAYLOAD.get(frame_type)


def parse_frame(frame_type: int, payload: _Buffer) -> Frame:
    """Parse one payload by its type byte; unknown types become UnknownFrame."""
    parse = _PARSERS.get(frame_type)
    if parse is None:
        if not 0 <= frame_type <= 0xFF:
            raise MalformedPacket(f"frame type {frame_type} is not a byte")
        return UnknownFrame(frame_type, bytes(payload))
    return parse(payload)


def parse_any(data: _Buffer) -> Frame:
    """Parse exactly one complete frame, header included."""
    if len(data) < FRAME_HEADER_LEN:
        raise MalformedPacket(f"frame of {len(data)} bytes is shorter than its header")
    frame_type, length = FRAME_HEADER.unpack_from(data)
    if length != len(data) - FRAME_HEADER_LEN:
        raise MalformedPacket(f"header says {length} bytes, got {len(data) - FRAME_HEADER_LEN}")
    return parse_frame(frame_type, memoryview(data)[FRAME_HEADER_LEN:])


# --- boxes (§3.3-§3.5) --------------------------------------------------------------------------


def _seal(private: bytes, public: bytes, info: dict[str, Any], nonce: bytes) -> bytes:
    _check_key("private key", private)
    _check_key("public key", public)
    if len(nonce) != NONCE_LEN:
        raise LocalProtocolError(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")
    message = json.dumps(info, separators=(",", ":")).encode()
    sealed: bytes = bytes(Box(PrivateKey(private), PublicKey(public)).encrypt(message, nonce))
    return sealed


def _open(private: bytes, public: bytes, sealed: bytes, what: str) -> dict[str, Any]:
    _check_key("private key", private)
    if len(public) != KEY_LEN or public == _ZERO_KEY:
        raise MalformedPacket(f"{what}: bad peer key")
    if len(sealed) < NONCE_LEN + BOX_OVERHEAD:
        raise MalformedPacket(f"{what}: box of {len(sealed)} bytes is too short")
    try:
        message = Box(PrivateKey(private), PublicKey(public)).decrypt(
            sealed[NONCE_LEN:], sealed[:NONCE_LEN]
        )
    except CryptoError as exc:
        raise AuthenticationFailed(f"{what}: box does not open") from exc
    try:
        info = json.loads(bytes(message))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise MalformedPacket(f"{what}: box does not hold JSON") from exc
    if not isinstance(info, dict):
        raise MalformedPacket(f"{what}: JSON is not an object")
    return info


def seal_client_info(
    client_private: bytes, server_public: bytes, info: dict[str, Any], nonce: bytes
) -> bytes:
    """nonce | box of compact JSON `info`, client private key to server public key.

    The caller draws the nonce from its injected `randbytes(NONCE_LEN)`; tailscaled sends
    `{"version": 2, "CanAckPings": true}` (dict order is kept).
    """
    return _seal(client_private, server_public, info, nonce)


def open_client_info(server_private: bytes, client_public: bytes, sealed: bytes) -> dict[str, Any]:
    """The JSON object in a ClientInfo box. AuthenticationFailed if it does not open."""
    return _open(server_private, client_public, sealed, "ClientInfo")


def seal_server_info(
    server_private: bytes, client_public: bytes, info: dict[str, Any], nonce: bytes
) -> bytes:
    """nonce | box of compact JSON `info` (derper sends `{"version": 2}`), server to client."""
    return _seal(server_private, client_public, info, nonce)


def open_server_info(client_private: bytes, server_public: bytes, sealed: bytes) -> dict[str, Any]:
    """The JSON object in a ServerInfo box. AuthenticationFailed if it does not open."""
    return _open(client_private, server_public, sealed, "ServerInfo")


# --- stream parser ------------------------------------------------------------------------------


class FrameBuffer:
    """Streaming frame parser: `feed` stream bytes, get back every frame they complete.

    A header over `max_frame_size` (or its known type's largest payload) raises FrameTooLarge as
    soon as its 5 bytes are in, before any body is kept. Any error, including a complete frame
    that does not parse, is fatal as it is for derper: frames completed earlier in the same call
    go with it, and every later call raises. `feed_raw` frames without parsing, for callers that
    prefer to parse (and drop) frames one at a time.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if max_frame_size < 0:
            raise LocalProtocolError("max_frame_size must not be negative")
        # Static after construction.
        self.max_frame_size = max_frame_size
        # Owned by feed_raw.
        self._buf = bytearray()
        self._type = 0
        self._need: int | None = None  # payload length of the frame being read; None = in header
        self._error: RemoteProtocolError | None = None

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete header or frame."""
        return len(self._buf)

    def feed(self, data: _Buffer) -> list[Frame]:
        """Add stream bytes; return the frames they complete, parsed."""
        raw = self.feed_raw(data)
        try:
            return [parse_frame(frame_type, payload) for frame_type, payload in raw]
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def feed_raw(self, data: _Buffer) -> list[tuple[int, bytes]]:
        """Add stream bytes; return `(type, payload)` for each frame they complete."""
        if self._error is not None:
            raise type(self._error)(f"stream failed earlier: {self._error}")
        view = memoryview(data).cast("B")
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(view)
        buf = self._buf
        try:
            while True:
                if self._need is None:
                    take = min(FRAME_HEADER_LEN - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < FRAME_HEADER_LEN:
                        break
                    frame_type, length = FRAME_HEADER.unpack(buf)
                    buf.clear()
                    self._check_length(frame_type, length)
                    self._type, self._need = frame_type, length
                need = self._need
                if not buf and end - pos >= need:
                    out.append((self._type, bytes(view[pos : pos + need])))
                    pos += need
                else:
                    take = min(need - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < need:
                        break
                    out.append((self._type, bytes(buf)))
                    buf.clear()
                self._need = None
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return out

    def _check_length(self, frame_type: int, length: int) -> None:
        limit = self.max_frame_size
        type_limit = _MAX_PAYLOAD.get(frame_type)
        if type_limit is not None:
            limit = min(limit, type_limit)
        if length > limit:
            raise FrameTooLarge(f"frame type {frame_type:#04x} of {length} bytes (limit {limit})")

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._buf = bytearray()
        self._need = None
