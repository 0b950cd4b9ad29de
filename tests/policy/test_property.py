# ruff: noqa: E501  (strategies and tables read better unwrapped)
"""Random small policies and flows: compiled filter + packet filter vs a brute-force evaluator.

The reference below is written from the policy's meaning, on the raw JSON-like rules, with no
code shared with agent/policy beyond the Node type: for each rule, is the source node named by
a source entry, the destination node by a destination entry, the port in its list and the
protocol in the rule's (or the default) set?
"""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.compile import CompiledPolicy
from agent.policy.filter import PacketFilter, PeerSources
from agent.policy.model import parse_policy
from agent.policy.rules import Node
from tests.policy import packets as pk

USERS = ["alice", "bob", "carol"]
TAGS = ["tag:a", "tag:b"]
GROUPS = {"group:x": ["alice@", "bob@"], "group:y": ["carol@"]}
PORTS = ["*", "22", "80,443", "1000-2000", "22,80-90"]
PROTOS = [None, "tcp", "udp", "6", "17"]
HOSTS = {"h1": "100.64.0.1", "net": "100.64.0.0/30"}

nodes_strategy = st.lists(
    st.tuples(st.sampled_from([*USERS, None]), st.sets(st.sampled_from(TAGS), max_size=2)),
    min_size=1,
    max_size=5,
).map(
    lambda specs: [
        Node(i, f"n{i}", user, frozenset(tags),
             (ip_address(f"100.64.0.{i + 1}"), ip_address(f"fd7a::{i + 1}")))
        for i, (user, tags) in enumerate(specs)
    ]
)  # fmt: skip

src_alias = st.sampled_from(
    ["*", "alice@", "bob@", "carol", "group:x", "group:y", "tag:a", "tag:b", "autogroup:member",
     "autogroup:tagged", "h1", "net", "100.64.0.2", "100.64.0.0/31", "fd7a::3"]
)  # fmt: skip
dst_target = st.sampled_from(
    ["*", "alice@", "bob@", "group:x", "tag:a", "tag:b", "autogroup:member", "autogroup:tagged",
     "autogroup:self", "h1", "net", "100.64.0.2", "[fd7a::3]"]
)  # fmt: skip


@st.composite
def rules(draw: st.DrawFn) -> dict[str, object]:
    dsts = draw(st.lists(st.tuples(dst_target, st.sampled_from(PORTS)), min_size=1, max_size=3))
    rule: dict[str, object] = {
        "action": "accept",
        "src": draw(st.lists(src_alias, min_size=1, max_size=3)),
        "dst": [f"{t}:{p}" for t, p in dsts],
    }
    proto = draw(st.sampled_from(PROTOS))
    if proto is not None:
        rule["proto"] = proto
    if any(t == "autogroup:self" for t, _ in dsts):  # self needs user-like sources
        rule["src"] = [s for s in rule["src"] if s in ("*", "alice@", "bob@", "carol",  # type: ignore[attr-defined]
                       "group:x", "group:y", "autogroup:member", "autogroup:tagged")] or ["*"]  # fmt: skip
    return rule


# -- the reference ------------------------------------------------------------------------


def _owner(n: Node) -> str | None:
    return None if n.tags else n.user


def _in(network: str, n: Node, family: int | None) -> bool:
    net = ip_network(network if "/" in network else HOSTS.get(network, network))
    used = n.addresses if family is None else (n.addresses[family],)
    return any(a in net for a in used)


def _names(alias: str, n: Node, family: int | None) -> bool:
    if alias == "*":
        return True
    if alias.startswith("group:"):
        return _owner(n) is not None and f"{_owner(n)}@" in GROUPS[alias]
    if alias.startswith("tag:"):
        return alias in n.tags
    if alias == "autogroup:member":
        return _owner(n) is not None
    if alias == "autogroup:tagged":
        return bool(n.tags)
    if alias.endswith("@") or alias in USERS:
        return _owner(n) == alias.rstrip("@")
    return _in(alias.strip("[]"), n, family)


def _port_ok(spec: str, port: int) -> bool:
    if spec == "*":
        return True
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def reference(
    acls: list[dict[str, object]], src: Node, dst: Node, proto: int, port: int, family: int | None
) -> bool:
    """Whether a flow is accepted. With `family` (0: IPv4, 1: IPv6) it is a packet between the
    nodes' addresses of that family, which IP sources and destinations must contain; without,
    a node matches an IP entry when any of its addresses is inside."""
    for rule in acls:
        name = rule.get("proto")
        if name is None:
            protos = {6, 17, 1, 58}
        else:
            protos = {"tcp": {6}, "udp": {17}}.get(str(name)) or {int(str(name))}
        if proto not in protos:
            continue
        if not any(_names(s, src, family) for s in rule["src"]):  # type: ignore[attr-defined]
            continue
        for d in rule["dst"]:  # type: ignore[attr-defined]
            target, _, ports = str(d).rpartition(":")
            if not _port_ok(ports, port):
                continue
            if target == "autogroup:self":
                if _owner(src) is not None and _owner(src) == _owner(dst):
                    return True
            elif _names(target, dst, family):
                return True
    return False


@settings(max_examples=100, deadline=None)
@given(
    nodes_strategy,
    st.lists(rules(), max_size=4),
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.sampled_from([6, 17]),
                       st.sampled_from([22, 80, 85, 443, 1500, 3000]), st.booleans()),
             min_size=1, max_size=12),
)  # fmt: skip
def test_compiled_filter_matches_the_reference(
    nodes: list[Node], acls: list[dict[str, object]], flows: list[tuple[int, int, int, int, bool]]
) -> None:
    text = json.dumps(
        {"groups": GROUPS, "tagOwners": {t: [] for t in TAGS}, "hosts": HOSTS, "acls": acls}
    )
    compiled = CompiledPolicy(parse_policy(text), nodes)
    peers = compiled.peer_map()
    for s_index, d_index, proto, port, v6 in flows:
        src, dst = nodes[s_index % len(nodes)], nodes[d_index % len(nodes)]
        family = 1 if v6 else 0
        assert compiled.allows(src, dst, proto, port) is reference(
            acls, src, dst, proto, port, None
        )
        expected = reference(acls, src, dst, proto, port, family)
        s, d = str(src.addresses[family]), str(dst.addresses[family])
        flt = PacketFilter(compiled.filter_for(dst.id), dst.addresses)
        peer = PeerSources(ip_network(a) for a in src.addresses)
        packet = pk.tcp(s, 40000, d, port) if proto == 6 else pk.udp(s, 40000, d, port)
        assert (flt.check_inbound(packet, peer) is None) is expected, (src, dst, proto, port, v6)
        if expected and src is not dst:
            assert src.id in peers[dst.id]
            assert dst.id in peers[src.id]


@settings(max_examples=60, deadline=None)
@given(nodes_strategy, st.lists(rules(), max_size=4))
def test_peers_are_exactly_the_pairs_some_flow_connects(
    nodes: list[Node], acls: list[dict[str, object]]
) -> None:
    text = json.dumps(
        {"groups": GROUPS, "tagOwners": {t: [] for t in TAGS}, "hosts": HOSTS, "acls": acls}
    )
    peers = CompiledPolicy(parse_policy(text), nodes).peer_map()
    ports = [0, 22, 80, 85, 443, 1500, 3000, 65535]
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            connected = any(
                reference(acls, x, y, proto, port, None)
                for x, y in ((a, b), (b, a))
                for proto in (6, 17, 1)
                for port in ports
            )
            assert (b.id in peers[a.id]) is connected, (a, b)
