"""The network map: nodes as the netmap shows them, the DERP map's JSON, and `NetMap` itself."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any, Self

from agent.keys import DiscoPublic, NodePublic
from agent.policy.errors import PolicyError
from agent.policy.rules import FilterRule, rules_from_json, rules_to_json
from agent.proto.coordinator_messages.fields import (
    BadMessage,
    Endpoint,
    dump_object,
    load_object,
    read_disco_key,
    read_endpoints,
    read_field,
    read_ip,
    read_node_key,
    read_opt_number,
    read_region,
    read_str,
)
from agent.proto.derpmap import DerpConfig, DerpNode, DerpRegion
from agent.proto.endpoint import format_endpoint

DEFAULT_DNS_DOMAIN = "mesh.internal"  # `.internal` is reserved for private use

__all__ = [
    "DEFAULT_DNS_DOMAIN",
    "derp_to_json",
    "derp_from_json",
    "NodeInfo",
    "interface_addresses",
    "NetMap",
]


def derp_to_json(derp: DerpConfig) -> dict[str, Any]:
    return {
        "regions": [
            {
                "id": r.id,
                "code": r.code,
                "nodes": [
                    {
                        "host": n.host,
                        "port": n.port,
                        "stun_port": n.stun_port,
                        "ca_file": n.ca_file,
                        "insecure_skip_verify": n.insecure_skip_verify,
                    }
                    for n in r.nodes
                ],
            }
            for r in derp.regions
        ]
    }


def derp_from_json(doc: object, path: str = "derp") -> DerpConfig:
    if not isinstance(doc, dict):
        raise BadMessage(f"{path}: expected an object")
    regions: list[DerpRegion] = []
    for i, r in enumerate(read_field(doc, "regions", list, path)):
        rp = f"{path}.regions[{i}]"
        if not isinstance(r, dict):
            raise BadMessage(f"{rp}: expected an object")
        rid = read_region(r, "id", rp)
        if rid is None:
            raise BadMessage(f"{rp}.id: missing")
        nodes: list[DerpNode] = []
        for j, n in enumerate(read_field(r, "nodes", list, rp)):
            np_ = f"{rp}.nodes[{j}]"
            if not isinstance(n, dict):
                raise BadMessage(f"{np_}: expected an object")
            port, stun_port = read_field(n, "port", int, np_), read_field(n, "stun_port", int, np_)
            if not 1 <= port <= 65535 or not 0 <= stun_port <= 65535:
                raise BadMessage(f"{np_}: port out of range")
            ca_file = n.get("ca_file")
            if ca_file is not None and not isinstance(ca_file, str):
                raise BadMessage(f"{np_}.ca_file: expected a string or null")
            nodes.append(
                DerpNode(
                    host=read_str(n, "host", np_),
                    port=port,
                    stun_port=stun_port,
                    ca_file=ca_file,
                    insecure_skip_verify=bool(n.get("insecure_skip_verify", False)),
                )
            )
        regions.append(DerpRegion(id=rid, code=read_str(r, "code", rp), nodes=tuple(nodes)))
    return DerpConfig(regions=tuple(regions))


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node as the netmap shows it (the node itself or a peer)."""

    id: int
    name: str
    node_key: NodePublic
    disco_key: DiscoPublic
    ipv4: IPv4Address
    ipv6: IPv6Address
    endpoints: tuple[Endpoint, ...]
    home_region: int | None
    key_expiry: float | None  # unix seconds; None = never
    user: str | None = None  # the owner; None for a tagged node (tags replace the user)
    tags: tuple[str, ...] = ()

    def allowed_ips(self) -> tuple[IPv4Network, IPv6Network]:
        """What a peer routes to this node: its two addresses as /32 and /128."""
        return IPv4Network(self.ipv4), IPv6Network(self.ipv6)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "node_key": self.node_key.to_b64(),
            "disco_key": self.disco_key.to_b64(),
            "addresses": [str(self.ipv4), str(self.ipv6)],
            "endpoints": [format_endpoint(e) for e in self.endpoints],
            "home_region": self.home_region,
            "key_expiry": self.key_expiry,
            "user": self.user,
            "tags": list(self.tags),
        }

    @classmethod
    def from_json(cls, doc: object, path: str) -> Self:
        if not isinstance(doc, dict):
            raise BadMessage(f"{path}: expected an object")
        addrs = read_field(doc, "addresses", list, path)
        if len(addrs) != 2 or not all(isinstance(a, str) for a in addrs):
            raise BadMessage(f"{path}.addresses: expected [IPV4, IPV6]")
        try:
            ipv4, ipv6 = IPv4Address(addrs[0]), IPv6Address(addrs[1])
        except ValueError:
            raise BadMessage(f"{path}.addresses: {addrs!r} are not [IPV4, IPV6]") from None
        return cls(
            id=read_field(doc, "id", int, path),
            name=read_str(doc, "name", path),
            node_key=read_node_key(doc, "node_key", path),
            disco_key=read_disco_key(doc, "disco_key", path),
            ipv4=ipv4,
            ipv6=ipv6,
            endpoints=read_endpoints(doc, "endpoints", path),
            home_region=read_region(doc, "home_region", path),
            key_expiry=read_opt_number(doc, "key_expiry", path),
            user=_read_opt_str(doc, "user", path),
            tags=_read_strings(doc, "tags", path),
        )


def _read_opt_str(doc: dict[str, Any], key: str, path: str) -> str | None:
    return None if doc.get(key) is None else read_str(doc, key, path)


def _read_strings(doc: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    """An optional list of strings (absent from older coordinators: empty)."""
    if doc.get(key) is None:
        return ()
    items = read_field(doc, key, list, path)
    if not all(isinstance(t, str) for t in items):
        raise BadMessage(f"{path}.{key}: expected a list of strings")
    return tuple(items)


def interface_addresses(
    node: NodeInfo, v4: IPv4Network, v6: IPv6Network
) -> tuple[IPv4Interface, IPv6Interface]:
    """A node's interface addresses: its overlay addresses with the ranges' prefix lengths
    (so the kernel routes the whole overlay to the interface)."""
    return IPv4Interface(f"{node.ipv4}/{v4.prefixlen}"), IPv6Interface(
        f"{node.ipv6}/{v6.prefixlen}"
    )


@dataclass(frozen=True, slots=True)
class NetMap:
    """`GET /api/v1/netmap`: the network as one node sees it at `version`."""

    version: int
    self_node: NodeInfo
    peers: tuple[NodeInfo, ...]
    ipv4_range: IPv4Network
    ipv6_range: IPv6Network
    derp: DerpConfig
    # What this node accepts from its peers: the rules of the policy whose destination is this
    # node. None = the coordinator has no policy (or predates policies): everything passes.
    packet_filter: tuple[FilterRule, ...] | None = None
    dns_domain: str = DEFAULT_DNS_DOMAIN  # names are <name>.<dns_domain>

    def addresses(self) -> tuple[IPv4Interface, IPv6Interface]:
        """This node's interface addresses, with the overlay ranges as prefixes."""
        return interface_addresses(self.self_node, self.ipv4_range, self.ipv6_range)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        doc = load_object(data)
        peers = read_field(doc, "peers", list)
        version = read_field(doc, "version", int)
        return cls(
            version=version,
            self_node=NodeInfo.from_json(doc.get("self"), "self"),
            peers=tuple(NodeInfo.from_json(p, f"peers[{i}]") for i, p in enumerate(peers)),
            ipv4_range=read_ip(doc, "ipv4_range", IPv4Network),
            ipv6_range=read_ip(doc, "ipv6_range", IPv6Network),
            derp=derp_from_json(doc.get("derp")),
            packet_filter=_read_filter(doc),
            dns_domain=read_str(doc, "dns_domain") if "dns_domain" in doc else DEFAULT_DNS_DOMAIN,
        )

    def encode(self) -> bytes:
        return dump_object(
            {
                "version": self.version,
                "self": self.self_node.to_json(),
                "peers": [p.to_json() for p in self.peers],
                "ipv4_range": str(self.ipv4_range),
                "ipv6_range": str(self.ipv6_range),
                "derp": derp_to_json(self.derp),
                "packet_filter": (
                    None if self.packet_filter is None else rules_to_json(self.packet_filter)
                ),
                "dns_domain": self.dns_domain,
            }
        )


def _read_filter(doc: dict[str, Any]) -> tuple[FilterRule, ...] | None:
    if doc.get("packet_filter") is None:
        return None
    try:
        return rules_from_json(doc["packet_filter"])
    except PolicyError as e:
        raise BadMessage(f"packet_filter: {e}") from None
