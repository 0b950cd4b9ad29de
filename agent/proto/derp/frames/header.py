"""DERP frame header, type bytes, limits and the helpers every frame codec uses (derp/derp.go).

Every frame is a 5-byte header (type, u32 BE length) and a payload; MAX_PAYLOAD bounds each
known type's payload, and is checked against the header before any body is buffered.
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum, IntFlag
from typing import Final, TypeAlias

from agent.proto.errors import (
    LocalProtocolError,
    MalformedPacket,
    RemoteProtocolError,
)

__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "KEY_LEN",
    "NONCE_LEN",
    "BOX_OVERHEAD",
    "FRAME_HEADER_LEN",
    "MAX_PACKET_SIZE",
    "MAX_INFO_LEN",
    "MAX_FRAME_SIZE",
    "MAX_WRITTEN_FRAME_SIZE",
    "MAX_CLIENT_INFO_LEN",
    "MAX_SERVER_KEY_LEN",
    "MAX_PING_LEN",
    "KEEPALIVE_INTERVAL",
    "KEEPALIVE_JITTER",
    "CLIENT_READ_TIMEOUT",
    "MAX_CONTROL_LEN",
    "MAX_HEALTH_LEN",
    "MAX_PAYLOAD",
    "FRAME_HEADER",
    "ZERO_KEY",
    "Buffer",
    "IPAddress",
    "FrameType",
    "PeerGoneReason",
    "PeerPresentFlags",
    "FrameTooLarge",
    "max_payload_len",
    "encode_header",
    "encode_frame",
    "check_key",
    "check_packet",
    "check_bounds",
    "check_exact",
]

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
MAX_CONTROL_LEN: Final = 1024
MAX_HEALTH_LEN: Final = MAX_PACKET_SIZE

FRAME_HEADER: Final = struct.Struct(">BI")
ZERO_KEY: Final = bytes(KEY_LEN)

Buffer: TypeAlias = bytes | bytearray | memoryview
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class FrameType(IntEnum):
    """Frame type byte (tailscale derp/derp.go frameType)."""

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


class PeerPresentFlags(IntFlag):
    """PeerPresent flag bits; zero means an old server that sends no flags."""

    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


class FrameTooLarge(RemoteProtocolError):
    """A frame header announced more payload than allowed for its type or this stream."""


# Largest payload each known type may carry; checked against the header before buffering.
MAX_PAYLOAD: Final[dict[int, int]] = {
    FrameType.SERVER_KEY: MAX_SERVER_KEY_LEN,     FrameType.CLIENT_INFO: MAX_CLIENT_INFO_LEN,
    FrameType.SERVER_INFO: NONCE_LEN + MAX_INFO_LEN,
    FrameType.SEND_PACKET: KEY_LEN + MAX_PACKET_SIZE,
    FrameType.RECV_PACKET: KEY_LEN + MAX_PACKET_SIZE,
    FrameType.FORWARD_PACKET: 2 * KEY_LEN + MAX_PACKET_SIZE,
    FrameType.KEEP_ALIVE: 0,                      FrameType.NOTE_PREFERRED: 1,
    FrameType.PEER_GONE: MAX_CONTROL_LEN,         FrameType.PEER_PRESENT: MAX_CONTROL_LEN,
    FrameType.WATCH_CONNS: 0,                     FrameType.CLOSE_PEER: KEY_LEN,
    FrameType.PING: MAX_PING_LEN,                 FrameType.PONG: MAX_PING_LEN,
    FrameType.HEALTH: MAX_HEALTH_LEN,             FrameType.RESTARTING: MAX_CONTROL_LEN,
}  # fmt: skip


def max_payload_len(frame_type: int) -> int | None:
    """The largest payload a known frame type may carry, or None for an unknown type."""
    return MAX_PAYLOAD.get(frame_type)


# --- helpers ------------------------------------------------------------------------------------


def encode_header(ftype: int, length: int) -> bytes:
    if length > MAX_WRITTEN_FRAME_SIZE:
        raise LocalProtocolError(f"frame payload of {length} bytes is too large to write")
    return FRAME_HEADER.pack(ftype, length)


def encode_frame(ftype: int, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return encode_header(ftype, len(payload)) + payload


def check_key(name: str, key: bytes) -> None:
    if len(key) != KEY_LEN:
        raise LocalProtocolError(f"{name} must be {KEY_LEN} bytes, got {len(key)}")


def check_packet(packet: bytes) -> None:
    if len(packet) > MAX_PACKET_SIZE:
        raise LocalProtocolError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")


def check_bounds(name: str, payload: Buffer, low: int, high: int) -> None:
    if not low <= len(payload) <= high:
        raise MalformedPacket(f"{name}: payload of {len(payload)} bytes, need {low}..{high}")


def check_exact(name: str, payload: Buffer, size: int) -> None:
    if len(payload) != size:
        raise MalformedPacket(f"{name}: payload of {len(payload)} bytes, need {size}")
