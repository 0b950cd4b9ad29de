"""Transport sessions: a Keypair per completed handshake, and the previous/current/next rotation.

    Keypair   one direction-pair of ChaCha20-Poly1305 keys, our send counter, the peer's replay
              window, our and the peer's 32-bit index, and when it was made.
    Keypairs  previous / current / next, rotated as WireGuard does:
              initiator finishing a handshake:  previous <- (next or current), current <- new
              responder finishing a handshake:  next <- new, previous dropped (it may not send on
                                                `next` until the initiator's first packet arrives)
              first packet received on `next`:  previous <- current, current <- next

Transport data message (type 4):
    0      4              8                 16
    | 04 00 00 00 | receiver LE32 | counter LE64 | ChaCha20-Poly1305(payload padded to 16) + tag |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.proto.errors import ExpiredSession
from agent.proto.wireguard.constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from agent.proto.wireguard.transport import (
    PYTHON,
    Aead,
    OpenedRun,
    Replay,
    SealerLike,
    Transport,
)

__all__ = ["Keypair", "Keypairs", "SessionKeys"]

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The result of a completed handshake: transport keys and both indexes."""

    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool


class Keypair:
    """Keys and counters of one session. Owned by its Peer; the device indexes it by local_index."""

    __slots__ = (
        "_recv_aead",
        "_replay",
        "_transport",
        "created",
        "is_initiator",
        "local_index",
        "remote_index",
        "sealer",
    )

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        local_index: int,
        remote_index: int,
        *,
        is_initiator: bool,
        created: float,
        transport: Transport = PYTHON,
    ) -> None:
        self._transport = transport
        # The sending key and the one send counter, shared with a data-plane lane
        self.sealer: SealerLike = transport.sealer(transport.aead(send_key), remote_index)
        self._recv_aead: Aead = transport.aead(recv_key)
        self._replay: Replay = transport.replay()
        self.local_index = local_index
        self.remote_index = remote_index
        self.is_initiator = is_initiator
        self.created = created

    @property
    def send_counter(self) -> int:
        return self.sealer.counter

    @send_counter.setter
    def send_counter(self, value: int) -> None:
        self.sealer.counter = value

    @property
    def recv_aead(self) -> Aead:
        return self._recv_aead

    @property
    def replay(self) -> Replay:
        return self._replay

    @classmethod
    def from_session_keys(
        cls, keys: SessionKeys, *, created: float, transport: Transport = PYTHON
    ) -> Keypair:
        return cls(
            keys.send_key,
            keys.recv_key,
            keys.local_index,
            keys.remote_index,
            is_initiator=keys.is_initiator,
            created=created,
            transport=transport,
        )

    def can_send(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME and self.send_counter < REJECT_AFTER_MESSAGES

    def can_receive(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME

    def seal(self, packets: Sequence[Buffer]) -> list[bytes]:
        """Encrypt IP packets (b"" = keepalive) into transport datagrams, consuming counters."""
        sealer = self.sealer
        if sealer.counter + len(packets) > REJECT_AFTER_MESSAGES:
            raise ExpiredSession("send counter exhausted")
        return sealer.seal(packets)

    def open_run(self, datagrams: Sequence[Buffer], start: int) -> OpenedRun:
        """Open the run of transport messages for this keypair from datagrams[start] on:
        authentication, replay window, IP header (transport.open_run)."""
        return self._transport.open_run(
            self._recv_aead, self._replay, datagrams, start, self.local_index
        )


@dataclass(slots=True)
class Keypairs:
    """The three session slots of one peer (see module docstring for the rotation)."""

    previous: Keypair | None = None
    current: Keypair | None = None
    next: Keypair | None = None
    _dropped: list[Keypair] = field(default_factory=list)

    def install_initiator(self, kp: Keypair) -> None:
        if self.next is not None:
            self._drop(self.previous)
            self._drop(self.current)
            self.previous = self.next
            self.next = None
        else:
            self._drop(self.previous)
            self.previous = self.current
        self.current = kp

    def install_responder(self, kp: Keypair) -> None:
        self._drop(self.next)
        self._drop(self.previous)
        self.previous = None
        self.next = kp

    def promote_next(self) -> None:
        """The peer used `next`: it becomes current."""
        self._drop(self.previous)
        self.previous = self.current
        self.current = self.next
        self.next = None

    def clear(self) -> None:
        for kp in (self.previous, self.current, self.next):
            self._drop(kp)
        self.previous = self.current = self.next = None

    def take_dropped(self) -> list[Keypair]:
        """Keypairs that left the slots since the last call (their indexes must be freed)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def _drop(self, kp: Keypair | None) -> None:
        if kp is not None:
            self._dropped.append(kp)
