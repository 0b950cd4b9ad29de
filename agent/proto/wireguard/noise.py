"""Noise symmetric state and the IKpsk2 message steps (Noise Protocol Framework §5.2, §7;
WireGuard whitepaper §5.4).

The protocol-generic half of the handshake: the chaining key `ck`, the handshake hash `h`, and
the MixHash/MixKey/MixKeyAndHash/EncryptAndHash/DecryptAndHash/Split operations over BLAKE2s
HKDF and ChaCha20-Poly1305, then the four message steps of Noise_IKpsk2:

    message 1     -> e, es, s, ss       initiator_write_msg1 / responder_read_msg1
    message 2     <- e, ee, se, psk     responder_write_msg2 / initiator_read_msg2
    split         (initiator-to-responder key, responder-to-initiator key) = KDF2(ck, "")

Nothing here knows WireGuard's message layout, indexes or timestamps (`handshake.py` does), so a
test can run these steps with any prologue and payload (the cacophony vectors). Pure computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from agent.proto.wireguard.constants import CONSTRUCTION, IDENTIFIER
from agent.proto.wireguard.crypto import (
    HASH_LEN,
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    kdf2,
    kdf3,
    public_from_private,
)

__all__ = [
    "INITIAL_CHAINING_KEY",
    "INITIAL_HASH",
    "SymmetricState",
    "initiator_write_msg1",
    "responder_read_msg1",
    "responder_write_msg2",
    "initiator_read_msg2",
]

INITIAL_CHAINING_KEY: Final = hash_(CONSTRUCTION)
INITIAL_HASH: Final = hash_(INITIAL_CHAINING_KEY, IDENTIFIER)


class SymmetricState:
    """Noise SymmetricState: chaining key, handshake hash and the current cipher key and nonce."""

    __slots__ = ("_key", "_nonce", "chaining_key", "hash")

    def __init__(self, chaining_key: bytes, hash_value: bytes) -> None:
        self.chaining_key = chaining_key
        self.hash = hash_value
        self._key: bytes | None = None
        self._nonce = 0

    @classmethod
    def initialize(cls, protocol_name: bytes) -> SymmetricState:
        """InitializeSymmetric: h = name padded to 32 bytes, or HASH(name) if longer; ck = h."""
        if len(protocol_name) <= HASH_LEN:
            h = protocol_name.ljust(HASH_LEN, b"\0")
        else:
            h = hash_(protocol_name)
        return cls(h, h)

    def mix_hash(self, data: bytes) -> None:
        self.hash = hash_(self.hash, data)

    def mix_key(self, input_key_material: bytes) -> None:
        self.chaining_key, self._key = kdf2(self.chaining_key, input_key_material)
        self._nonce = 0

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.chaining_key, temp_h, self._key = kdf3(self.chaining_key, input_key_material)
        self.mix_hash(temp_h)
        self._nonce = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self._key is None:
            ciphertext = plaintext
        else:
            ciphertext = aead_encrypt(self._key, self._nonce, plaintext, self.hash)
            self._nonce += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Raises AuthenticationFailed on a bad tag (the state is then unusable)."""
        if self._key is None:
            plaintext = ciphertext
        else:
            plaintext = aead_decrypt(self._key, self._nonce, ciphertext, self.hash)
            self._nonce += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """(initiator-to-responder key, responder-to-initiator key)."""
        return kdf2(self.chaining_key, b"")


def _mix_ephemeral(st: SymmetricState, ephemeral_public: bytes) -> None:
    # "e" token with a PSK in the pattern: MixHash(e) and MixKey(e).
    st.mix_hash(ephemeral_public)
    st.mix_key(ephemeral_public)


def initiator_write_msg1(
    st: SymmetricState,
    *,
    ephemeral_private: bytes,
    local_static_public: bytes,
    remote_static: bytes,
    static_static: bytes,
    payload: bytes,
) -> tuple[bytes, bytes, bytes]:
    """-> e, es, s, ss, payload. Returns (ephemeral public, encrypted static, encrypted payload).

    `static_static` = DH(our static private, remote static), which WireGuard precomputes.
    """
    ephemeral_public = public_from_private(ephemeral_private)
    _mix_ephemeral(st, ephemeral_public)
    st.mix_key(dh(ephemeral_private, remote_static))
    encrypted_static = st.encrypt_and_hash(local_static_public)
    st.mix_key(static_static)
    encrypted_payload = st.encrypt_and_hash(payload)
    return ephemeral_public, encrypted_static, encrypted_payload


def responder_read_msg1(
    st: SymmetricState,
    *,
    local_static_private: bytes,
    remote_ephemeral: bytes,
    encrypted_static: bytes,
    encrypted_payload: bytes,
    static_static: Callable[[bytes], bytes],
) -> tuple[bytes, bytes]:
    """<- e, es, s, ss, payload. Returns (initiator static public, payload).

    `static_static(remote_static)` returns DH(our static private, remote_static); it may raise
    (for instance UnknownPeer) to stop before the payload is decrypted.
    """
    _mix_ephemeral(st, remote_ephemeral)
    st.mix_key(dh(local_static_private, remote_ephemeral))
    remote_static = st.decrypt_and_hash(encrypted_static)
    st.mix_key(static_static(remote_static))
    payload = st.decrypt_and_hash(encrypted_payload)
    return remote_static, payload


def responder_write_msg2(
    st: SymmetricState,
    *,
    ephemeral_private: bytes,
    remote_ephemeral: bytes,
    remote_static: bytes,
    preshared_key: bytes,
    payload: bytes,
) -> tuple[bytes, bytes]:
    """-> e, ee, se, psk, payload. Returns (ephemeral public, encrypted payload)."""
    ephemeral_public = public_from_private(ephemeral_private)
    _mix_ephemeral(st, ephemeral_public)
    st.mix_key(dh(ephemeral_private, remote_ephemeral))
    st.mix_key(dh(ephemeral_private, remote_static))
    st.mix_key_and_hash(preshared_key)
    return ephemeral_public, st.encrypt_and_hash(payload)


def initiator_read_msg2(
    st: SymmetricState,
    *,
    ephemeral_private: bytes,
    local_static_private: bytes,
    remote_ephemeral: bytes,
    encrypted_payload: bytes,
    preshared_key: bytes,
) -> bytes:
    """<- e, ee, se, psk, payload. Returns the payload; AuthenticationFailed if it does not open."""
    _mix_ephemeral(st, remote_ephemeral)
    st.mix_key(dh(ephemeral_private, remote_ephemeral))
    st.mix_key(dh(local_static_private, remote_ephemeral))
    st.mix_key_and_hash(preshared_key)
    return st.decrypt_and_hash(encrypted_payload)
