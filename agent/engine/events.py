"""What the path engine hands back to the daemon: datagrams to send, events, per-peer status.

Outgoing         a DISCO packet and where it goes: a UDP endpoint, or a DERP pseudo-endpoint
                 (`derp_endpoint(region)`) meaning "through that region to `key`"; exactly
                 what `PeerTransport.send_to_endpoint([payload], endpoint, key)` takes. `via`
                 names the socket it leaves from: 0 the WireGuard socket (as the engine's
                 `socket_for(endpoint)` says for everything else), else one of the extra
                 sockets of a birthday round (engine/birthday.py)
PathChanged      a peer's path kind (direct / derp / none) or direct endpoint changed
PongReceived     a pong to one of our pings (`agent ping` prints these)
DiscoAuthenticated  a DISCO message from a peer opened with its disco key: the peer is
                 reachable now (see `handshake_wake` for what the WireGuard side does about it)
PeerPathStatus   `PathStatus` plus the latency of the path in use
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.engine.paths import Endpoint, PathKind, PathStatus, derp_region_of
from agent.keys import NodePublic

__all__ = [
    "DiscoAuthenticated",
    "EngineEvent",
    "Outgoing",
    "PathChanged",
    "PeerPathStatus",
    "PongReceived",
]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One datagram for the daemon to send: over UDP to `endpoint`, or, when `endpoint` is a
    DERP pseudo-endpoint, through that DERP region addressed to the node key `key`."""

    payload: bytes
    endpoint: Endpoint
    key: NodePublic
    via: int = 0  # 0: the socket `socket_for(endpoint)` names; else that extra socket

    @property
    def derp_region(self) -> int | None:
        return derp_region_of(self.endpoint)


@dataclass(frozen=True, slots=True)
class PeerPathStatus(PathStatus):
    """`PathStatus` plus the round trip (seconds) of the path in use, when measured: the best
    direct path's latest pong when direct, the latest pong over DERP when relayed."""

    latency: float | None = None


@dataclass(frozen=True, slots=True)
class PathChanged:
    """The path `key`'s packets take changed: `old` -> `new` (`endpoint` is the direct endpoint
    when `new` is "direct", `derp_region` the region when it is "derp")."""

    key: NodePublic
    old: PathKind
    new: PathKind
    endpoint: Endpoint | None
    derp_region: int | None


@dataclass(frozen=True, slots=True)
class PongReceived:
    """A pong answered our ping `tx_id`, sent to `via` (a UDP endpoint or a DERP
    pseudo-endpoint) `latency` seconds earlier; `src` is where the peer saw our ping come from
    (our public endpoint for a UDP ping, 127.3.3.40:region for a DERP one)."""

    key: NodePublic
    tx_id: bytes
    src: Endpoint
    latency: float
    via: Endpoint

    @property
    def via_derp(self) -> int | None:
        """The DERP region the pong came through, or None for a direct pong."""
        return derp_region_of(self.via)


@dataclass(frozen=True, slots=True)
class DiscoAuthenticated:
    """A DISCO message (`kind`: "ping", "pong" or "call_me_maybe") from the peer `key` opened
    with that peer's disco key, so it came from the peer; `src` is where it arrived from (a UDP
    endpoint or the DERP pseudo-endpoint of the region it came through)."""

    key: NodePublic
    kind: str
    src: Endpoint


EngineEvent = PathChanged | PongReceived | DiscoAuthenticated
