"""Packet frames (tailscale derp/derp.go): SendPacket, RecvPacket and the mesh's ForwardPacket."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from agent.proto.derp.frames.header import (
    KEY_LEN,
    MAX_PACKET_SIZE,
    Buffer,
    FrameType,
    check_bounds,
    check_key,
    check_packet,
    encode_frame,
)

__all__ = [
    "SendPacket",
    "RecvPacket",
    "ForwardPacket",
]


@dataclass(frozen=True, slots=True)
class SendPacket:
    """0x04: destination key | packet (client to server)."""

    frame_type: ClassVar[FrameType] = FrameType.SEND_PACKET
    dst: bytes
    packet: bytes

    def __post_init__(self) -> None:
        check_key("dst", self.dst)
        check_packet(self.packet)

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("SendPacket", payload, KEY_LEN, KEY_LEN + MAX_PACKET_SIZE)
        return cls(bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:]))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.dst, self.packet)


@dataclass(frozen=True, slots=True)
class RecvPacket:
    """0x05: source key | packet (server to client, protocol v2)."""

    frame_type: ClassVar[FrameType] = FrameType.RECV_PACKET
    src: bytes
    packet: bytes

    def __post_init__(self) -> None:
        check_key("src", self.src)
        check_packet(self.packet)

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("RecvPacket", payload, KEY_LEN, KEY_LEN + MAX_PACKET_SIZE)
        return cls(bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:]))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.src, self.packet)


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    """0x0a: source key | destination key | packet, between mesh peers only
    (derpserver.go handleFrameForwardPacket)."""

    frame_type: ClassVar[FrameType] = FrameType.FORWARD_PACKET
    src: bytes
    dst: bytes
    packet: bytes

    def __post_init__(self) -> None:
        check_key("src", self.src)
        check_key("dst", self.dst)
        check_packet(self.packet)

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("ForwardPacket", payload, 2 * KEY_LEN, 2 * KEY_LEN + MAX_PACKET_SIZE)
        return cls(
            bytes(payload[:KEY_LEN]),
            bytes(payload[KEY_LEN : 2 * KEY_LEN]),
            bytes(payload[2 * KEY_LEN :]),
        )

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.src, self.dst, self.packet)
