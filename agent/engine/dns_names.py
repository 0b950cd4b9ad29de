"""Who the DNS service answers for: this node and its peers, from the netmap and the config.

    netmap (self + peers, in its order) ─┐
    static peers (config name, host      ├─► hosts ─► labels (valid ones kept, others sanitised,
      addresses of their allowed IPs) ───┘             clashes suffixed, stable across updates)
                                                         └─► NameTable(<label>.<domain> -> addrs)

A coordinated node's name is the coordinator's (already one unique label there); a name that
is not a valid DNS label (an older coordinator, a static peer called "Bob's laptop") is
sanitised, and a clash gets `-1`, `-2`, … with the first holder keeping the bare name. Names
stay stable: a host keeps the label it had while its name still maps to it. Pure: the node
shell (node/dns_service.py) calls `build` after every netmap and swaps the responder's table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from agent.keys import NodePublic
from agent.proto.coordinator_messages import NetMap
from agent.proto.dns.names import (
    DEFAULT_DOMAIN,
    MAX_LABEL,
    IPAddress,
    assign_name,
    is_valid_label,
    sanitize_label,
)
from agent.proto.dns.responder import NameTable

__all__ = ["Host", "netmap_hosts", "static_hosts", "assign_labels", "NameBook"]


@dataclass(frozen=True, slots=True)
class Host:
    """One node the service names: its key, its name as given, its overlay addresses."""

    key: NodePublic
    name: str
    addresses: tuple[IPAddress, ...]


def netmap_hosts(netmap: NetMap, skip: Iterable[NodePublic] = ()) -> list[Host]:
    """This node, then its peers, in the netmap's order (`skip`: keys named elsewhere)."""
    skipped = set(skip)
    return [
        Host(n.node_key, n.name, (n.ipv4, n.ipv6))
        for n in (netmap.self_node, *netmap.peers)
        if n.node_key not in skipped
    ]


def static_hosts(
    peers: Iterable[tuple[NodePublic, str, Sequence[IPv4Network | IPv6Network]]],
) -> list[Host]:
    """Static peers (key, config name, allowed IPs): named for their single-address prefixes
    (/32, /128); a peer that routes only subnets gets a name without addresses."""
    return [
        Host(key, name, tuple(n.network_address for n in nets if n.num_addresses == 1))
        for key, name, nets in peers
    ]


def assign_labels(
    hosts: Sequence[Host], previous: Mapping[NodePublic, str]
) -> dict[NodePublic, str]:
    """A unique DNS label per host: valid names kept, others sanitised; a host keeps its
    previous label while its name still gives it; clashes get the first free `-N`."""
    wanted = {h.key: (h.name if is_valid_label(h.name) else sanitize_label(h.name)) for h in hosts}
    labels: dict[NodePublic, str] = {}
    taken: set[str] = set()
    for key, base in wanted.items():  # first pass: keep what is still right
        old = previous.get(key)
        if old is not None and old not in taken and _label_of_base(old, base):
            labels[key] = old
            taken.add(old)
    for key, base in wanted.items():
        if key not in labels:
            labels[key] = assign_name(base, taken)
            taken.add(labels[key])
    return {h.key: labels[h.key] for h in hosts}


def _label_of_base(label: str, base: str) -> bool:
    """`label` is `base` or `base-N` (what `assign_name` makes of it)."""
    stem, dash, num = label.rpartition("-")
    if label == base:
        return True
    if dash != "-" or not num.isdigit() or num.startswith("0"):
        return False
    return stem == base or (len(label) == MAX_LABEL and base.startswith(stem))  # base trimmed


class NameBook:
    """The labels handed out so far and the table built from them. Owned by its one caller."""

    def __init__(self) -> None:
        self.labels: dict[NodePublic, str] = {}
        self.table = NameTable({}, DEFAULT_DOMAIN)

    def build(self, hosts: Sequence[Host], domain: str = DEFAULT_DOMAIN) -> NameTable:
        """The table for `hosts` under `domain` (labels stable across calls); kept as `table`."""
        self.labels = assign_labels(hosts, self.labels)
        records = {self.labels[h.key]: h.addresses for h in hosts if h.addresses}
        self.table = NameTable(records, domain)
        return self.table
