"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it (whitepaper §5.4.2-§5.4.5).

Theory of operation. The initiator knows the responder's static key in advance (the IK pattern);
the preshared key (32 zero bytes when none) is mixed in last (psk2):

    pre-message   <- s                  h = HASH(HASH(HASH(CONSTRUCTION) || IDENTIFIER) || S_r)
    message 1     -> e, es, s, ss       payload = TAI64N timestamp       (148 B on the wire)
    message 2     <- e, ee, se, psk     payload = empty                  (92 B on the wire)
    split         T_send(i) = T_recv(r), T_recv(i) = T_send(r) = KDF2(ck, "")

The generic steps (SymmetricState and the four `*_msg1`/`*_msg2` functions) live in `noise.py`;
this module wraps them with WireGuard's identifiers, indexes, timestamps and replay rule.

One Handshake per peer, one state at a time (as wireguard-go):

    state                       input                               next state
    ----------------------------------------------------------------------------------------------
    (any)                       create_initiation                   InitiationSent
    (any)                       accept_initiation (newer timestamp) InitiationConsumed
    (any)                       accept_initiation (not newer)       unchanged, ReplayedHandshake
    (any)                       accept_initiation (< 20 ms after)   unchanged, RateLimited
    InitiationConsumed          create_response                     idle, SessionKeys (responder)
    other                       create_response                     LocalProtocolError
    InitiationSent, index ok    consume_response (valid)            idle, SessionKeys (initiator)
    InitiationSent, index ok    consume_response (bad crypto)       unchanged, AuthenticationFailed
    other                       consume_response                    unchanged, UnknownReceiver
    (any)                       clear                               idle

`consume_initiation` runs before the peer is known (it decrypts the initiator's static key), so it
is a module function returning a ConsumedInitiation that the owning peer's Handshake accepts.
mac1/mac2 are checked and filled by cookie.py, not here. Pure computation.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from agent.keys import NodePrivate, NodePublic, PresharedKey
from agent.proto.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    RateLimited,
    ReplayedHandshake,
    UnknownPeer,
    UnknownReceiver,
)
from agent.proto.wireguard.constants import (
    HANDSHAKE_INITIATION_RATE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MSG_INITIATION,
    MSG_RESPONSE,
)
from agent.proto.wireguard.crypto import (
    KEY_LEN,
    TAI64N_LEN,
    dh,
    generate_private,
    hash_,
    tai64n,
)
from agent.proto.wireguard.messages import (
    INITIATION,
    RESPONSE,
    HandshakeInitiation,
    HandshakeResponse,
)
from agent.proto.wireguard.noise import (
    INITIAL_CHAINING_KEY,
    INITIAL_HASH,
    SymmetricState,
    initiator_read_msg2,
    initiator_write_msg1,
    responder_read_msg1,
    responder_write_msg2,
)
from agent.proto.wireguard.session import SessionKeys

__all__ = [
    "LocalIdentity",
    "ConsumedInitiation",
    "consume_initiation",
    "Handshake",
]

_ZERO_KEY: Final = bytes(KEY_LEN)
_ZERO_MAC: Final = bytes(16)
_ZERO_TIMESTAMP: Final = bytes(TAI64N_LEN)


# --- WireGuard handshake -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """Our static key pair, with the values derived from it once."""

    private: NodePrivate
    public: NodePublic
    initial_hash: bytes = field(init=False, repr=False)  # h after mixing our public (responder)
    mac1_key: bytes = field(init=False, repr=False)  # HASH(LABEL_MAC1 || our public)
    cookie_key: bytes = field(init=False, repr=False)  # HASH(LABEL_COOKIE || our public)

    def __post_init__(self) -> None:
        if self.private.public() != self.public:
            raise LocalProtocolError("public key does not match the private key")
        object.__setattr__(self, "initial_hash", hash_(INITIAL_HASH, self.public.raw))
        object.__setattr__(self, "mac1_key", hash_(LABEL_MAC1, self.public.raw))
        object.__setattr__(self, "cookie_key", hash_(LABEL_COOKIE, self.public.raw))

    @classmethod
    def from_private(cls, private: NodePrivate) -> LocalIdentity:
        return cls(private, private.public())


@dataclass(frozen=True, slots=True)
class ConsumedInitiation:
    """A decrypted initiation, not yet accepted by the Handshake of the peer it names."""

    remote_static: NodePublic
    timestamp: bytes
    remote_index: int
    remote_ephemeral: bytes = field(repr=False)
    chaining_key: bytes = field(repr=False)  # responder state after message 1
    hash: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class _InitiationSent:
    local_index: int
    ephemeral_private: bytes = field(repr=False)
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)


def consume_initiation(
    local: LocalIdentity,
    data: bytes | bytearray | memoryview,
    *,
    find_peer: Callable[[NodePublic], Handshake | None] | None = None,
) -> ConsumedInitiation:
    """Decrypt a handshake initiation sent to `local` (mac1 is not checked here).

    Raises MalformedPacket or AuthenticationFailed. With `find_peer`, the initiator's static key is
    looked up as soon as it is decrypted: None raises UnknownPeer, and the peer's cached
    static-static DH is used instead of computing it.
    """
    msg = HandshakeInitiation.parse(data)
    private = local.private.raw

    def static_static(remote_static: bytes) -> bytes:
        if find_peer is None:
            return dh(private, remote_static)
        peer = find_peer(NodePublic(remote_static))
        if peer is None:
            raise UnknownPeer("initiation from an unknown static key")
        return peer._static_static

    st = SymmetricState(INITIAL_CHAINING_KEY, local.initial_hash)
    remote_static, timestamp = responder_read_msg1(
        st,
        local_static_private=private,
        remote_ephemeral=msg.ephemeral,
        encrypted_static=msg.encrypted_static,
        encrypted_payload=msg.encrypted_timestamp,
        static_static=static_static,
    )
    return ConsumedInitiation(
        remote_static=NodePublic(remote_static),
        timestamp=timestamp,
        remote_index=msg.sender,
        remote_ephemeral=msg.ephemeral,
        chaining_key=st.chaining_key,
        hash=st.hash,
    )


def _psk_bytes(psk: bytes | PresharedKey | None) -> bytes:
    if psk is None:
        return _ZERO_KEY
    raw = psk.raw if isinstance(psk, PresharedKey) else bytes(psk)
    if len(raw) != KEY_LEN:
        raise LocalProtocolError(f"a preshared key is {KEY_LEN} bytes, got {len(raw)}")
    return raw


class Handshake:
    """Our side of the handshake with one peer (see the state table in the module docstring)."""

    __slots__ = (
        "_initial_hash",
        "_last_chaining_key",
        "_last_hash",
        "_last_initiation_accepted",
        "_psk",
        "_randbytes",
        "_state",
        "_static_static",
        "last_timestamp",
        "local",
        "remote_static",
    )

    def __init__(
        self,
        local: LocalIdentity,
        remote_static: NodePublic,
        preshared_key: bytes | PresharedKey | None = None,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """LocalProtocolError if `remote_static` is a low-order point (config must refuse it)."""
        # Static after construction:
        self.local = local
        self.remote_static = remote_static
        self._randbytes = randbytes
        try:
            self._static_static = dh(local.private.raw, remote_static.raw)
        except AuthenticationFailed:
            raise LocalProtocolError("peer public key gives an all-zero shared secret") from None
        self._initial_hash = hash_(INITIAL_HASH, remote_static.raw)  # initiator, after pre-message
        # Changed by the owner through the methods below:
        self._psk = _psk_bytes(preshared_key)
        self.last_timestamp = _ZERO_TIMESTAMP
        self._last_initiation_accepted: float | None = None
        self._state: _InitiationSent | ConsumedInitiation | None = None
        self._last_chaining_key: bytes | None = None
        self._last_hash: bytes | None = None

    def set_preshared_key(self, psk: bytes | PresharedKey | None) -> None:
        self._psk = _psk_bytes(psk)

    @property
    def initiation_pending(self) -> bool:
        """True while an initiation we created waits for its response."""
        return isinstance(self._state, _InitiationSent)

    @property
    def response_pending(self) -> bool:
        """True when an accepted initiation waits for create_response."""
        return isinstance(self._state, ConsumedInitiation)

    @property
    def pending_local_index(self) -> int | None:
        """The sender index of the pending initiation, if any."""
        state = self._state
        return state.local_index if isinstance(state, _InitiationSent) else None

    @property
    def chaining_key(self) -> bytes | None:
        """Chaining key after the last handshake message created or consumed (for tests)."""
        return self._last_chaining_key

    @property
    def hash(self) -> bytes | None:
        """Handshake hash after the last handshake message created or consumed (for tests)."""
        return self._last_hash

    def clear(self) -> None:
        """Forget any handshake in progress (last_timestamp is kept)."""
        self._state = None
        self._last_chaining_key = None
        self._last_hash = None

    def create_initiation(
        self, local_index: int, wall: float, *, ephemeral_private: bytes | None = None
    ) -> bytearray:
        """Message 1 (148 bytes) with zero mac1/mac2; replaces any handshake in progress."""
        if ephemeral_private is None:
            ephemeral_private = generate_private(self._randbytes)
        st = SymmetricState(INITIAL_CHAINING_KEY, self._initial_hash)
        ephemeral, encrypted_static, encrypted_timestamp = initiator_write_msg1(
            st,
            ephemeral_private=ephemeral_private,
            local_static_public=self.local.public.raw,
            remote_static=self.remote_static.raw,
            static_static=self._static_static,
            payload=tai64n(wall),
        )
        msg = bytearray(
            INITIATION.pack(
                MSG_INITIATION,
                local_index,
                ephemeral,
                encrypted_static,
                encrypted_timestamp,
                _ZERO_MAC,
                _ZERO_MAC,
            )
        )
        self._state = _InitiationSent(local_index, ephemeral_private, st.chaining_key, st.hash)
        self._last_chaining_key, self._last_hash = st.chaining_key, st.hash
        return msg

    def accept_initiation(self, consumed: ConsumedInitiation, now: float | None = None) -> None:
        """Take over a consumed initiation; ReplayedHandshake unless its timestamp is newer.

        With `now`, also RateLimited if the previous initiation was accepted less than
        HANDSHAKE_INITIATION_RATE seconds ago (wireguard-go's flood check).
        """
        if consumed.remote_static != self.remote_static:
            raise LocalProtocolError("initiation was consumed for another peer")
        if consumed.timestamp <= self.last_timestamp:
            raise ReplayedHandshake("initiation timestamp is not newer than the last accepted")
        if now is not None:
            last = self._last_initiation_accepted
            if last is not None and now - last <= HANDSHAKE_INITIATION_RATE:
                raise RateLimited("initiations from this peer arrive too fast")
            self._last_initiation_accepted = now
        self.last_timestamp = consumed.timestamp
        self._state = consumed
        self._last_chaining_key, self._last_hash = consumed.chaining_key, consumed.hash

    def note_timestamp(self, consumed: ConsumedInitiation) -> None:
        """An initiation we do not take over (we keep our own, see Peer.on_initiation): only
        its timestamp is remembered, so a replay of it is refused like any other."""
        if consumed.remote_static != self.remote_static:
            raise LocalProtocolError("initiation was consumed for another peer")
        if consumed.timestamp <= self.last_timestamp:
            raise ReplayedHandshake("initiation timestamp is not newer than the last accepted")
        self.last_timestamp = consumed.timestamp

    def create_response(
        self, local_index: int, *, ephemeral_private: bytes | None = None
    ) -> tuple[bytearray, SessionKeys]:
        """Message 2 (92 bytes) with zero mac1/mac2, and the responder's session keys."""
        state = self._state
        if not isinstance(state, ConsumedInitiation):
            raise LocalProtocolError("create_response needs an accepted initiation")
        if ephemeral_private is None:
            ephemeral_private = generate_private(self._randbytes)
        st = SymmetricState(state.chaining_key, state.hash)
        ephemeral, encrypted_nothing = responder_write_msg2(
            st,
            ephemeral_private=ephemeral_private,
            remote_ephemeral=state.remote_ephemeral,
            remote_static=self.remote_static.raw,
            preshared_key=self._psk,
            payload=b"",
        )
        msg = bytearray(
            RESPONSE.pack(
                MSG_RESPONSE,
                local_index,
                state.remote_index,
                ephemeral,
                encrypted_nothing,
                _ZERO_MAC,
                _ZERO_MAC,
            )
        )
        initiator_to_responder, responder_to_initiator = st.split()
        self._state = None
        self._last_chaining_key, self._last_hash = st.chaining_key, st.hash
        keys = SessionKeys(
            send_key=responder_to_initiator,
            recv_key=initiator_to_responder,
            local_index=local_index,
            remote_index=state.remote_index,
            is_initiator=False,
        )
        return msg, keys

    def consume_response(self, data: bytes | bytearray | memoryview) -> SessionKeys:
        """Finish the handshake we initiated; MalformedPacket, UnknownReceiver or
        AuthenticationFailed leave the pending initiation in place."""
        msg = HandshakeResponse.parse(data)
        state = self._state
        if not isinstance(state, _InitiationSent) or state.local_index != msg.receiver:
            raise UnknownReceiver("response to no pending initiation")
        st = SymmetricState(state.chaining_key, state.hash)
        initiator_read_msg2(
            st,
            ephemeral_private=state.ephemeral_private,
            local_static_private=self.local.private.raw,
            remote_ephemeral=msg.ephemeral,
            encrypted_payload=msg.encrypted_nothing,
            preshared_key=self._psk,
        )
        initiator_to_responder, responder_to_initiator = st.split()
        self._state = None
        self._last_chaining_key, self._last_hash = st.chaining_key, st.hash
        return SessionKeys(
            send_key=initiator_to_responder,
            recv_key=responder_to_initiator,
            local_index=state.local_index,
            remote_index=msg.sender,
            is_initiator=True,
        )
