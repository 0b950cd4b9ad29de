"""Presence frames: NotePreferred, PeerGone, PeerPresent, WatchConns, ClosePeer.

Layouts from tailscale derp/derp.go; derp/derpserver/derpserver.go sends and receives them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from agent.proto.derp.frames.header import (
    KEY_LEN,
    MAX_CONTROL_LEN,
    Buffer,
    FrameType,
    IPAddress,
    PeerGoneReason,
    PeerPresentFlags,
    check_bounds,
    check_exact,
    check_key,
    encode_frame,
)
from agent.proto.errors import (
    LocalProtocolError,
    MalformedPacket,
)

__all__ = [
    "NotePreferred",
    "PeerGone",
    "PeerPresent",
    "WatchConns",
    "ClosePeer",
]

_PORT: Final = struct.Struct(">H")
_ZERO_IP: Final = bytes(16)
_PEER_ADDR_END: Final = KEY_LEN + 16 + 2  # PeerPresent key | ip | port
_KNOWN_REASONS: Final = frozenset(PeerGoneReason)


@dataclass(frozen=True, slots=True)
class NotePreferred:
    """0x07: one byte, non-zero when this region is the client's home (stats only)."""

    frame_type: ClassVar[FrameType] = FrameType.NOTE_PREFERRED
    preferred: bool

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_exact("NotePreferred", payload, 1)
        return cls(payload[0] != 0)

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, b"\x01" if self.preferred else b"\x00")


@dataclass(frozen=True, slots=True)
class PeerGone:
    """0x08: key | reason. `reason` is None when an old server sent the key alone
    (derp.go framePeerGone).

    Bytes after the reason are ignored (room for extension).
    """

    frame_type: ClassVar[FrameType] = FrameType.PEER_GONE
    key: bytes
    reason: int | None = PeerGoneReason.DISCONNECTED

    def __post_init__(self) -> None:
        check_key("key", self.key)
        if self.reason is not None and not 0 <= self.reason <= 0xFF:
            raise LocalProtocolError(f"PeerGone reason {self.reason} is not a byte")

    @property
    def effective_reason(self) -> int:
        """The reason, with an absent byte read as Disconnected (what old servers meant)."""
        return PeerGoneReason.DISCONNECTED if self.reason is None else self.reason

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("PeerGone", payload, KEY_LEN, MAX_CONTROL_LEN)
        reason: int | None = None
        if len(payload) > KEY_LEN:
            reason = payload[KEY_LEN]
            if reason in _KNOWN_REASONS:
                reason = PeerGoneReason(reason)
        return cls(bytes(payload[:KEY_LEN]), reason)

    def encode(self) -> bytes:
        if self.reason is None:
            return encode_frame(self.frame_type, self.key)
        return encode_frame(self.frame_type, self.key, bytes((self.reason,)))


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """0x09: key | ip(16) | port(2) | flags(1), mesh watchers only (derp.go framePeerPresent).

    `endpoint` is None when the server sent no address or an all-zero one; an IPv4-mapped
    address is un-mapped. `flags` is None when the server sent no flags byte. Encoding writes 32
    bytes (no endpoint, no flags), 50 (endpoint, no flags) or 51 (flags; zero address if none),
    and maps IPv4 to ::ffff:a.b.c.d as derper does.
    """

    frame_type: ClassVar[FrameType] = FrameType.PEER_PRESENT
    key: bytes
    endpoint: tuple[IPAddress, int] | None = None
    flags: PeerPresentFlags | None = None

    def __post_init__(self) -> None:
        check_key("key", self.key)
        if self.endpoint is not None and not 0 <= self.endpoint[1] <= 0xFFFF:
            raise LocalProtocolError(f"port {self.endpoint[1]} out of range")
        if self.flags is not None and not 0 <= self.flags <= 0xFF:
            raise LocalProtocolError(f"flags {self.flags} are not a byte")

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("PeerPresent", payload, KEY_LEN, MAX_CONTROL_LEN)
        n = len(payload)
        if KEY_LEN < n < _PEER_ADDR_END:
            raise MalformedPacket(f"PeerPresent: truncated address ({n} bytes)")
        endpoint: tuple[IPAddress, int] | None = None
        if n >= _PEER_ADDR_END:
            raw_ip = bytes(payload[KEY_LEN : KEY_LEN + 16])
            (port,) = _PORT.unpack_from(payload, KEY_LEN + 16)
            if raw_ip != _ZERO_IP or port:
                ip6 = ipaddress.IPv6Address(raw_ip)
                ip: IPAddress = ip6.ipv4_mapped or ip6
                endpoint = (ip, port)
        flags = PeerPresentFlags(payload[_PEER_ADDR_END]) if n > _PEER_ADDR_END else None
        return cls(bytes(payload[:KEY_LEN]), endpoint, flags)

    def encode(self) -> bytes:
        if self.endpoint is None and self.flags is None:
            return encode_frame(self.frame_type, self.key)
        addr = _ZERO_IP + b"\x00\x00"
        if self.endpoint is not None:
            ip, port = self.endpoint
            if isinstance(ip, ipaddress.IPv4Address):
                ip = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
            addr = ip.packed + _PORT.pack(port)
        if self.flags is None:
            return encode_frame(self.frame_type, self.key, addr)
        return encode_frame(self.frame_type, self.key, addr, bytes((self.flags,)))


@dataclass(frozen=True, slots=True)
class WatchConns:
    """0x10: empty; a mesh peer asks for PeerPresent/PeerGone about every client."""

    frame_type: ClassVar[FrameType] = FrameType.WATCH_CONNS

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_exact("WatchConns", payload, 0)
        return cls()

    def encode(self) -> bytes:
        return encode_frame(self.frame_type)


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """0x11: key whose every local connection the server must close (mesh only)."""

    frame_type: ClassVar[FrameType] = FrameType.CLOSE_PEER
    key: bytes

    def __post_init__(self) -> None:
        check_key("key", self.key)

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_exact("ClosePeer", payload, KEY_LEN)
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.key)
