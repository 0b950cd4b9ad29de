"""Where datagrams for a peer leave the machine: the UDP socket, a DERP region, or both.

    PeerTransport   asks the path policy (agent/engine/paths.py) per peer and batch,
                    sends over UDP (GSO) and/or the DERP link of the chosen region

UDP goes through a `UdpSender`: the WireGuard socket, or node/birthday_io's ExtraSockets, which
sends to an endpoint a birthday round bound to an extra socket from that socket. It implements
`dataplane.PeerSender` (whose default sends everything over UDP to the peer's
WireGuard endpoint, as plain WireGuard does). Replies (handshake responses, cookie replies,
keepalives) go back where the message came from: a UDP source, or the DERP pseudo-endpoint
of the region it arrived through, addressed to the key that sent it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from agent.engine.paths import Targets, derp_region_of
from agent.keys import NodePublic
from agent.node.dataplane import PeerLike
from agent.node.derp_client import DerpClients
from agent.node.udp import Endpoint

__all__ = ["PathPolicy", "PeerTransport", "UdpSender"]

Datagrams = Sequence[bytes | bytearray]


class UdpSender(Protocol):
    """What UDP leaves through: node/udp.UdpSocket, or node/birthday_io.ExtraSockets."""

    def send_batch(self, datagrams: Datagrams, addr: Endpoint) -> int: ...

    def sends_from_main(self, addr: Endpoint) -> bool:
        """Whether datagrams to `addr` leave through the WireGuard socket."""
        ...


class PathPolicy(Protocol):
    """What the transport asks per peer: engine/paths.PathTable or engine/engine.PathEngine."""

    def has_peer(self, key: NodePublic) -> bool: ...

    def add_peer(
        self, key: NodePublic, *, endpoint: Endpoint | None = None, derp_region: int | None = None
    ) -> None: ...

    def targets(self, key: NodePublic, now: float) -> Targets: ...

    def direct(self, key: NodePublic, now: float) -> tuple[Endpoint, float] | None: ...

    def on_send(self, key: NodePublic, now: float) -> None: ...

    def on_receive(self, key: NodePublic, src: Endpoint, now: float) -> None: ...


class PeerTransport:
    """The agent's transport: per peer, the path policy picks UDP, DERP or both."""

    def __init__(self, udp: UdpSender, derp: DerpClients | None, paths: PathPolicy) -> None:
        self.udp = udp
        self.derp = derp
        self.paths = paths

    def _ensure(self, peer: PeerLike) -> None:
        # Peers added at run time (`wg set`) start with the endpoint WireGuard knows.
        if not self.paths.has_peer(peer.public_key):
            ep = peer.endpoint
            self.paths.add_peer(
                peer.public_key, endpoint=ep if derp_region_of(ep) is None else None
            )

    def has_path(self, peer: PeerLike, now: float) -> bool:
        self._ensure(peer)
        t = self.paths.targets(peer.public_key, now)
        return t.udp is not None or (t.derp is not None and self.derp is not None)

    def direct(self, peer: PeerLike, now: float) -> tuple[Endpoint, float] | None:
        """The WireGuard socket alone, to this endpoint, until this time (see PathPolicy)."""
        self._ensure(peer)
        d = self.paths.direct(peer.public_key, now)
        if d is None or not self.udp.sends_from_main(d[0]):
            return None
        return d

    def note_sent(self, peer: PeerLike, now: float) -> None:
        """A lane sent `peer` data over `direct`: the path layer's bookkeeping of a send."""
        self.paths.on_send(peer.public_key, now)

    def send_to_peer(self, peer: PeerLike, datagrams: Datagrams, now: float) -> int:
        self._ensure(peer)
        paths = self.paths
        paths.on_send(peer.public_key, now)
        t = paths.targets(peer.public_key, now)
        dropped = len(datagrams)
        if t.udp is not None:
            dropped = self.udp.send_batch(datagrams, t.udp)
        if t.derp is not None and self.derp is not None:
            dropped = min(dropped, self.derp.send(t.derp, peer.public_key, datagrams))
        return dropped

    def send_to_endpoint(
        self, datagrams: Datagrams, endpoint: Endpoint, key: NodePublic | None
    ) -> int:
        region = derp_region_of(endpoint)
        if region is None:
            return self.udp.send_batch(datagrams, endpoint)
        if key is None or self.derp is None:
            return len(datagrams)
        return self.derp.send(region, key, datagrams)

    def received(self, peers: Sequence[PeerLike], src: Endpoint, now: float) -> None:
        for peer in peers:
            self._ensure(peer)
            self.paths.on_receive(peer.public_key, src, now)
