"""Login frames: ServerKey, ClientInfo and ServerInfo, and the NaCl boxes they carry (tailscale
derp/derp_client.go and derp/derpserver/derpserver.go).

A box is NaCl crypto_box (X25519 + XSalsa20-Poly1305, tailscale types/key/node.go SealTo):
`nonce | tag(16) | ciphertext`, exactly what PyNaCl's `Box(priv, pub).encrypt(msg, nonce)`
returns; the caller supplies the nonce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from agent.proto.derp.frames.header import (
    BOX_OVERHEAD,
    KEY_LEN,
    MAGIC,
    MAX_CLIENT_INFO_LEN,
    MAX_INFO_LEN,
    MAX_SERVER_KEY_LEN,
    NONCE_LEN,
    ZERO_KEY,
    Buffer,
    FrameType,
    check_bounds,
    check_key,
    encode_frame,
)
from agent.proto.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    MalformedPacket,
)

__all__ = [
    "ServerKey",
    "ClientInfo",
    "ServerInfo",
    "seal_client_info",
    "open_client_info",
    "seal_server_info",
    "open_server_info",
]


@dataclass(frozen=True, slots=True)
class ServerKey:
    """0x01: magic | server public key. Bytes after the first 40 are ignored (derp_client.go
    recvServerKey)."""

    frame_type: ClassVar[FrameType] = FrameType.SERVER_KEY
    key: bytes

    def __post_init__(self) -> None:
        check_key("server key", self.key)

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("ServerKey", payload, len(MAGIC) + KEY_LEN, MAX_SERVER_KEY_LEN)
        if bytes(payload[: len(MAGIC)]) != MAGIC:
            raise MalformedPacket("ServerKey: bad magic")
        return cls(bytes(payload[len(MAGIC) : len(MAGIC) + KEY_LEN]))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, MAGIC, self.key)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """0x02: client key | sealed, where sealed = nonce | box(JSON) (derp_client.go
    sendClientKey)."""

    frame_type: ClassVar[FrameType] = FrameType.CLIENT_INFO
    key: bytes
    sealed: bytes

    def __post_init__(self) -> None:
        check_key("client key", self.key)
        if not NONCE_LEN <= len(self.sealed) <= MAX_CLIENT_INFO_LEN - KEY_LEN:
            raise LocalProtocolError(f"sealed ClientInfo of {len(self.sealed)} bytes")

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("ClientInfo", payload, KEY_LEN + NONCE_LEN, MAX_CLIENT_INFO_LEN)
        key = bytes(payload[:KEY_LEN])
        if key == ZERO_KEY:
            raise MalformedPacket("ClientInfo: all-zero client key")
        return cls(key, bytes(payload[KEY_LEN:]))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.key, self.sealed)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """0x03: sealed = nonce | box(JSON), server private key to client public key
    (derpserver.go sendServerInfo)."""

    frame_type: ClassVar[FrameType] = FrameType.SERVER_INFO
    sealed: bytes

    def __post_init__(self) -> None:
        if not NONCE_LEN <= len(self.sealed) <= NONCE_LEN + MAX_INFO_LEN:
            raise LocalProtocolError(f"sealed ServerInfo of {len(self.sealed)} bytes")

    @classmethod
    def parse(cls, payload: Buffer) -> Self:
        check_bounds("ServerInfo", payload, NONCE_LEN, NONCE_LEN + MAX_INFO_LEN)
        return cls(bytes(payload))

    def encode(self) -> bytes:
        return encode_frame(self.frame_type, self.sealed)


def _seal(private: bytes, public: bytes, info: dict[str, Any], nonce: bytes) -> bytes:
    check_key("private key", private)
    check_key("public key", public)
    if len(nonce) != NONCE_LEN:
        raise LocalProtocolError(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")
    message = json.dumps(info, separators=(",", ":")).encode()
    sealed: bytes = bytes(Box(PrivateKey(private), PublicKey(public)).encrypt(message, nonce))
    return sealed


def _open(private: bytes, public: bytes, sealed: bytes, what: str) -> dict[str, Any]:
    check_key("private key", private)
    if len(public) != KEY_LEN or public == ZERO_KEY:
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
