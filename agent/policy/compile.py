"""Compile a checked policy against the current nodes: per-node filters and who sees whom.

    policy (model.Policy) + nodes ──► CompiledPolicy
                                        ├── filter_for(node_id)  the FilterRules whose destination
                                        │                        is that node (its packet filter)
                                        ├── peers_of(node_id)    nodes it may exchange traffic
                                        │                        with, in either direction
                                        └── allows(src, dst, proto, port)

Aliases resolve as in Tailscale's policy (and Headscale's policy/v2):
- users, groups and `autogroup:member` match untagged nodes by owner; a tagged node has no user
  (tags replace the user), so it matches only `tag:` aliases, `autogroup:tagged`, IPs and `*`;
- `autogroup:self` as a destination means "the source user's own untagged nodes": for node D
  owned by u, the sources are those of the rule's source nodes that are untagged and owned by u;
- IPs, CIDRs and host aliases match the node addresses inside them; as sources they stay
  prefixes, so traffic from addresses outside the tailnet can be allowed too.
`None` as the policy means no policy: every node reaches every other on every protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, collapse_addresses, ip_network

from agent.policy.aliases import (
    Alias,
    AutoGroup,
    AutoGroupKind,
    Group,
    Host,
    Prefix,
    Tag,
    User,
    Wildcard,
)
from agent.policy.model import AclRule, Policy
from agent.policy.rules import (
    ALL_PORTS,
    DEFAULT_PROTOCOLS,
    FilterRule,
    IPNetwork,
    NetPortRange,
    Node,
    host_network,
)

__all__ = ["CompiledPolicy", "compile_filter", "peer_map"]

_ANY = (ip_network("0.0.0.0/0"), ip_network("::/0"))
_SELF = AutoGroup(AutoGroupKind.SELF)


class CompiledPolicy:
    """A policy resolved against one set of nodes. Rebuild it when either changes."""

    def __init__(self, policy: Policy | None, nodes: Iterable[Node]) -> None:
        self.policy = policy
        self.nodes: dict[int, Node] = {n.id: n for n in nodes}
        self._alias_nodes: dict[Alias, frozenset[int]] = {}
        self._peers: dict[int, frozenset[int]] | None = None

    # -- alias resolution -----------------------------------------------------------------

    def matches(self, alias: Alias, node: Node) -> bool:
        """Whether `node` is one of the nodes `alias` names (never true for autogroup:self)."""
        match alias:
            case Wildcard():
                return True
            case User(name):
                return node.owner == name
            case Group(name):
                groups = self.policy.groups if self.policy else {}
                return node.owner is not None and node.owner in groups.get(name, ())
            case Tag(name):
                return name in node.tags
            case AutoGroup(kind):
                if kind is AutoGroupKind.MEMBER:
                    return node.owner is not None
                return kind is AutoGroupKind.TAGGED and node.tagged
            case Prefix(network) | Host(_, network):
                return any(a in network for a in node.addresses)
        return False  # a bare Name never survives model.parse_policy

    def nodes_of(self, alias: Alias) -> frozenset[int]:
        found = self._alias_nodes.get(alias)
        if found is None:
            found = frozenset(i for i, n in self.nodes.items() if self.matches(alias, n))
            self._alias_nodes[alias] = found
        return found

    def _source_nodes(self, rule: AclRule) -> frozenset[int]:
        return frozenset().union(*(self.nodes_of(a) for a in rule.sources))

    def _source_prefixes(self, rule: AclRule, only: Iterable[int] | None = None) -> list[IPNetwork]:
        if only is not None:
            return _collapse(host_network(a) for i in only for a in self.nodes[i].addresses)
        out: list[IPNetwork] = []
        for alias in rule.sources:
            match alias:
                case Wildcard():
                    return list(_ANY)
                case Prefix(network) | Host(_, network):
                    out.append(network)
                case _:
                    out += (
                        host_network(a)
                        for i in self.nodes_of(alias)
                        for a in self.nodes[i].addresses
                    )
        return _collapse(out)

    # -- outputs --------------------------------------------------------------------------

    def filter_for(self, node_id: int) -> tuple[FilterRule, ...]:
        """The rules whose destination is node `node_id`, for its packet filter."""
        node = self.nodes[node_id]
        own = [host_network(a) for a in node.addresses]
        if self.policy is None:
            return (FilterRule(_ANY, tuple(NetPortRange(n, ALL_PORTS) for n in own), frozenset()),)
        rules: list[FilterRule] = []
        for rule in self.policy.acls:
            protocols = rule.protocols or DEFAULT_PROTOCOLS
            targets: list[NetPortRange] = []
            selves: list[NetPortRange] = []
            for dst in rule.destinations:
                if dst.target == _SELF:
                    if node.owner is not None:
                        selves += (NetPortRange(n, p) for n in own for p in dst.ports)
                    continue
                hit = self._destination_networks(dst.target, node, own)
                targets += (NetPortRange(n, p) for n in hit for p in dst.ports)
            if targets:
                sources = self._source_prefixes(rule)
                if sources:
                    rules.append(FilterRule(tuple(sources), _dedupe(targets), protocols))
            if selves:
                same_user = [
                    i for i in self._source_nodes(rule) if self.nodes[i].owner == node.owner
                ]
                if same_user:
                    sources = self._source_prefixes(rule, same_user)
                    rules.append(FilterRule(tuple(sources), _dedupe(selves), protocols))
        return tuple(rules)

    def _destination_networks(
        self, target: Alias, node: Node, own: list[IPNetwork]
    ) -> list[IPNetwork]:
        match target:
            case Prefix(network) | Host(_, network):
                return [host_network(a) for a in node.addresses if a in network]
            case _:
                return own if self.matches(target, node) else []

    def peers_of(self, node_id: int) -> frozenset[int]:
        """Nodes that may send to `node_id` or receive from it under some rule."""
        return self.peer_map().get(node_id, frozenset())

    def peer_map(self) -> dict[int, frozenset[int]]:
        """Every node's peers: the nodes it may exchange traffic with, in either direction."""
        if self._peers is None:
            self._peers = self._build_peer_map()
        return self._peers

    def _build_peer_map(self) -> dict[int, frozenset[int]]:
        everyone = frozenset(self.nodes)
        if self.policy is None:
            return {i: everyone - {i} for i in self.nodes}
        edges: dict[int, set[int]] = {i: set() for i in self.nodes}
        for rule in self.policy.acls:
            sources = self._source_nodes(rule)
            if not sources:
                continue
            targets: set[int] = set()
            for dst in rule.destinations:
                if dst.target == _SELF:
                    for s in sources:
                        owner = self.nodes[s].owner
                        if owner is not None:
                            same = self.nodes_of(User(owner))
                            edges[s].update(same)
                            for d in same:
                                edges[d].add(s)
                else:
                    targets |= self.nodes_of(dst.target)
            for s in sources:
                edges[s] |= targets
            for d in targets:
                edges[d] |= sources
        return {i: frozenset(peers - {i}) for i, peers in edges.items()}

    def allows(self, src: Node, dst: Node, protocol: int, port: int) -> bool:
        """Whether a new flow from `src` to `dst` (by identity and address) is accepted.

        Evaluated on the policy directly, not through compiled prefixes: `src` and `dst` need
        not be among `nodes` (the policy `tests` evaluate hypothetical users and tags).
        """
        if self.policy is None:
            return True
        for rule in self.policy.acls:
            if protocol not in (rule.protocols or DEFAULT_PROTOCOLS):
                continue
            if not any(self.matches(a, src) for a in rule.sources):
                continue
            for d in rule.destinations:
                if not any(port in r for r in d.ports):
                    continue
                if d.target == _SELF:
                    if dst.owner is not None and dst.owner == src.owner:
                        return True
                elif self.matches(d.target, dst):
                    return True
        return False


def compile_filter(
    policy: Policy | None, node: Node, nodes: Iterable[Node]
) -> tuple[FilterRule, ...]:
    """The packet-filter rules for `node` (which must be among `nodes`)."""
    return CompiledPolicy(policy, nodes).filter_for(node.id)


def peer_map(policy: Policy | None, nodes: Iterable[Node]) -> dict[int, frozenset[int]]:
    """Each node's id -> the ids of the nodes it may exchange traffic with."""
    return CompiledPolicy(policy, nodes).peer_map()


def _collapse(networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    nets = list(networks)
    v4 = [n for n in nets if isinstance(n, IPv4Network)]
    v6 = [n for n in nets if isinstance(n, IPv6Network)]
    return [*collapse_addresses(v4), *collapse_addresses(v6)]


def _dedupe(items: list[NetPortRange]) -> tuple[NetPortRange, ...]:
    return tuple(dict.fromkeys(items))
