"""What the WireGuard core reports through `Device.events()`: control facts, not data."""

from __future__ import annotations

from dataclasses import dataclass

from agent.keys import NodePublic

__all__ = [
    "Endpoint",
    "Event",
    "HandshakeCompleted",
    "HandshakeGivenUp",
    "KeysZeroed",
    "EndpointChanged",
]

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A session with `peer` is ready; `initiator` says which side started the handshake."""

    peer: NodePublic
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeGivenUp:
    """The retransmit timer gave up on `peer` after `attempts` initiations (staged packets
    dropped)."""

    peer: NodePublic
    attempts: int


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    """Every session and handshake state of `peer` was forgotten (timer or removal)."""

    peer: NodePublic


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """An authenticated message of `peer` came from `endpoint`, which is now where it is sent."""

    peer: NodePublic
    endpoint: Endpoint


Event = HandshakeCompleted | HandshakeGivenUp | KeysZeroed | EndpointChanged
