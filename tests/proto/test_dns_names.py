"""Node names: sanitising, unique and stable assignment, FQDNs, reverse names."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proto.dns.names import (
    DEFAULT_DOMAIN,
    address_from_reverse,
    assign_name,
    assign_names,
    fqdn,
    is_reverse_zone_name,
    is_valid_label,
    normalize_domain,
    reverse_name,
    sanitize_label,
)
from agent.proto.errors import LocalProtocolError


@pytest.mark.parametrize(
    ("hostname", "label"),
    [
        ("laptop", "laptop"),
        ("Laptop", "laptop"),
        ("Bob's MacBook Pro.local", "bob-s-macbook-pro"),
        ("node_a", "node-a"),
        ("--edge--", "edge"),
        ("a..b", "a"),
        ("web server  01", "web-server-01"),
        ("", "node"),
        ("...", "node"),
        ("!!!", "node"),
        ("münchen", "xn--mnchen-3ya"),
        ("\uff2c\uff21\uff30\uff34\uff2f\uff30", "laptop"),  # fullwidth letters: NFKC
        ("😀", "node"),
        ("x" * 80, "x" * 63),
        ("a" * 62 + "-b", "a" * 62),  # cut at 63, no trailing '-'
    ],
)
def test_sanitize_label(hostname: str, label: str) -> None:
    assert sanitize_label(hostname) == label


def test_non_ascii_too_long_for_punycode_drops_the_letters() -> None:
    label = sanitize_label("ab" + "ü" * 70)
    assert label == "ab"


@given(st.text(max_size=200))
def test_sanitize_always_gives_a_valid_label(hostname: str) -> None:
    assert is_valid_label(sanitize_label(hostname))


def test_assign_name_suffixes() -> None:
    assert assign_name("laptop", set()) == "laptop"
    assert assign_name("laptop", {"laptop"}) == "laptop-1"
    assert assign_name("laptop", {"laptop", "laptop-1"}) == "laptop-2"
    long = "x" * 63
    assert assign_name(long, {long}) == "x" * 61 + "-1"
    assert len(assign_name(long, {long, "x" * 61 + "-1"})) == 63


def test_clashes_in_join_order() -> None:
    names = assign_names({"k1": "laptop", "k2": "Laptop", "k3": "laptop.lan"}, {})
    assert names == {"k1": "laptop", "k2": "laptop-1", "k3": "laptop-2"}


def test_existing_node_keeps_its_name() -> None:
    previous = {"k1": "laptop-1", "k2": "laptop"}
    # k3 joins first in the mapping's order, but the existing names stay put.
    names = assign_names({"k3": "laptop", "k1": "laptop", "k2": "laptop"}, previous)
    assert names == {"k3": "laptop-2", "k1": "laptop-1", "k2": "laptop"}


def test_removed_node_frees_its_name_for_newcomers_only() -> None:
    first = assign_names({"k1": "laptop", "k2": "laptop"}, {})
    assert first == {"k1": "laptop", "k2": "laptop-1"}
    second = assign_names({"k2": "laptop", "k3": "laptop"}, first)
    assert second == {"k2": "laptop-1", "k3": "laptop"}


def test_rename_gives_a_new_name() -> None:
    names = assign_names({"k1": "desktop"}, {"k1": "laptop"})
    assert names == {"k1": "desktop"}
    # a suffixed name of a different base is not kept either
    assert assign_names({"k1": "laptop-pro"}, {"k1": "laptop-1"}) == {"k1": "laptop-pro"}


@given(st.lists(st.sampled_from(["a", "A", "a-1", "b", "a.x", "ü", "", "a-2"]), max_size=30))
def test_assigned_names_unique_valid_and_stable(hosts: list[str]) -> None:
    requests = {f"k{i}": h for i, h in enumerate(hosts)}
    names = assign_names(requests, {})
    assert len(set(names.values())) == len(names)
    assert all(is_valid_label(n) for n in names.values())
    assert assign_names(requests, names) == names
    # dropping half the nodes never renames the others
    kept = dict(list(requests.items())[::2])
    again = assign_names(kept, names)
    assert all(again[k] == names[k] for k in kept)


def test_fqdn_and_domain() -> None:
    assert DEFAULT_DOMAIN == "mesh.internal"
    assert fqdn("laptop") == "laptop.mesh.internal"
    assert fqdn("laptop", "Corp.Example.") == "laptop.corp.example"
    assert normalize_domain("MESH.internal.") == "mesh.internal"
    for bad in ("", ".", "a..b", "-a.b", "a_b.c", "x" * 64 + ".com"):
        with pytest.raises(LocalProtocolError):
            normalize_domain(bad)
    with pytest.raises(LocalProtocolError):
        fqdn("Not Valid")


def test_reverse_names() -> None:
    v4 = ipaddress.IPv4Address("100.64.0.7")
    v6 = ipaddress.IPv6Address("fd7a:115c:a1e0::7")
    assert reverse_name(v4) == "7.0.64.100.in-addr.arpa"
    assert address_from_reverse(reverse_name(v4)) == v4
    assert address_from_reverse(reverse_name(v6)) == v6
    assert reverse_name(v6).endswith("0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa")
    # outside the overlay prefixes: not ours
    assert address_from_reverse("1.0.0.10.in-addr.arpa") is None
    assert address_from_reverse("1.0.128.100.in-addr.arpa") is None
    assert address_from_reverse(reverse_name(ipaddress.IPv6Address("fd7a:115c:a1e1::1"))) is None
    for bad in ("07.0.64.100.in-addr.arpa", "x.0.64.100.in-addr.arpa", "0.64.100.in-addr.arpa"):
        assert address_from_reverse(bad) is None


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("7.0.64.100.in-addr.arpa", True),
        ("64.100.in-addr.arpa", True),
        ("127.100.in-addr.arpa", True),
        ("128.100.in-addr.arpa", False),
        ("63.100.in-addr.arpa", False),
        ("100.in-addr.arpa", False),
        ("1.1.1.1.in-addr.arpa", False),
        ("0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa", True),
        ("1.0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa", True),
        ("e.1.a.c.5.1.1.a.7.d.f.ip6.arpa", False),
    ],
)
def test_reverse_zones(name: str, ours: bool) -> None:
    assert is_reverse_zone_name(name) is ours
