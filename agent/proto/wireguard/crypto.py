"""WireGuard's cryptographic primitives (whitepaper §5.4): BLAKE2s, HKDF, AEADs, X25519, TAI64N.

    HASH(x)           BLAKE2s-256 of x                                 hash_(*parts)
    MAC(key, x)       keyed BLAKE2s, 16-byte output                    mac(key, x)
    HMAC(key, x)      RFC 2104 over BLAKE2s-256, 64-byte block         hmac_blake2s(key, x)
    KDFn(key, input)  HKDF: prk = HMAC(key, input); t1 = HMAC(prk, 0x1);
                      t(i+1) = HMAC(prk, t(i) || i+1)                  kdf1/kdf2/kdf3
    AEAD(k, n, p, a)  ChaCha20-Poly1305, nonce = 4 zero bytes || LE n  aead_encrypt/aead_decrypt
    XAEAD(k, n, p, a) XChaCha20-Poly1305, 24-byte nonce (cookies)      xaead_encrypt/xaead_decrypt
    DH(priv, pub)     X25519; an all-zero result is refused            dh
    TAI64N()          12-byte timestamp carried in initiations         tai64n

Every failed verification raises AuthenticationFailed (a RemoteProtocolError). Pure computation.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Callable
from typing import Final

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.keys import clamp
from agent.proto.errors import AuthenticationFailed

__all__ = [
    "HASH_LEN",
    "MAC_LEN",
    "KEY_LEN",
    "TAG_LEN",
    "XNONCE_LEN",
    "TAI64N_LEN",
    "hash_",
    "mac",
    "hmac_blake2s",
    "kdf1",
    "kdf2",
    "kdf3",
    "aead_encrypt",
    "aead_decrypt",
    "xaead_encrypt",
    "xaead_decrypt",
    "dh",
    "generate_private",
    "public_from_private",
    "tai64n",
    "tai64n_from_parts",
    "constant_time_equal",
]

HASH_LEN: Final = 32
MAC_LEN: Final = 16
KEY_LEN: Final = 32
TAG_LEN: Final = 16
XNONCE_LEN: Final = 24
TAI64N_LEN: Final = 12

_BLOCK_LEN: Final = 64  # BLAKE2s block size, the HMAC block size
_IPAD: Final = bytes(b ^ 0x36 for b in range(256))
_OPAD: Final = bytes(b ^ 0x5C for b in range(256))
_ZERO32: Final = bytes(32)

_NONCE: Final = struct.Struct("<4xQ")  # 4 zero bytes || counter as little-endian u64
_TAI64N: Final = struct.Struct(">QI")
_TAI64_BASE: Final = 0x400000000000000A  # TAI64 label of 1970-01-01 plus the 10 s TAI-UTC offset
_WHITEN_MASK: Final = ~0xFFFFFF  # wireguard-go clears the low 24 bits of the nanoseconds

_blake2s = hashlib.blake2s
constant_time_equal: Final = hmac.compare_digest


# --- BLAKE2s, HMAC, KDF ------------------------------------------------------------------------


def hash_(*parts: bytes) -> bytes:
    """HASH: BLAKE2s-256 of the concatenation of `parts`."""
    h = _blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """MAC: BLAKE2s keyed with `key` (1..32 bytes), 16-byte output."""
    return _blake2s(data, digest_size=MAC_LEN, key=key).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 with a 64-byte block); key pads are made with bytes.translate."""
    if len(key) > _BLOCK_LEN:
        key = _blake2s(key).digest()
    padded = key.ljust(_BLOCK_LEN, b"\0")
    inner = _blake2s(padded.translate(_IPAD))
    inner.update(data)
    outer = _blake2s(padded.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


def kdf1(key: bytes, input_: bytes) -> bytes:
    """KDF1: the first HKDF output block keyed by `key` (WireGuard: the chaining key)."""
    prk = hmac_blake2s(key, input_)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, input_: bytes) -> tuple[bytes, bytes]:
    """KDF2: the first two HKDF output blocks."""
    prk = hmac_blake2s(key, input_)
    t0 = hmac_blake2s(prk, b"\x01")
    t1 = hmac_blake2s(prk, t0 + b"\x02")
    return t0, t1


def kdf3(key: bytes, input_: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: the first three HKDF output blocks."""
    prk = hmac_blake2s(key, input_)
    t0 = hmac_blake2s(prk, b"\x01")
    t1 = hmac_blake2s(prk, t0 + b"\x02")
    t2 = hmac_blake2s(prk, t1 + b"\x03")
    return t0, t1, t2


# --- AEADs -------------------------------------------------------------------------------------


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 with the WireGuard nonce (4 zero bytes || counter LE u64); ct || tag."""
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Open what aead_encrypt sealed; AuthenticationFailed if the tag does not verify."""
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), ciphertext, ad)
    except InvalidTag:
        raise AuthenticationFailed("AEAD tag mismatch") from None


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 (24-byte nonce); ciphertext || tag."""
    out = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)
    return bytes(out)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Open what xaead_encrypt sealed; AuthenticationFailed if the tag does not verify."""
    if len(ciphertext) < TAG_LEN:
        raise AuthenticationFailed("XAEAD ciphertext shorter than its tag")
    try:
        out = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except nacl.exceptions.CryptoError:
        raise AuthenticationFailed("XAEAD tag mismatch") from None
    return bytes(out)


# --- X25519 ------------------------------------------------------------------------------------


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public); AuthenticationFailed when the shared secret is all zero.

    An all-zero result means `public` is a low-order point: WireGuard rejects it.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError:
        # OpenSSL refuses to return an all-zero secret (and any bad length lands here too,
        # which callers prevent by slicing fixed-size fields).
        raise AuthenticationFailed("X25519 produced an all-zero shared secret") from None
    if constant_time_equal(shared, _ZERO32):
        raise AuthenticationFailed("X25519 produced an all-zero shared secret")
    return shared


def generate_private(randbytes: Callable[[int], bytes]) -> bytes:
    """A fresh clamped X25519 private key drawn from `randbytes`."""
    return clamp(randbytes(KEY_LEN))


def public_from_private(private: bytes) -> bytes:
    """The X25519 public key of `private`."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


# --- TAI64N ------------------------------------------------------------------------------------


def tai64n_from_parts(seconds: int, nanoseconds: int) -> bytes:
    """TAI64N of Unix `seconds` + `nanoseconds`; nanoseconds whitened to 2**24 ns (wireguard-go)."""
    return _TAI64N.pack(_TAI64_BASE + seconds, nanoseconds & _WHITEN_MASK)


def tai64n(wall: float) -> bytes:
    """TAI64N of the Unix wall-clock time `wall` (seconds): 12 bytes, big-endian."""
    seconds = math.floor(wall)
    nanoseconds = min(int((wall - seconds) * 1e9), 999_999_999)
    return tai64n_from_parts(seconds, nanoseconds)
