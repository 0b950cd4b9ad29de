"""Our own candidate endpoints, each with the source that found it (tailscale's EndpointType).

    PORTMAP   the router mapped our WireGuard port for us (UPnP IGD, NAT-PMP or PCP): reachable
              from anywhere while the mapping lasts, even behind an endpoint-dependent NAT
    STUN      what STUN servers saw our packets come from (one per distinct answer)
    LOCAL     an address of a local interface with our WireGuard port: peers behind the same
              NAT reach us over the LAN, without hairpinning through the router

`gather` orders them as above (the likeliest to work from far away first: CallMeMaybe and the
coordinator's list are bounded) and keeps the first source of an endpoint found twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from agent.engine.paths import Endpoint

__all__ = ["EndpointSource", "gather"]


class EndpointSource(StrEnum):
    PORTMAP = "portmap"
    STUN = "stun"
    LOCAL = "local"


def gather(
    found: Mapping[EndpointSource, Iterable[Endpoint]],
) -> list[tuple[Endpoint, EndpointSource]]:
    """Every endpoint once, PORTMAP first, then STUN, then LOCAL, each with its source."""
    out: list[tuple[Endpoint, EndpointSource]] = []
    seen: set[Endpoint] = set()
    for source in EndpointSource:
        for ep in found.get(source, ()):
            key = (str(ep[0]), int(ep[1]))
            if key not in seen:
                seen.add(key)
                out.append((key, source))
    return out
