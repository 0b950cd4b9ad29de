"""The DNS service's name table, built from a netmap and from static peers (engine/dns_names.py)."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from agent.engine.dns_names import Host, NameBook, assign_labels, netmap_hosts, static_hosts
from agent.keys import DiscoPrivate, NodePrivate, NodePublic
from agent.proto.coordinator_messages import NetMap, NodeInfo
from agent.proto.derpmap import DerpConfig


def key() -> NodePublic:
    return NodePrivate.generate().public()


def node(i: int, name: str, node_key: NodePublic | None = None) -> NodeInfo:
    return NodeInfo(
        id=i,
        name=name,
        node_key=node_key or key(),
        disco_key=DiscoPrivate.generate().public(),
        ipv4=IPv4Address(f"100.64.0.{i}"),
        ipv6=IPv6Address(f"fd7a:115c:a1e0::{i}"),
        endpoints=(),
        home_region=None,
        key_expiry=None,
    )


def netmap(self_node: NodeInfo, *peers: NodeInfo, domain: str = "mesh.internal") -> NetMap:
    return NetMap(
        version=1,
        self_node=self_node,
        peers=peers,
        ipv4_range=IPv4Network("100.64.0.0/10"),
        ipv6_range=IPv6Network("fd7a:115c:a1e0::/48"),
        derp=DerpConfig(),
        dns_domain=domain,
    )


def test_self_and_peers_of_a_netmap_resolve_by_fqdn_and_bare_name() -> None:
    a, b = node(1, "node-a"), node(2, "node-b")
    table = NameBook().build(netmap_hosts(netmap(a, b)), "corp.internal")
    assert table.domain == "corp.internal"
    assert table.addresses(b"node-a") == (ip_address("100.64.0.1"), ip_address("fd7a:115c:a1e0::1"))
    assert table.addresses(b"node-b") == (ip_address("100.64.0.2"), ip_address("fd7a:115c:a1e0::2"))
    assert table.name_of(ip_address("fd7a:115c:a1e0::2")) == "node-b.corp.internal"
    assert table.addresses(b"node-c") is None


def test_a_join_adds_a_name_and_a_removal_takes_it_away() -> None:
    book = NameBook()
    a, b, c = node(1, "a"), node(2, "b"), node(3, "c")
    book.build(netmap_hosts(netmap(a, b)))
    assert book.table.addresses(b"c") is None
    book.build(netmap_hosts(netmap(a, b, c)))
    assert book.table.addresses(b"c") == (ip_address("100.64.0.3"), ip_address("fd7a:115c:a1e0::3"))
    book.build(netmap_hosts(netmap(a, c)))
    assert book.table.addresses(b"b") is None
    assert book.table.name_of(ip_address("100.64.0.2")) is None
    assert len(book.table) == 2


def test_names_that_are_not_labels_are_sanitised_and_clashes_suffixed_stably() -> None:
    first, second = Host(key(), "Laptop", ()), Host(key(), "laptop.local", ())
    labels = assign_labels([first, second], {})
    assert labels == {first.key: "laptop", second.key: "laptop-1"}
    # the second keeps its label when the first leaves and comes back later
    assert assign_labels([second], labels) == {second.key: "laptop-1"}
    assert assign_labels([first, second], labels) == labels
    # a rename gives a new label
    renamed = dataclasses.replace(second, name="desk")
    assert assign_labels([first, renamed], labels)[second.key] == "desk"


def test_skipped_keys_are_left_out_of_the_netmap() -> None:
    a, b = node(1, "a"), node(2, "b")
    assert [h.name for h in netmap_hosts(netmap(a, b), skip={b.node_key})] == ["a"]


def test_static_peers_are_named_for_their_single_address_prefixes() -> None:
    gw, plain = key(), key()
    hosts = static_hosts(
        [
            (gw, "gw", [ip_network("100.64.0.5/32"), ip_network("10.0.0.0/24")]),
            (plain, "pv3xaF61", [ip_network("fd7a:115c:a1e0::6/128")]),
        ]
    )
    table = NameBook().build(hosts)
    assert table.domain == "mesh.internal"
    assert table.addresses(b"gw") == (ip_address("100.64.0.5"),)
    assert table.addresses(b"pv3xaf61") == (ip_address("fd7a:115c:a1e0::6"),)


def test_a_host_without_addresses_takes_its_label_but_has_no_record() -> None:
    sub = Host(key(), "subnets", ())
    book = NameBook()
    table = book.build([sub, Host(key(), "subnets", (ip_address("100.64.0.9"),))])
    assert book.labels[sub.key] == "subnets"
    assert table.addresses(b"subnets") is None
    assert table.addresses(b"subnets-1") == (ip_address("100.64.0.9"),)
