"""Candidate endpoints of one peer, their pong history, and the better-path predicate.

A candidate is an ip:port the peer may be reachable at. It is known from one or more sources
(tailscale's wgengine/magicsock/endpoint.go):

    CONFIG         the peer's configured endpoint (kept while configured)
    CALL_ME_MAYBE  the peer's last CallMeMaybe (kept until a later one omits it)
    LEARNED        a ping or an authenticated WireGuard packet came from it (expires
                   SESSION_ACTIVE_TIMEOUT after the last one)

Each candidate remembers when we last pinged it and the last PONG_HISTORY_COUNT pong results.

`better_path(a, b)` says whether path `a` should replace the current best `b`: tailscaled's
betterAddr without MTU and peer relays. Points are the integer percentage by which one path is
faster than the other, plus a bonus for loopback (+50), link-local (+30) or private (+20)
addresses and +10 for IPv6; `a` wins only with more points, and a 1-point lead over a
zero-point `b` is not enough (hysteresis against flapping between near-equal paths).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field
from enum import Flag, auto
from typing import Final

from agent.engine.paths import Endpoint
from agent.engine.timings import PONG_HISTORY_COUNT

__all__ = [
    "CandidateSource",
    "PongResult",
    "AddrLatency",
    "Candidate",
    "better_path",
    "path_points",
]

_NS: Final = 1_000_000_000
# RFC 1918 and RFC 4193 only, as Go's netip.Addr.IsPrivate (Python's is_private is wider: it
# also covers 198.18/15, which our labs use as the "public" underlay).
_PRIVATE: Final = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


class CandidateSource(Flag):
    """Where a candidate endpoint came from; a candidate with no source left is deleted."""

    NONE = 0
    CONFIG = auto()
    CALL_ME_MAYBE = auto()
    LEARNED = auto()
    NETMAP = auto()  # the peer's endpoints as the coordinator's netmap lists them


@dataclass(frozen=True, slots=True)
class PongResult:
    """One pong: when it arrived, the round trip, and where the peer saw our ping come from."""

    at: float
    latency: float
    pong_src: Endpoint


@dataclass(frozen=True, slots=True)
class AddrLatency:
    """A direct path and its latest measured round trip (seconds)."""

    endpoint: Endpoint
    latency: float


@dataclass(slots=True)
class Candidate:
    """One candidate endpoint of a peer. Owned by its PeerPath."""

    endpoint: Endpoint
    sources: CandidateSource = CandidateSource.NONE
    last_ping: float | None = None  # when we last sent a discovery/heartbeat ping to it
    learned_at: float | None = None  # last ping or packet from it (LEARNED source)
    pongs: deque[PongResult] = field(default_factory=lambda: deque(maxlen=PONG_HISTORY_COUNT))

    def record_pong(self, result: PongResult) -> None:
        self.pongs.append(result)

    @property
    def latest_latency(self) -> float | None:
        return self.pongs[-1].latency if self.pongs else None

    def ping_due(self, now: float, interval: float) -> bool:
        """Not pinged within `interval` (discoPingInterval)."""
        return self.last_ping is None or now - self.last_ping >= interval

    def expire_learned(self, now: float, lifetime: float) -> None:
        """Drop the LEARNED source once nothing came from the endpoint for `lifetime`."""
        if (
            CandidateSource.LEARNED in self.sources
            and self.learned_at is not None
            and now - self.learned_at > lifetime
        ):
            self.sources &= ~CandidateSource.LEARNED

    @property
    def alive(self) -> bool:
        return self.sources != CandidateSource.NONE


def _bonus(endpoint: Endpoint) -> int:
    try:
        ip = ipaddress.ip_address(endpoint[0])
    except ValueError:
        return 0
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    points = 0
    if ip.is_loopback:
        points += 50
    elif ip.is_link_local:
        points += 30
    elif any(ip in net for net in _PRIVATE):
        points += 20
    if ip.version == 6:
        points += 10
    return points


def path_points(a: AddrLatency, b: AddrLatency) -> tuple[int, int]:
    """(points of a, points of b) as betterAddr counts them (§8.6 step 3)."""
    lat_a = int(a.latency * _NS)
    lat_b = int(b.latency * _NS)
    points_a = points_b = 0
    if lat_a > lat_b and lat_a > 0:
        points_b = 100 - (100 * lat_b) // lat_a
    elif lat_b > 0:
        points_a = 100 - (100 * lat_a) // lat_b
    return points_a + _bonus(a.endpoint), points_b + _bonus(b.endpoint)


def better_path(a: AddrLatency | None, b: AddrLatency | None) -> bool:
    """Whether `a` should replace the current best path `b` (tailscaled betterAddr, §8.6)."""
    if a is not None and b is not None and a.endpoint == b.endpoint:
        return False  # same address: only a larger MTU would win, and we do not probe MTU
    if b is None:
        return a is not None
    if a is None:
        return False
    points_a, points_b = path_points(a, b)
    if points_a <= 1 and points_b == 0:
        return False
    return points_a > points_b
