"""NetmapPeers: coordinator netmaps applied to a real WireGuard core and path engine."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from agent.config import DerpConfig
from agent.engine.discokeys import static_disco_private
from agent.engine.engine import PathEngine
from agent.keys import DiscoPrivate, NodePrivate, NodePublic
from agent.node.netmap_peers import NetmapPeers
from agent.proto.coordinator_messages import NetMap, NodeInfo
from agent.proto.wireguard.device import Device

OWN = NodePrivate.generate()
STATIC = NodePrivate.generate().public()


def node(i: int, key: NodePublic | None = None, **kw: object) -> NodeInfo:
    info = NodeInfo(
        id=i,
        name=f"n{i}",
        node_key=key or NodePrivate.generate().public(),
        disco_key=DiscoPrivate.generate().public(),
        ipv4=IPv4Address(f"100.64.0.{i}"),
        ipv6=IPv6Address(f"fd7a:115c:a1e0::{i}"),
        endpoints=((f"198.18.{i}.1", 41641),),
        home_region=900,
        key_expiry=None,
    )
    return dataclasses.replace(info, **kw)  # type: ignore[arg-type]


def netmap(version: int, *peers: NodeInfo) -> NetMap:
    return NetMap(
        version=version,
        self_node=node(1, OWN.public()),
        peers=peers,
        ipv4_range=IPv4Network("100.64.0.0/10"),
        ipv6_range=IPv6Network("fd7a:115c:a1e0::/48"),
        derp=DerpConfig(),
    )


def setup() -> tuple[NetmapPeers, Device, PathEngine, dict[NodePublic, str]]:
    device = Device(OWN)
    device.add_peer(STATIC, allowed_ips=[ip_network("100.64.9.9/32")])
    paths = PathEngine(static_disco_private(OWN), OWN.public(), 900)
    names = {STATIC: "static"}
    return NetmapPeers(OWN.public(), {STATIC}, names), device, paths, names


def test_added_changed_removed_and_own_and_static_untouched() -> None:
    peers, device, paths, names = setup()
    b, c = node(2), node(3)
    own_again = node(4, OWN.public())
    static_again = node(5, STATIC)
    change = peers.apply(netmap(1, b, c, own_again, static_again), device, paths, 10.0)
    assert (change.peers, change.added, change.changed, change.removed) == (2, 2, 0, 0)
    assert set(device.peers) == {STATIC, b.node_key, c.node_key}
    assert paths.has_disco(b.node_key)
    assert names[b.node_key] == "n2"
    assert device.route(bytes([100, 64, 9, 9])) is device.peers[STATIC]  # allowed IPs kept
    assert device.route(bytes([100, 64, 0, 2])) is device.peers[b.node_key]

    session_peer = device.peers[b.node_key]
    b2 = dataclasses.replace(b, ipv4=IPv4Address("100.64.0.22"), endpoints=(("198.18.2.2", 1),))
    change = peers.apply(netmap(2, b2), device, paths, 11.0)
    assert (change.peers, change.added, change.changed, change.removed) == (1, 0, 1, 1)
    assert device.peers[b.node_key] is session_peer  # updated in place, not re-created
    assert device.route(bytes([100, 64, 0, 22])) is session_peer
    assert device.route(bytes([100, 64, 0, 2])) is None
    assert c.node_key not in device.peers
    assert not paths.has_peer(c.node_key)
    assert c.node_key not in names

    assert peers.apply(netmap(3, b2), device, paths, 12.0).changed == 0  # nothing new


def test_drop_all_leaves_static_peers() -> None:
    peers, device, paths, names = setup()
    peers.apply(netmap(1, node(2), node(3)), device, paths, 10.0)
    assert peers.drop_all(device, paths) == 2
    assert set(device.peers) == {STATIC}
    assert names == {STATIC: "static"}
    assert peers.drop_all(device, paths) == 0
