"""The DERP map: relay regions and their nodes, from the config's `[derp]` table or the coordinator.

Pure data, shared by the config parser, the coordinator's wire messages and the node's DERP
links (the role of tailscale's `tailcfg.DERPMap`, `DERPRegion` and `DERPNode`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DerpConfig", "DerpNode", "DerpRegion"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DerpNode:
    host: str
    port: int = 443
    stun_port: int = 3478  # 0 = no STUN on this node
    ca_file: str | None = None  # None = the system trust store
    insecure_skip_verify: bool = False  # labs only; the daemon logs it loudly


@dataclass(frozen=True, slots=True, kw_only=True)
class DerpRegion:
    id: int
    code: str
    nodes: tuple[DerpNode, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DerpConfig:
    home_region: int | None = None  # None = chosen by latency
    regions: tuple[DerpRegion, ...] = ()  # empty = direct only
