"""The port-mapping client's vocabulary: protocols, phases, configuration, the mapping, the
HTTP exchanges it asks the shell for, and the events it reports."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum, StrEnum

from agent.proto.errors import LocalProtocolError
from agent.proto.portmap.http import HttpExchange

__all__ = [
    "Endpoint",
    "IPv4",
    "Protocol",
    "Phase",
    "PortmapTimings",
    "PortmapConfig",
    "Mapping",
    "HttpRequest",
    "ProbeDone",
    "MappingChanged",
    "MappingLost",
    "PortmapEvent",
]

IPv4 = ipaddress.IPv4Address
Endpoint = tuple[str, int]


class Protocol(StrEnum):
    """Names as `agent netcheck` prints them (tailscale netcheck: "PortMapping: UPnP, NAT-PMP")."""

    PCP = "pcp"
    PMP = "pmp"
    UPNP = "upnp"


class Phase(Enum):
    IDLE = "idle"
    PROBING = "probing"
    MAPPING = "mapping"
    MAPPED = "mapped"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class PortmapTimings:
    probe_timeout: float = 2.0  # a probe waits this long for all three protocols
    retransmit: float = 0.25  # first UDP retransmit (RFC 6886 §3.1), doubling each time
    request_timeout: float = 3.0  # a mapping request (UDP or one HTTP exchange) gives up
    lifetime: int = 7200  # seconds asked for (RFC 6886 §3.3 recommends two hours)
    permanent_renew: float = 1200.0  # how often a "permanent" (lease 0) UPnP entry is re-added
    # Between renewals: is the router's state still there? A rebooted router is noticed (and
    # the mapping made again) within this; one small request, or one HTTP exchange for UPnP.
    check_interval: float = 20.0
    backoff_min: float = 10.0
    backoff_max: float = 600.0
    stop_timeout: float = 1.0  # how long stop() waits for the delete's answer
    # A router announcing on 224.0.0.1:5350 that it lost its state is mapped again after a
    # random delay up to this (every client on the LAN hears the same announcement).
    announce_delay: float = 1.0


@dataclass(frozen=True, slots=True)
class PortmapConfig:
    internal_port: int  # our WireGuard UDP port: the one port every request maps
    protocols: tuple[Protocol, ...] = (Protocol.PCP, Protocol.PMP, Protocol.UPNP)  # preference
    description: str = "agent wireguard"
    timings: PortmapTimings = PortmapTimings()
    probe_only: bool = False  # `agent netcheck`: report what answers, map nothing, then stop

    def __post_init__(self) -> None:
        if not 1 <= self.internal_port <= 65535:
            raise LocalProtocolError(f"internal port {self.internal_port} is not 1..65535")
        if not self.protocols or len(set(self.protocols)) != len(self.protocols):
            raise LocalProtocolError("protocols must name each protocol at most once")


@dataclass(frozen=True, slots=True)
class Mapping:
    protocol: Protocol
    external: Endpoint
    internal_port: int
    lifetime: int  # seconds granted; 0 = permanent (UPnP)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """Do this exchange (connect host:port, send, read within `timeout`), then answer with
    receive_http(id, ...) or http_failed(id, ...)."""

    id: int
    host: str
    port: int
    exchange: HttpExchange
    timeout: float


@dataclass(frozen=True, slots=True)
class ProbeDone:
    available: frozenset[Protocol]
    gateway: str


@dataclass(frozen=True, slots=True)
class MappingChanged:
    mapping: Mapping


@dataclass(frozen=True, slots=True)
class MappingLost:
    protocol: Protocol
    external: Endpoint
    reason: str


PortmapEvent = ProbeDone | MappingChanged | MappingLost
