"""What a netcheck measures: the STUN targets it is given, the probes it plans, the Report it
builds, and the timings that shape it (tailscale net/netcheck Report).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from agent.proto.endpoint import format_endpoint

__all__ = [
    "HISTORY_MAX_AGE",
    "HISTORY_REPORTS",
    "Endpoint",
    "Family",
    "NetcheckTimings",
    "StunTarget",
    "RegionTargets",
    "Probe",
    "ProbePlan",
    "DEFAULT_TIMINGS",
    "Report",
]

Endpoint = tuple[str, int]

HISTORY_MAX_AGE: Final = 305.0  # reports kept for the home choice: 5 min + the report timeout
HISTORY_REPORTS: Final = 3  # ... and at most this many (the newest)


class Family(IntEnum):
    V4 = 4
    V6 = 6


@dataclass(frozen=True, slots=True)
class NetcheckTimings:
    """Limits and intervals of one Netchecker; tests pass shorter ones."""

    stun_timeout: float = 3.0  # the STUN phase never lasts longer
    https_timeout: float = 5.0  # budget of the HTTPS latency checks (the shell enforces it)
    full_interval: float = 300.0  # a full report at least this often
    initial_retransmit: float = 0.100  # spacing of the full plan's tries
    active_retransmit: float = 0.200  # incremental spacing for a region with no last latency
    full_tries: int = 3
    enough_regions: int = 3  # answers from this many regions start the stop timer
    incremental_regions: int = 3
    home_history_age: float = HISTORY_MAX_AGE
    home_history_reports: int = HISTORY_REPORTS


DEFAULT_TIMINGS: Final = NetcheckTimings()


@dataclass(frozen=True, slots=True)
class StunTarget:
    """One DERP node's STUN server, resolved: an address per family it has (or None)."""

    v4: Endpoint | None = None
    v6: Endpoint | None = None

    def addr(self, family: Family) -> Endpoint | None:
        return self.v4 if family is Family.V4 else self.v6


@dataclass(frozen=True, slots=True)
class RegionTargets:
    """A region as netcheck sees it: its STUN servers (node order) and whether it has a DERP
    node to time over HTTPS."""

    id: int
    stun: tuple[StunTarget, ...] = ()
    https: bool = True


@dataclass(frozen=True, slots=True)
class Probe:
    region: int
    family: Family
    endpoint: Endpoint
    delay: float  # seconds after the run started


ProbePlan = dict[tuple[int, Family], tuple[Probe, ...]]


@dataclass(frozen=True, slots=True)
class Report:
    """One netcheck result. Latencies are seconds; `region_latency` is the best per region over
    STUN and HTTPS, `region_v4_latency`/`region_v6_latency` are STUN only."""

    udp: bool
    ipv4: bool
    ipv6: bool
    ipv6_os: bool  # the host could send IPv6 (a socket and a route)
    global_v4: Endpoint | None
    global_v6: Endpoint | None
    endpoints: tuple[Endpoint, ...]  # every distinct public address STUN servers saw
    mapping_varies_by_dest_ip: bool | None  # None: fewer than two IPv4 STUN servers answered
    region_latency: Mapping[int, float]
    region_v4_latency: Mapping[int, float]
    region_v6_latency: Mapping[int, float]
    https_regions: frozenset[int]  # regions whose latency came from HTTPS
    full: bool
    started: float
    duration: float
    preferred_region: int | None = None  # the home after this report (Netchecker.finish)
    pinned: bool = False  # preferred_region is the config's pin
    port_mapping: tuple[str, ...] | None = None  # what the gateway answered (upnp, pmp, pcp)

    @property
    def nearest_region(self) -> int | None:
        """The region with the lowest latency in this report alone (None: none answered)."""
        if not self.region_latency:
            return None
        return min(self.region_latency, key=lambda r: (self.region_latency[r], r))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: addresses as "ip:port" ("[v6]:port"), latencies in seconds."""

        def lat(m: Mapping[int, float]) -> dict[str, float]:
            return {str(r): round(m[r], 6) for r in sorted(m)}

        return {
            "udp": self.udp,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "ipv6_os_support": self.ipv6_os,
            "global_v4": _fmt(self.global_v4),
            "global_v6": _fmt(self.global_v6),
            "endpoints": [_fmt(e) for e in self.endpoints],
            "mapping_varies_by_dest_ip": self.mapping_varies_by_dest_ip,
            "nearest_region": self.nearest_region,
            "preferred_region": self.preferred_region,
            "preferred_pinned": self.pinned,
            "region_latency": lat(self.region_latency),
            "region_v4_latency": lat(self.region_v4_latency),
            "region_v6_latency": lat(self.region_v6_latency),
            "https_regions": sorted(self.https_regions),
            "full": self.full,
            "duration": round(self.duration, 6),
            "port_mapping": None if self.port_mapping is None else list(self.port_mapping),
        }


def _fmt(ep: Endpoint | None) -> str | None:
    if ep is None:
        return None
    return format_endpoint(ep)


# -- probe plans -----------------------------------------------------------------------------------
