"""Netmaps under an access policy: the issue's four nodes, each node's peers and packet filter,
a policy change, no policy (never set, or cleared), and the DNS domain; through the Service (no
sockets) and, for a live change reaching a long-polling node, through the real server.

    alice-laptop (alice) ──80,443──► web (tag:web) ──5432──► db (tag:db)
    bob-laptop   (bob)   ──80,443──┘
    each user reaches their own untagged devices (autogroup:self)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

import pytest

from agent.coordinator.config import CoordinatorConfig
from agent.coordinator.identity import policy_nodes
from agent.coordinator.records import NodeRecord
from agent.coordinator.service import Service
from agent.coordinator.store import Store
from agent.keys import DiscoPrivate, NodePrivate
from agent.policy.checks import check_policy
from agent.policy.rules import ALL_PORTS, FilterRule, NetPortRange, PortRange
from agent.proto.coordinator_messages import NetMap
from tests.coordinator.test_api import _config, _join, running

V4 = IPv4Network("100.64.0.0/10")
V6 = IPv6Network("fd7a:115c:a1e0::/48")
NOW = 1_800_000_000.0

POLICY = """{
  // the example of the access-control issue
  "groups": {"group:dev": ["alice@", "bob@"]},
  "tagOwners": {"tag:web": ["group:dev"], "tag:db": ["tag:web"]},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
  "tests": [
    {"src": "alice@", "accept": ["tag:web:443"], "deny": ["tag:db:5432", "bob@:22"]},
    {"src": "tag:web", "accept": ["tag:db:5432"], "deny": ["alice@:22"]},
  ],
}"""
# The same without the web -> db rule.
NO_DB = POLICY.replace(
    '{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},', ""
).replace('{"src": "tag:web", "accept": ["tag:db:5432"], "deny": ["alice@:22"]},', "")


@dataclass
class Net:
    store: Store
    service: Service
    alice: NodeRecord
    bob: NodeRecord
    web: NodeRecord
    db: NodeRecord

    def netmap(self, node: NodeRecord, now: float = NOW) -> NetMap:
        reply = self.service.netmap_reply(node.id, self.store.snapshot(), now)
        assert reply.status == 200, reply.body
        return NetMap.parse(reply.body)

    def peers(self, node: NodeRecord) -> set[str]:
        return {p.name for p in self.netmap(node).peers}


def _node(store: Store, key: str, hostname: str) -> NodeRecord:
    node, _ = store.register_node(
        auth_key=key,
        node_key=NodePrivate.generate().public(),
        disco_key=DiscoPrivate.generate().public(),
        hostname=hostname,
        endpoints=(),
        home_region=None,
        timestamp=NOW,
        key_lifetime=None,
        ipv4_range=V4,
        ipv6_range=V6,
        now=NOW,
    )
    return node


@pytest.fixture
def net(database: str) -> Iterator[Net]:
    store = Store.open(database)
    try:

        def key(user: str, *tags: str) -> str:
            secret, _ = store.create_auth_key(
                reusable=False, expires=None, now=NOW, user=user, tags=tags
            )
            return secret

        alice = _node(store, key("alice"), "alice-laptop")
        bob = _node(store, key("bob"), "bob-laptop")
        web = _node(store, key("alice", "tag:web"), "web")
        db = _node(store, key("alice", "tag:db"), "db")
        config = CoordinatorConfig(database=database, dns_domain="corp.internal")
        yield Net(store, Service(store, config), alice, bob, web, db)
    finally:
        store.close()


def _set(net: Net, text: str) -> int:
    nodes = policy_nodes(net.store.list_nodes())
    check_policy(text, known_users=net.store.known_users(), nodes=nodes)
    return net.store.set_policy(text)


def _host(node: NodeRecord) -> tuple[IPv4Network | IPv6Network, ...]:
    return (ip_network(node.ipv4), ip_network(node.ipv6))


def _to(node: NodeRecord, *ports: PortRange) -> tuple[NetPortRange, ...]:
    return tuple(NetPortRange(n, p) for n in _host(node) for p in ports)


def test_without_a_policy_everyone_sees_everyone_and_no_filter(net: Net) -> None:
    for node in (net.alice, net.bob, net.web, net.db):
        nm = net.netmap(node)
        assert nm.packet_filter is None
        assert len(nm.peers) == 3
        assert nm.dns_domain == "corp.internal"
    nm = net.netmap(net.web)
    assert (nm.self_node.user, nm.self_node.tags) == (None, ("tag:web",))
    assert {(p.name, p.user, p.tags) for p in nm.peers} == {
        ("alice-laptop", "alice", ()), ("bob-laptop", "bob", ()), ("db", None, ("tag:db",))
    }  # fmt: skip


def test_four_nodes_get_exactly_their_peers_and_filters(net: Net) -> None:
    _set(net, POLICY)
    assert net.peers(net.alice) == {"web"}
    assert net.peers(net.bob) == {"web"}
    assert net.peers(net.web) == {"alice-laptop", "bob-laptop", "db"}
    assert net.peers(net.db) == {"web"}
    tcp_udp_icmp = frozenset({6, 17, 1, 58})
    web80 = PortRange(80, 80)
    web443 = PortRange(443, 443)
    devs = tuple(sorted(_host(net.alice) + _host(net.bob), key=lambda n: (n.version, n)))
    assert net.netmap(net.web).packet_filter == (
        FilterRule(devs, _to(net.web, web80, web443), tcp_udp_icmp),
    )
    assert net.netmap(net.db).packet_filter == (
        FilterRule(_host(net.web), _to(net.db, PortRange(5432, 5432)), tcp_udp_icmp),
    )
    # alice's laptop accepts only alice's own devices (itself here); likewise bob's
    for laptop in (net.alice, net.bob):
        assert net.netmap(laptop).packet_filter == (
            FilterRule(_host(laptop), _to(laptop, ALL_PORTS), tcp_udp_icmp),
        )


def test_a_policy_change_bumps_the_version_and_changes_the_netmaps(net: Net) -> None:
    first = _set(net, POLICY)
    before = net.netmap(net.db)
    assert before.version == first
    assert {p.name for p in before.peers} == {"web"}
    second = _set(net, NO_DB)
    assert second == first + 1 == net.store.version()
    after = net.netmap(net.db)
    assert after.version == second
    assert after.peers == ()
    assert after.packet_filter == ()
    assert net.peers(net.web) == {"alice-laptop", "bob-laptop"}


def test_clearing_the_policy_brings_back_every_peer_and_no_filter(net: Net) -> None:
    first = _set(net, POLICY)
    assert net.peers(net.db) == {"web"}
    cleared = net.store.clear_policy()
    assert cleared == first + 1 == net.store.version()
    assert net.store.policy() is None
    for node in (net.alice, net.bob, net.web, net.db):
        nm = net.netmap(node)
        assert nm.version == cleared
        assert nm.packet_filter is None
        assert len(nm.peers) == 3
    assert net.store.clear_policy() is None  # nothing left to clear: no new version
    assert net.store.version() == cleared


def test_expired_peers_are_left_out_and_the_cache_follows_the_snapshot(net: Net) -> None:
    _set(net, POLICY)
    snap = net.store.snapshot()
    assert net.service.netmap_reply(net.web.id, snap, NOW).status == 200
    net.store.expire_node(net.db.id, NOW)
    assert net.peers(net.web) == {"alice-laptop", "bob-laptop"}
    assert net.service.netmap_reply(net.db.id, net.store.snapshot(), NOW + 1).status == 403


def test_a_stored_policy_that_no_longer_parses_fails_closed(net: Net) -> None:
    net.store.set_policy("{ this is not a policy")  # as if the database were edited by hand
    nm = net.netmap(net.alice)
    assert nm.peers == ()
    assert nm.packet_filter == ()


@pytest.mark.asyncio
async def test_a_live_policy_change_reaches_a_waiting_node(database: str, tmp_path: Path) -> None:
    async with running(_config(database, tmp_path)) as coord:
        alice, _ = coord.admin.create_auth_key(reusable=True, expires=None, now=time.time(),
                                               user="alice")  # fmt: skip
        web, _ = coord.admin.create_auth_key(reusable=True, expires=None, now=time.time(),
                                             user="alice", tags=("tag:web",))  # fmt: skip
        db, _ = coord.admin.create_auth_key(reusable=True, expires=None, now=time.time(),
                                            user="alice", tags=("tag:db",))  # fmt: skip
        laptop, _, _ = await _join(coord, alice, "alice-laptop")
        await _join(coord, web, "web")
        server, _, _ = await _join(coord, db, "db")
        nm = await server.poll_netmap()
        assert len(nm.peers) == 2
        assert nm.packet_filter is None
        assert nm.dns_domain == "mesh.internal"
        waiting = asyncio.create_task(server.poll_netmap(since=nm.version))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        coord.admin.set_policy(POLICY)
        nm = await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 1.5
        assert [p.name for p in nm.peers] == ["web"]
        assert nm.packet_filter is not None
        assert len(nm.packet_filter) == 1
        assert [p.name for p in (await laptop.poll_netmap()).peers] == ["web"]
