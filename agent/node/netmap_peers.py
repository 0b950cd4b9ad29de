"""The peers a coordinator hands out, kept in step with the WireGuard core and the path engine.

Each netmap is applied whole: a node new to us is added (its overlay addresses as allowed IPs,
its disco key and home region to the path engine, its endpoints as DISCO candidates), a changed
node is updated in place (no session is torn down for an endpoint or region change), a node that
is gone is removed, and the netmap's packet filter (the policy's rules for this node) goes to
the data plane's `Access`. Our own node and the config's static peers are never touched,
whatever the netmap says about them. When the coordinator link stops for good, every
coordinated peer goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.engine.engine import PathEngine
from agent.keys import NodePublic
from agent.node.access import Access
from agent.proto.coordinator_messages import NetMap, NodeInfo
from agent.proto.wireguard.device import Device

__all__ = ["NetmapChange", "NetmapPeers"]


@dataclass(frozen=True, slots=True)
class NetmapChange:
    peers: int
    added: int
    changed: int
    removed: int


class NetmapPeers:
    """Coordinated peers by node key. Owned by the daemon's event loop."""

    def __init__(
        self,
        own: NodePublic,
        static: set[NodePublic],
        names: dict[NodePublic, str],
        access: Access | None = None,
    ) -> None:
        self.own = own
        self.static = static
        self.names = names  # shared with the daemon: display names of every peer
        self.access = access  # the packet filter: the netmap's rules for this node
        self.nodes: dict[NodePublic, NodeInfo] = {}
        self.self_name: str | None = None  # ours, as the coordinator names us

    def apply(self, netmap: NetMap, device: Device, paths: PathEngine, now: float) -> NetmapChange:
        self.self_name = netmap.self_node.name
        seen: dict[NodePublic, NodeInfo] = {}
        added = changed = 0
        for node in netmap.peers:
            key = node.node_key
            if key == self.own or key in self.static:
                continue
            seen[key] = node
            old = self.nodes.get(key)
            if old == node:
                continue
            self.names[key] = node.name
            if old is None:
                device.add_peer(key, allowed_ips=node.allowed_ips())
                added += 1
            else:
                peer = device.peers.get(key)
                if peer is not None:
                    device.set_allowed_ips(peer, node.allowed_ips(), replace=True)
                changed += 1
            if old is None or (old.disco_key, old.home_region) != (
                node.disco_key,
                node.home_region,
            ):
                paths.add_peer(key, derp_region=node.home_region, disco_key=node.disco_key)
                paths.set_netmap_endpoints(key, node.endpoints, now)
            elif old.endpoints != node.endpoints:
                paths.set_netmap_endpoints(key, node.endpoints, now)
        removed = [key for key in self.nodes if key not in seen]
        for key in removed:
            self._forget(key, device, paths)
        self.nodes = seen
        if self.access is not None:
            # Rules after peers: a peer the policy newly allows is there when its packets pass.
            self.access.set_rules(netmap.packet_filter, netmap.addresses())
        return NetmapChange(len(seen), added, changed, len(removed))

    def owner(self, key: NodePublic) -> tuple[str | None, tuple[str, ...]]:
        """(user, tags) of a coordinated peer, as the coordinator said; (None, ()) otherwise."""
        node = self.nodes.get(key)
        return (None, ()) if node is None else (node.user, node.tags)

    def own_name(self) -> str | None:
        return self.self_name

    def drop_all(self, device: Device | None, paths: PathEngine) -> int:
        """Out of the network: remove every coordinated peer; how many there were."""
        count = len(self.nodes)
        for key in list(self.nodes):
            self._forget(key, device, paths)
        self.nodes = {}
        return count

    def _forget(self, key: NodePublic, device: Device | None, paths: PathEngine) -> None:
        if device is not None:
            device.remove_peer(key)
        paths.remove_peer(key)
        self.names.pop(key, None)
