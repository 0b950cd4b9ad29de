"""What a compiled policy is made of: nodes as the policy sees them, and filter rules.

A `FilterRule` is the per-node form Tailscale's `tailcfg.FilterRule` has: source prefixes,
destination prefixes each with a port range (`NetPortRange`), and IP protocol numbers. A node
receives only the rules whose destination is itself; its packet filter (`filter.py`) accepts a
new inbound flow when one rule matches all three.

Rules cross the wire in the netmap as JSON in tailcfg's spelling:

    {"SrcIPs": [..], "DstPorts": [{"IP": .., "Ports": {"First": .., "Last": ..}}], "IPProto": [..]}

`rules_to_json` / `rules_from_json` are that codec. Decoding is strict: the node must never run a
filter it half understood.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from agent.policy.errors import PolicyError

__all__ = [
    "IPAddress",
    "IPNetwork",
    "Node",
    "PortRange",
    "ALL_PORTS",
    "NetPortRange",
    "FilterRule",
    "PROTO_ICMP",
    "PROTO_TCP",
    "PROTO_UDP",
    "PROTO_ICMPV6",
    "PROTO_SCTP",
    "DEFAULT_PROTOCOLS",
    "PORTED_PROTOCOLS",
    "host_network",
    "rules_to_json",
    "rules_from_json",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
# A rule without `proto` allows these (tailcfg: "TCP, UDP, and ICMP" when IPProto is empty).
DEFAULT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6})
# Only these have ports; any other protocol takes `*` as its port list.
PORTED_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})


@dataclass(frozen=True, slots=True)
class Node:
    """A node as the policy sees it. A tagged node's identity is its tags; `user` is ignored."""

    id: int
    name: str
    user: str | None
    tags: frozenset[str]
    addresses: tuple[IPAddress, ...]

    @property
    def tagged(self) -> bool:
        return bool(self.tags)

    @property
    def owner(self) -> str | None:
        """The user this node counts as: None for a tagged node (tags replace the user)."""
        return None if self.tags else self.user


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    first: int
    last: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last <= 0xFFFF:
            raise ValueError(f"bad port range {self.first}-{self.last}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        if self == ALL_PORTS:
            return "*"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


ALL_PORTS = PortRange(0, 0xFFFF)


@dataclass(frozen=True, slots=True)
class NetPortRange:
    network: IPNetwork
    ports: PortRange


@dataclass(frozen=True, slots=True)
class FilterRule:
    """Accept a new flow from any of `sources` to any of `destinations` over `protocols`.

    An empty `protocols` means every IP protocol (only the allow-all rule uses it).
    """

    sources: tuple[IPNetwork, ...]
    destinations: tuple[NetPortRange, ...]
    protocols: frozenset[int]


def host_network(address: IPAddress) -> IPNetwork:
    """The single-address network (/32 or /128) of `address`."""
    return ip_network(address)


def rules_to_json(rules: Iterable[FilterRule]) -> list[dict[str, Any]]:
    """Rules in tailcfg's JSON spelling, for the netmap."""
    return [
        {
            "SrcIPs": [str(n) for n in rule.sources],
            "DstPorts": [
                {"IP": str(d.network), "Ports": {"First": d.ports.first, "Last": d.ports.last}}
                for d in rule.destinations
            ],
            "IPProto": sorted(rule.protocols),
        }
        for rule in rules
    ]


def rules_from_json(doc: object) -> tuple[FilterRule, ...]:
    """Decode `rules_to_json` output; raise `PolicyError` naming the bad field."""
    if not isinstance(doc, list):
        raise PolicyError("expected a list of rules", path=("filter",))
    return tuple(_rule_from_json(item, ("filter", i)) for i, item in enumerate(doc))


def _rule_from_json(item: object, path: tuple[str | int, ...]) -> FilterRule:
    if not isinstance(item, dict) or set(item) != {"SrcIPs", "DstPorts", "IPProto"}:
        raise PolicyError("expected an object with SrcIPs, DstPorts and IPProto", path=path)
    sources = tuple(
        _network(s, (*path, "SrcIPs", i)) for i, s in enumerate(_list(item["SrcIPs"], path))
    )
    destinations: list[NetPortRange] = []
    for i, d in enumerate(_list(item["DstPorts"], path)):
        where = (*path, "DstPorts", i)
        if not isinstance(d, dict) or set(d) != {"IP", "Ports"}:
            raise PolicyError("expected an object with IP and Ports", path=where)
        ports = d["Ports"]
        if not isinstance(ports, dict) or set(ports) != {"First", "Last"}:
            raise PolicyError("expected Ports {First, Last}", path=where)
        first, last = ports["First"], ports["Last"]
        if type(first) is not int or type(last) is not int or not 0 <= first <= last <= 0xFFFF:
            raise PolicyError("bad port range", path=where)
        destinations.append(NetPortRange(_network(d["IP"], where), PortRange(first, last)))
    protocols: set[int] = set()
    for p in _list(item["IPProto"], path):
        if type(p) is not int or not 0 <= p <= 255:
            raise PolicyError("IPProto must be numbers 0-255", path=(*path, "IPProto"))
        protocols.add(p)
    return FilterRule(sources, tuple(destinations), frozenset(protocols))


def _list(value: object, path: tuple[str | int, ...]) -> list[object]:
    if not isinstance(value, list):
        raise PolicyError("expected a list", path=path)
    return value


def _network(value: object, path: tuple[str | int, ...]) -> IPNetwork:
    if not isinstance(value, str):
        raise PolicyError("expected a prefix string", path=path)
    try:
        if "/" not in value:
            return host_network(ip_address(value))
        return ip_network(value)
    except ValueError:
        raise PolicyError(f"bad prefix {value!r}", path=path) from None
