"""Connection-control frames (tailscale derp/derp.go): KeepAlive, Ping, Pong, Health,
Restarting, and UnknownFrame for any type byte this codec does not know.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from agent.proto.derp.frames.header import (
    MAX_CONTROL_LEN,
    MAX_HEALTH_LEN,
    MAX_PING_LEN,
    Buffer,
    FrameType,
    check_bounds,
    check_exact,
    encode_frame,
)
from agent.proto.errors import (
    LocalProtocolError,
    MalformedPacket,
)

__all__ = [
    "KeepAlive",
    "Ping",
    "Pong",
    "Health",
    "Restarting",
    "UnknownFrame",
]

_U32_PAIR: Final = struct.Struct(">II")
_U32_MAX: Final = 0xFFFFFFFF


def _check_echo(data: bytes) -> None:
    if len(data) != 8:
        raise LocalProtocolError(f"ping/pong data must be 8 bytes, got {len(data)}")


def _parse_echo(name: str, payload: Buffer) -> bytes:
    check_bounds(name, payload, 8, MAX_PING_LEN)
    return bytes(payload[:8])


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """0x06: empty; no reply expected."""

    frame_type: ClassVar[FrameType] = FrameType.KEEP_ALIVE

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_exact("KeepAlive", payload, 0)
        return cls()

    def encode(self) -> bytes:
        return encode_frame(self.frame_type)


@dataclass(frozen=True, slots=True)
class Ping:
    """0x12: 8 opaque bytes; bytes after the 8th (up to 1000 in all) are discarded."""

    frame_type: ClassVar[FrameType] = FrameType.PING
    data: bytes

    def __post_init__(self) -> None:
        _check_echo(self.data)

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        return cls(_parse_echo("Ping", payload))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.data)


@dataclass(frozen=True, slots=True)
class Pong:
    """0x13: the 8 bytes of the Ping it answers; later bytes are discarded."""

    frame_type: ClassVar[FrameType] = FrameType.PONG
    data: bytes

    def __post_init__(self) -> None:
        _check_echo(self.data)

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        return cls(_parse_echo("Pong", payload))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.data)


@dataclass(frozen=True, slots=True)
class Health:
    """0x14: UTF-8 problem text from the server; empty means healthy again."""

    frame_type: ClassVar[FrameType] = FrameType.HEALTH
    text: str

    def __post_init__(self) -> None:
        if len(self.text.encode()) > MAX_HEALTH_LEN:
            raise LocalProtocolError("health text too long")

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("Health", payload, 0, MAX_HEALTH_LEN)
        try:
            text = bytes(payload).decode()
        except UnicodeDecodeError as exc:
            raise MalformedPacket("Health: text is not UTF-8") from exc
        return cls(text)

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.text.encode())


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
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("Restarting", payload, _U32_PAIR.size, MAX_CONTROL_LEN)
        reconnect_in, try_for = _U32_PAIR.unpack_from(payload)
        return cls(reconnect_in, try_for)

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, _U32_PAIR.pack(self.reconnect_in, self.try_for))


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame of a type this codec does not know; receivers skip it (derp/derp_client.go Recv)."""

    frame_type: int
    payload: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.frame_type <= 0xFF:
            raise LocalProtocolError(f"frame type {self.frame_type} is not a byte")

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.payload)
