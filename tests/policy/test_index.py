"""The rule index: the same answer as a scan of every rule, for hand-picked and random rules."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.index import Mode, RuleIndex
from agent.policy.rules import ALL_PORTS, FilterRule, IPAddress, NetPortRange, PortRange

ME4, ME6 = ip_address("100.64.0.1"), ip_address("fd7a:115c:a1e0::1")


def linear(
    rules: list[FilterRule], src: IPAddress, dst: IPAddress, protocol: int, port: int, mode: Mode
) -> bool:
    """The reference: every rule in turn, as the filter scanned them before it had an index."""
    for rule in rules:
        if rule.protocols and protocol not in rule.protocols:
            continue
        if not any(n.version == src.version and src in n for n in rule.sources):
            continue
        for d in rule.destinations:
            if d.network.version != dst.version or dst not in d.network:
                continue
            if mode is Mode.ADDRESSES:
                return True
            if mode is Mode.PORTS and port in d.ports:
                return True
            if mode is Mode.ALL_PORTS and d.ports == ALL_PORTS:
                return True
    return False


def rule(sources: list[str], dst: list[tuple[str, int, int]], protocols: set[int]) -> FilterRule:
    return FilterRule(
        tuple(ip_network(s) for s in sources),
        tuple(NetPortRange(ip_network(n), PortRange(a, b)) for n, a, b in dst),
        frozenset(protocols),
    )


def test_ports_sources_and_protocols() -> None:
    rules = [
        rule(["100.64.0.2/32"], [("100.64.0.1/32", 22, 22)], {6}),
        rule(["10.0.0.0/8", "fd00::/8"], [("100.64.0.1/32", 8000, 8999), ("fd7a:115c:a1e0::1/128",
             8000, 8999)], {6, 17}),
        rule(["0.0.0.0/0"], [("100.64.0.0/10", 0, 65535)], {47}),
        rule(["100.64.0.3/32"], [("100.64.0.1/32", 0, 65535)], set()),
    ]  # fmt: skip
    index = RuleIndex(rules, [ME4, ME6])
    a, b, c = (ip_address(f"100.64.0.{i}").packed for i in (2, 3, 4))
    me = ME4.packed
    assert index.accepts(a, me, 6, 22, Mode.PORTS)
    assert not index.accepts(a, me, 17, 22, Mode.PORTS)
    assert not index.accepts(a, me, 6, 23, Mode.PORTS)
    assert not index.accepts(c, me, 6, 22, Mode.PORTS)
    ten = ip_address("10.9.8.7").packed
    assert index.accepts(ten, me, 17, 8500, Mode.PORTS)
    assert not index.accepts(ten, me, 17, 9000, Mode.PORTS)
    assert index.accepts(ip_address("fd00::5").packed, ME6.packed, 6, 8000, Mode.PORTS)
    assert not index.accepts(ip_address("fe00::5").packed, ME6.packed, 6, 8000, Mode.PORTS)
    assert index.accepts(c, me, 47, 0, Mode.ALL_PORTS)  # GRE from anywhere
    assert index.accepts(b, me, 132, 1, Mode.PORTS)  # every protocol from .3
    assert index.accepts(b, me, 1, 0, Mode.ADDRESSES)
    assert index.accepts(a, me, 6, 0, Mode.ADDRESSES)  # a port is open: addresses match
    assert not index.accepts(a, me, 1, 0, Mode.ADDRESSES)  # but not for ICMP's protocol
    assert not index.accepts(a, ip_address("100.64.0.9").packed, 6, 22, Mode.PORTS)  # not local


def test_no_rules() -> None:
    index = RuleIndex([], [ME4])
    assert not index.accepts(ip_address("100.64.0.2").packed, ME4.packed, 6, 22, Mode.PORTS)


# -- random rule sets against the scan ----------------------------------------------------

V4_NETS = ["100.64.0.2/32", "100.64.0.3/32", "100.64.0.0/30", "100.64.0.0/10", "0.0.0.0/0",
           "100.64.0.1/32", "10.0.0.0/8", "100.64.0.2/31"]  # fmt: skip
V6_NETS = ["fd7a:115c:a1e0::2/128", "fd7a:115c:a1e0::/48", "::/0", "fd7a:115c:a1e0::1/128",
           "fd7a:115c:a1e0::/126"]  # fmt: skip
PORT_RANGES = [(22, 22), (80, 80), (443, 443), (0, 65535), (1000, 2000), (80, 90), (0, 0)]
PROTOCOLS = [6, 17, 1, 58, 132, 47]
LOCALS = [ME4, ME6, ip_address("100.64.0.5")]
SOURCES = [ip_address(a) for a in ("100.64.0.2", "100.64.0.3", "100.64.0.9", "10.1.2.3",
           "192.0.2.1", "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::3", "2001:db8::1")]  # fmt: skip

networks = st.sampled_from([*V4_NETS, *V6_NETS]).map(ip_network)
destinations = st.builds(
    NetPortRange,
    networks,
    st.sampled_from(PORT_RANGES).map(lambda r: PortRange(*r)),
)
rules_strategy = st.lists(
    st.builds(
        FilterRule,
        st.lists(networks, min_size=1, max_size=3).map(tuple),
        st.lists(destinations, min_size=1, max_size=3).map(tuple),
        st.frozensets(st.sampled_from(PROTOCOLS), max_size=3),
    ),
    max_size=12,
)
flows = st.lists(
    st.tuples(
        st.sampled_from(SOURCES),
        st.sampled_from(LOCALS),
        st.sampled_from(PROTOCOLS),
        st.sampled_from([0, 22, 80, 85, 443, 1500, 65535]),
        st.sampled_from(list(Mode)),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=150, deadline=None)
@given(rules_strategy, flows)
def test_index_answers_as_the_scan(
    rules: list[FilterRule], queries: list[tuple[IPAddress, IPAddress, int, int, Mode]]
) -> None:
    index = RuleIndex(rules, LOCALS)
    for src, dst, protocol, port, mode in queries:
        if type(src) is not type(dst):
            continue  # a packet has one address family
        expected = linear(rules, src, dst, protocol, port, mode)
        got = index.accepts(src.packed, dst.packed, protocol, port, mode)
        assert got is expected, (src, dst, protocol, port, mode)


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 250), st.randoms(use_true_random=False))
def test_large_random_rule_sets(count: int, rng: random.Random) -> None:
    rules = []
    for _ in range(count):
        a = rng.randrange(256)
        sources = tuple(
            ip_network(f"100.{64 + rng.randrange(2)}.{a}.{rng.randrange(256)}/{length}",
                       strict=False)
            for length in rng.sample([32, 24, 16, 10, 30], rng.randrange(1, 3))
        )  # fmt: skip
        first = rng.randrange(0, 3000)
        ports = PortRange(first, first + rng.choice([0, 0, 5, 100]))
        dests = (NetPortRange(ip_network(f"{ME4}/32"), ports if rng.random() > 0.1 else ALL_PORTS),)
        rules.append(
            FilterRule(sources, dests, frozenset(rng.sample([6, 17, 1], rng.randrange(3))))
        )
    index = RuleIndex(rules, [ME4])
    for _ in range(20):
        src = IPv4Address(f"100.{64 + rng.randrange(2)}.{rng.randrange(256)}.{rng.randrange(256)}")
        protocol, port = rng.choice([6, 17, 1, 47]), rng.randrange(0, 3200)
        for mode in Mode:
            expected = linear(rules, src, ME4, protocol, port, mode)
            assert index.accepts(src.packed, ME4.packed, protocol, port, mode) is expected


def test_families_do_not_mix() -> None:
    rules = [rule(["0.0.0.0/0"], [("100.64.0.1/32", 0, 65535)], set())]
    index = RuleIndex(rules, [ME4, ME6])
    v6 = IPv6Address("fd7a:115c:a1e0::2").packed
    assert not index.accepts(v6, ME6.packed, 6, 22, Mode.PORTS)
