"""What the relay core asks of its shell (events) and what it counts (counters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

__all__ = [
    "ClientRegistered",
    "CloseConnection",
    "ForwardToMesh",
    "PauseReading",
    "ResumeReading",
    "RelayEvent",
    "RelayCounters",
]


@dataclass(frozen=True, slots=True)
class ClientRegistered:
    conn_id: int
    key: bytes
    info: dict[str, Any] = field(hash=False, compare=False)
    mesh: bool = False


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """The shell must close this stream (after flushing `data_to_send`, if it likes)."""

    conn_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ForwardToMesh:
    """The shell must send ForwardPacket(src, dst, packet) over its outbound mesh connection to
    `node` (the name it used in `mesh_peer_present`); if that connection is down, drop it."""

    node: str
    src: bytes
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class PauseReading:
    """The connection ran out of receive tokens: the shell stops reading the stream (the core
    holds what it already got) until ResumeReading. `until` is when the core looks again."""

    conn_id: int
    until: float


@dataclass(frozen=True, slots=True)
class ResumeReading:
    """Everything held for the connection was acted on: the shell reads the stream again."""

    conn_id: int


RelayEvent: TypeAlias = (
    ClientRegistered | CloseConnection | ForwardToMesh | PauseReading | ResumeReading
)


@dataclass(slots=True)
class RelayCounters:
    """Monotonic counters for metrics; drops by reason live in `RelayCore.drops`."""

    clients_total: int = 0  # registrations, mesh peers included
    packets_relayed: int = 0  # RecvPacket queued for a local client (local or mesh sender)
    bytes_relayed: int = 0
    packets_forwarded_out: int = 0  # ForwardToMesh events
    bytes_forwarded_out: int = 0
    packets_forwarded_in: int = 0  # ForwardPacket frames accepted from mesh peers
    peer_gone_not_here: int = 0
    peer_gone_disconnected: int = 0
    throttle_pauses: int = 0  # PauseReading events: a client ran out of receive tokens
    throttled_seconds: float = 0.0  # summed over connections, counted when each pause ends
