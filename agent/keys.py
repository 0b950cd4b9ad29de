"""Typed 32-byte keys: WireGuard base64 and UAPI hex forms, short log form, constant-time equality.

A private key never appears in repr() or str(). NodePrivate/NodePublic are the WireGuard static
keys (also the DERP address); DiscoPrivate/DiscoPublic are the DISCO keys.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from typing import Self

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = [
    "KEY_LEN",
    "KeyError_",
    "Key32",
    "NodePublic",
    "NodePrivate",
    "DiscoPublic",
    "DiscoPrivate",
    "PresharedKey",
    "clamp",
]

KEY_LEN = 32


class KeyError_(ValueError):  # noqa: N801 - avoid shadowing the builtin KeyError
    """A key's text or bytes are not a valid 32-byte key."""


def clamp(raw: bytes) -> bytes:
    """Curve25519 private key clamping, as `wg genkey` does."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


class Key32:
    """32 raw bytes with base64/hex codecs; subclasses say what the key is for."""

    __slots__ = ("_hash", "_raw")
    _secret = False

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise KeyError_(f"a key is {KEY_LEN} bytes, got {len(raw)}")
        self._raw = bytes(raw)
        # computed once: keys are dict keys on the packet path (several lookups per batch)
        self._hash = hash((type(self).__name__, self._raw))

    @property
    def raw(self) -> bytes:
        return self._raw

    @classmethod
    def from_b64(cls, text: str) -> Self:
        text = text.strip()
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise KeyError_("not valid base64") from e
        if len(raw) != KEY_LEN:
            raise KeyError_(f"base64 decodes to {len(raw)} bytes, a key is {KEY_LEN}")
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        try:
            raw = bytes.fromhex(text.strip())
        except ValueError as e:
            raise KeyError_("not valid hex") from e
        return cls(raw)

    def to_b64(self) -> str:
        return base64.b64encode(self._raw).decode()

    def to_hex(self) -> str:
        return self._raw.hex()

    def is_zero(self) -> bool:
        return hmac.compare_digest(self._raw, bytes(KEY_LEN))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Key32)
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        if self._secret:
            return f"{type(self).__name__}(<secret>)"
        return f"[{self.to_b64()[:5]}]"

    def __repr__(self) -> str:
        if self._secret:
            return f"{type(self).__name__}(<secret>)"
        return f"{type(self).__name__}({self.to_b64()!r})"


class NodePublic(Key32):
    """A node's WireGuard static public key; also its DERP address."""

    __slots__ = ()


class NodePrivate(Key32):
    """A node's WireGuard static private key (clamped on generation)."""

    __slots__ = ()
    _secret = True

    @classmethod
    def generate(cls) -> Self:
        return cls(clamp(secrets.token_bytes(KEY_LEN)))

    def public(self) -> NodePublic:
        return NodePublic(_x25519_public(self._raw))


class DiscoPublic(Key32):
    """A node's DISCO public key."""

    __slots__ = ()


class DiscoPrivate(Key32):
    """A node's DISCO private key."""

    __slots__ = ()
    _secret = True

    @classmethod
    def generate(cls) -> Self:
        return cls(clamp(secrets.token_bytes(KEY_LEN)))

    def public(self) -> DiscoPublic:
        return DiscoPublic(_x25519_public(self._raw))


class PresharedKey(Key32):
    """A WireGuard preshared key (symmetric, 32 bytes)."""

    __slots__ = ()
    _secret = True

    @classmethod
    def generate(cls) -> Self:
        return cls(secrets.token_bytes(KEY_LEN))


def _x25519_public(private_raw: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes_raw()
