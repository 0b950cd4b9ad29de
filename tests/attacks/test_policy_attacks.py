"""Attacks on access control: a node without a tag trying to get a tagged node's access, and a
peer sending from addresses it does not own.

    alice (group:dev) ──80,443──► web (tag:web) ──5432──► db (tag:db) ◄──22── mallory (user)

mallory joins with an auth key of her own, untagged, and wants what tag:web has (db:5432). She
tries a host name that reads like web's, asking for tags in her registration and updates,
re-registering (same node key) with web's auth key, a tagged key made for her before the policy
existed, and web's node key without web's private key. The coordinator (its Service, in
process: sealed requests as a node sends them) refuses or ignores every claim: she stays user
mallory without tags, db's netmap gives her port 22 only, and web never sees her.

Then the packets: db's data plane, configured from its netmap (WireGuard peers and packet
filter), receives mallory's traffic through a real WireGuard session. Her own address reaches
db:22 and nothing else; whatever she sends from web's address (a SYN, a segment of an open
connection, a "reply" to a flow db opened to web) is dropped by the WireGuard device, as the
source is outside her allowed IPs, and the packet filter on its own drops it too.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from agent.coordinator.config import CoordinatorConfig
from agent.coordinator.identity import policy_nodes
from agent.coordinator.records import NodeRecord
from agent.coordinator.service import Service
from agent.coordinator.store import Store
from agent.keys import DiscoPrivate, NodePrivate, NodePublic
from agent.node.access import Access
from agent.node.dataplane import DataPlane
from agent.policy.checks import check_policy
from agent.policy.filter import FilterDrop, PacketFilter, PeerSources
from agent.proto.coordinator_messages import (
    API,
    ErrorBody,
    NetMap,
    RegisterRequest,
    Registration,
    SealedRequest,
    SealedResponse,
    seal,
    unseal,
)
from agent.proto.errors import DropReason
from agent.proto.wireguard.device import Device
from tests.node.test_dataplane import Clock, FakeTun, FakeUdp, _deliver, drain_tun

NOW = 1_800_000_000.0

POLICY = """{
  "groups": {"group:dev": ["alice@"]},
  "tagOwners": {"tag:web": ["alice@"], "tag:db": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["mallory@"], "dst": ["tag:db:22"]},
  ],
  "tests": [
    {"src": "tag:web", "accept": ["tag:db:5432"]},
    {"src": "mallory@", "accept": ["tag:db:22"], "deny": ["tag:db:5432", "tag:web:80"]},
  ],
}"""


class Node:
    """A node as an attacker drives it: sealed requests straight to the coordinator's Service."""

    def __init__(self, service: Service, key: NodePrivate | None = None) -> None:
        self.service = service
        self.key = key or NodePrivate.generate()
        self.disco = DiscoPrivate.generate().public()
        self.token = ""
        self.id = 0
        self.clock = NOW

    def register(
        self,
        auth_key: str,
        hostname: str,
        *,
        extra: dict[str, object] | None = None,
        claim: NodePublic | None = None,
    ) -> tuple[int, str]:
        """Register; (HTTP status, error code or the node's name). `extra` adds fields to the
        request; `claim` names another node key than the one sealing the request."""
        self.clock += 1.0
        doc = json.loads(
            RegisterRequest(auth_key, self.disco, hostname, (), None, self.clock).encode()
        )
        doc.update(extra or {})
        server = self.service.server_key.public().raw
        nonce = os.urandom(24)
        box = seal(self.key, server, json.dumps(doc).encode(), nonce)
        body = SealedRequest(claim or self.key.public(), nonce, box).encode()
        reply = self.service.handle("POST", f"{API}/register", None, body, self.clock)
        if reply.status != 200:
            return reply.status, ErrorBody.parse(reply.body).error
        sealed = SealedResponse.parse(reply.body)
        reg = Registration.parse(unseal(self.key, server, sealed.nonce, sealed.sealed))
        self.token, self.id = reg.token, reg.node.id
        return 200, reg.node.name

    def update(self, extra: dict[str, object]) -> int:
        doc = {"disco_key": self.disco.to_b64(), "endpoints": [], "home_region": None, **extra}
        auth = f"Bearer {self.token}"
        reply = self.service.handle("POST", f"{API}/update", auth, json.dumps(doc).encode(), NOW)
        return reply.status

    def netmap(self) -> NetMap:
        store = self.service.store
        reply = self.service.netmap_reply(self.id, store.snapshot(), self.clock)
        assert reply.status == 200, reply.body
        return NetMap.parse(reply.body)


@dataclass
class Net:
    store: Store
    service: Service
    keys: dict[str, str]
    web: Node
    db: Node
    mallory: Node

    def record(self, node: Node) -> NodeRecord:
        return next(n for n in self.store.list_nodes() if n.id == node.id)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    database = str(tmp_path / "c.db")
    store = Store.open(database)
    try:

        def key(user: str, *tags: str, reusable: bool = False) -> str:
            secret, _ = store.create_auth_key(
                reusable=reusable, expires=None, now=NOW, user=user, tags=tags
            )
            return secret

        keys = {
            "alice": key("alice"),
            "web": key("alice", "tag:web"),
            "db": key("alice", "tag:db"),
            "mallory": key("mallory", reusable=True),
            # made while there was no policy, so no tagOwners said no
            "stale": key("mallory", "tag:web", reusable=True),
        }
        service = Service(store, CoordinatorConfig(database=database))
        web, db, mallory = Node(service), Node(service), Node(service)
        assert web.register(keys["web"], "web") == (200, "web")
        assert db.register(keys["db"], "db") == (200, "db")
        nodes = policy_nodes(store.list_nodes())
        check_policy(POLICY, known_users=store.known_users(), nodes=nodes)
        store.set_policy(POLICY)
        yield Net(store, service, keys, web, db, mallory)
    finally:
        store.close()


def _packet(src: str, dst: str, protocol: int, sport: int, dport: int, flags: int = 0) -> bytes:
    if protocol == 6:
        transport = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    else:
        transport = struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"data"
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(transport), 1, 0, 64, protocol, 0)
    return header + ip_address(src).packed + ip_address(dst).packed + transport


def _syn(src: str, dst: str, dport: int) -> bytes:
    return _packet(src, dst, 6, 40000, dport, flags=0x02)


def assert_mallory_gets_only_db_22(net: Net) -> None:
    """What the coordinator hands out: mallory untagged, db:22 for her and nothing more."""
    mallory = net.record(net.mallory)
    assert (mallory.user, mallory.tags) == ("mallory", ())
    assert mallory.name != "web"
    db_map = net.db.netmap()
    assert {p.name for p in db_map.peers} == {"web", mallory.name}
    assert net.mallory.id not in {p.id for p in net.web.netmap().peers}
    assert {p.name for p in net.mallory.netmap().peers} == {"db"}
    assert db_map.packet_filter is not None
    flt = PacketFilter(db_map.packet_filter, [a.ip for a in db_map.addresses()])
    her = PeerSources(ip_network(a) for a in (mallory.ipv4, mallory.ipv6))
    web = net.record(net.web)
    web_sources = PeerSources(ip_network(a) for a in (web.ipv4, web.ipv6))
    db_ip = str(db_map.self_node.ipv4)
    assert flt.check_inbound(_syn(str(mallory.ipv4), db_ip, 22), her) is None
    assert flt.check_inbound(_syn(str(mallory.ipv4), db_ip, 5432), her) is FilterDrop.DENIED
    assert flt.check_inbound(_syn(str(web.ipv4), db_ip, 5432), web_sources) is None
    assert flt.check_inbound(_syn(str(web.ipv4), db_ip, 5432), her) is FilterDrop.SPOOFED_SOURCE


def test_a_host_name_like_web_gives_no_tag(net: Net) -> None:
    status, name = net.mallory.register(net.keys["mallory"], "web")
    assert (status, name) == (200, "web-1")  # web's name is taken, and a name is no identity
    assert_mallory_gets_only_db_22(net)
    for hostname in ("tag:web", "web.mesh.internal", "WEB", "web-1"):
        status, name = net.mallory.register("", hostname)  # same node key: no auth key needed
        assert status == 200
        assert name != "web"
        assert_mallory_gets_only_db_22(net)


def test_asking_for_tags_at_registration_or_in_updates_is_ignored(net: Net) -> None:
    claims: dict[str, object] = {
        "tags": ["tag:web"],
        "RequestTags": ["tag:web"],
        "Hostinfo": {"RequestTags": ["tag:web"]},
        "user": "alice",
        "user_name": None,
    }
    assert net.mallory.register(net.keys["mallory"], "laptop", extra=claims)[0] == 200
    assert_mallory_gets_only_db_22(net)
    assert net.mallory.update(claims) == 200
    assert_mallory_gets_only_db_22(net)
    other = Node(net.service)  # a second node of hers, asking for tags from the start
    assert other.register(net.keys["mallory"], "web", extra=claims)[0] == 200
    assert (net.record(other).user, net.record(other).tags) == ("mallory", ())
    assert other.id not in {p.id for p in net.web.netmap().peers}


def test_re_registering_with_web_s_auth_key_keeps_the_node_key_s_identity(net: Net) -> None:
    assert net.mallory.register(net.keys["mallory"], "laptop")[0] == 200
    # web's one-off key has been used; while her key is valid a registration does not even
    # look at the auth key presented: her identity stays
    assert net.mallory.register(net.keys["web"], "web")[0] == 200
    assert_mallory_gets_only_db_22(net)
    # once her node is expired, a key must be valid to count: web's is used up, and the tagged
    # key made for her before the policy is refused by the policy's tagOwners
    net.store.expire_node(net.mallory.id, NOW)
    assert net.mallory.register(net.keys["web"], "laptop") == (401, "auth_key_used")
    assert net.mallory.register(net.keys["db"], "laptop") == (401, "auth_key_used")
    refused = (401, "auth_key_tags_not_allowed")
    assert net.mallory.register(net.keys["stale"], "laptop") == refused
    assert Node(net.service).register(net.keys["stale"], "web") == refused
    assert net.mallory.register(net.keys["mallory"], "laptop")[0] == 200  # back, as herself
    assert_mallory_gets_only_db_22(net)


def test_claiming_web_s_node_key_without_its_private_key_is_refused(net: Net) -> None:
    assert net.mallory.register(net.keys["mallory"], "laptop")[0] == 200
    web_before = net.record(net.web)
    for auth_key in ("", net.keys["mallory"], net.keys["web"]):
        status, code = net.mallory.register(auth_key, "web", claim=net.web.key.public())
        assert (status, code) == (401, "bad_seal")
    assert net.record(net.web) == web_before  # web's key, addresses and token unchanged
    assert net.web.update({}) == 200
    assert_mallory_gets_only_db_22(net)


# -- the packets ---------------------------------------------------------------------------


def test_mallory_s_packets_reach_db_22_only_and_never_from_web_s_address(net: Net) -> None:
    assert net.mallory.register(net.keys["mallory"], "web")[0] == 200
    db_map, web = net.db.netmap(), net.record(net.web)
    her, db_ip = str(net.record(net.mallory).ipv4), str(db_map.self_node.ipv4)
    clock = Clock()
    # db: WireGuard peers and packet filter exactly as its netmap says
    db_dev = Device(net.db.key)
    for peer in db_map.peers:
        endpoint = ("198.18.0.66", 1) if peer.id == net.mallory.id else None
        db_dev.add_peer(peer.node_key, endpoint=endpoint, allowed_ips=list(peer.allowed_ips()))
    db_tun, db_udp = FakeTun(), FakeUdp()
    db = DataPlane(db_tun, db_udp, db_dev, clock, lambda: None)  # type: ignore[arg-type]
    db.access = Access(clock)
    db.access.set_rules(db_map.packet_filter, db_map.addresses())
    # mallory routes the whole overlay to db, whatever the source of her packets
    m_dev = Device(net.mallory.key)
    m_dev.add_peer(
        net.db.key.public(), endpoint=("198.18.0.2", 1), allowed_ips=[ip_network("100.64.0.0/10")]
    )
    m_tun, m_udp = FakeTun(), FakeUdp()
    m = DataPlane(m_tun, m_udp, m_dev, clock, lambda: None)  # type: ignore[arg-type]

    def mallory_sends(*packets: bytes) -> list[bytes]:
        before = len(db_tun.written)
        m_tun.reads = list(packets)
        drain_tun(m, m_tun)
        for _ in range(3):  # handshake, then the data
            _deliver(m_udp, db_udp, db, "198.18.0.66")
            _deliver(db_udp, m_udp, m, "198.18.0.2")
        return [bytes(p) for p in db_tun.written[before:]]

    allowed = _syn(her, db_ip, 22)
    assert mallory_sends(allowed, _syn(her, db_ip, 5432)) == [allowed]
    assert db.stats.drops[DropReason.FILTER_DENIED] == 1

    # From web's address: a SYN to 5432, a segment of a connection as if web had one open, and
    # a "reply" to a UDP flow db opened to web. None gets in.
    db_tun.reads = [_packet(db_ip, str(web.ipv4), 17, 5000, 53)]
    drain_tun(db, db_tun)  # db's own packet to web opens that flow in its filter
    spoofed = [
        _syn(str(web.ipv4), db_ip, 5432),
        _packet(str(web.ipv4), db_ip, 6, 40000, 5432, flags=0x10),
        _packet(str(web.ipv4), db_ip, 17, 53, 5000),
    ]
    assert mallory_sends(*spoofed) == []
    assert db_dev.drops[DropReason.DISALLOWED_SOURCE] == len(spoofed)  # counted by WireGuard
    # and the filter, handed her sources, drops them too (were the device check ever skipped)
    assert db.access.filter is not None
    sources = PeerSources([ip_network(f"{her}/32")])
    passed, dropped = db.access.filter.check_batch(spoofed, sources, clock.now)
    assert passed == []
    assert {why for _, why in dropped} == {FilterDrop.SPOOFED_SOURCE}
    # web itself, from its own address, is let in on 5432 (the filter: db's rules and sources)
    web_sources = PeerSources([ip_network(f"{web.ipv4}/32")])
    assert db.access.filter.check_batch(spoofed[:1], web_sources, clock.now)[0] == spoofed[:1]
