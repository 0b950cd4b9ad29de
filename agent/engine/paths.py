"""Where a peer's datagrams go: a direct UDP endpoint, a DERP region, or both (sans-I/O).

The WireGuard core (agent/proto/wireguard) knows one endpoint per peer: the last authenticated
source. Packets that arrive through a DERP relay are handed to it with a pseudo-endpoint,
`(DERP_MAGIC_IP, region_id)`, as tailscaled does (127.3.3.40:region), so replies to a handshake
or a keepalive go back through the region the peer's packets arrived on.

`PathTable` is the policy the daemon asks before sending anything to a peer:

    direct trusted (an authenticated packet came from it within TRUST_UDP)   -> direct only
    direct known but not trusted, and a DERP region known                    -> both
    only one of them known                                                   -> that one
    neither                                                                  -> nothing (dropped)

The region is the one the peer's packets last arrived on, else the peer's configured region,
else our home region. Sending both while the direct path is unproven is what tailscaled does
for an untrusted UDP address; once a packet arrives directly the relay is no longer used, and
when the direct path goes silent for TRUST_UDP the relay carries traffic again by itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from agent.keys import NodePublic

__all__ = [
    "DERP_MAGIC_IP",
    "TRUST_UDP",
    "Endpoint",
    "PathKind",
    "PathStatus",
    "PathTable",
    "Targets",
    "derp_endpoint",
    "derp_region_of",
]

Endpoint = tuple[str, int]
PathKind = Literal["direct", "derp", "none"]

DERP_MAGIC_IP: Final = "127.3.3.40"
TRUST_UDP: Final = 6.5  # seconds a direct path stays trusted after a packet arrived on it


def derp_endpoint(region: int) -> Endpoint:
    """The pseudo-endpoint standing for "through DERP region `region`"."""
    return (DERP_MAGIC_IP, region)


def derp_region_of(endpoint: Endpoint | None) -> int | None:
    """The region if `endpoint` is a DERP pseudo-endpoint, else None."""
    if endpoint is not None and endpoint[0] == DERP_MAGIC_IP:
        return endpoint[1]
    return None


@dataclass(frozen=True, slots=True)
class Targets:
    """Where to send: a UDP endpoint, a DERP region (to the peer's key), or both."""

    udp: Endpoint | None = None
    derp: int | None = None


@dataclass(frozen=True, slots=True)
class PathStatus:
    path: PathKind
    endpoint: Endpoint | None
    derp_region: int | None


@dataclass(slots=True)
class _PeerPath:
    direct: Endpoint | None
    configured_region: int | None
    direct_rx: float | None = None
    derp_rx_region: int | None = None


class PathTable:
    """Per-peer path state fed by authenticated receptions; answers `targets(peer, now)`."""

    def __init__(self, home_region: int | None = None, *, trust: float = TRUST_UDP) -> None:
        self.home_region = home_region
        self.trust = trust
        self._peers: dict[NodePublic, _PeerPath] = {}

    def add_peer(
        self, key: NodePublic, *, endpoint: Endpoint | None = None, derp_region: int | None = None
    ) -> None:
        self._peers[key] = _PeerPath(direct=endpoint, configured_region=derp_region)

    def has_peer(self, key: NodePublic) -> bool:
        return key in self._peers

    def remove_peer(self, key: NodePublic) -> None:
        self._peers.pop(key, None)

    def set_endpoint(self, key: NodePublic, endpoint: Endpoint | None) -> None:
        """A direct endpoint given from outside (config, `wg set`); not trusted until heard."""
        p = self._peers.get(key)
        if p is not None and p.direct != endpoint:
            p.direct = endpoint
            p.direct_rx = None

    def on_send(self, key: NodePublic, now: float) -> None:
        """We are about to send to `key`: nothing to do without DISCO (PathEngine acts on it)."""

    def on_receive(self, key: NodePublic, src: Endpoint, now: float) -> None:
        """An authenticated WireGuard message from `key` arrived from `src`."""
        p = self._peers.get(key)
        if p is None:
            return
        region = derp_region_of(src)
        if region is not None:
            p.derp_rx_region = region
        else:
            p.direct = src
            p.direct_rx = now

    def _region(self, p: _PeerPath) -> int | None:
        if p.derp_rx_region is not None:
            return p.derp_rx_region
        if p.configured_region is not None:
            return p.configured_region
        return self.home_region

    def _trusted(self, p: _PeerPath, now: float) -> bool:
        return p.direct is not None and p.direct_rx is not None and now - p.direct_rx < self.trust

    def targets(self, key: NodePublic, now: float) -> Targets:
        p = self._peers.get(key)
        if p is None:
            return Targets()
        if self._trusted(p, now):
            return Targets(udp=p.direct)
        return Targets(udp=p.direct, derp=self._region(p))

    def direct(self, key: NodePublic, now: float) -> tuple[Endpoint, float] | None:
        """Where `targets` sends over UDP alone, and until when that holds unless something
        else changes first; None when it sends through DERP as well (or nowhere)."""
        p = self._peers.get(key)
        if p is None or p.direct is None:
            return None
        if self._trusted(p, now):
            assert p.direct_rx is not None
            return p.direct, p.direct_rx + self.trust
        if self._region(p) is None:
            return p.direct, math.inf
        return None

    def status(self, key: NodePublic, now: float) -> PathStatus:
        p = self._peers.get(key)
        if p is None:
            return PathStatus("none", None, None)
        return self._status(p, now)

    def status_if_added(self, endpoint: Endpoint | None, now: float) -> PathStatus:
        """Read only: the status of a peer added now at `endpoint` (a DERP pseudo-endpoint
        counts as none), as one added at run time starts on its first use."""
        direct = endpoint if derp_region_of(endpoint) is None else None
        return self._status(_PeerPath(direct=direct, configured_region=None), now)

    def _status(self, p: _PeerPath, now: float) -> PathStatus:
        region = self._region(p)
        if self._trusted(p, now):
            return PathStatus("direct", p.direct, region)
        if region is not None:
            return PathStatus("derp", p.direct, region)
        return PathStatus("none", p.direct, None)
