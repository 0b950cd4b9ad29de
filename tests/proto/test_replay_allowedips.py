"""ReplayWindow and AllowedIPs against naive reference models (property tests)."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Network, IPv6Network, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proto.wireguard.allowedips import AllowedIPs
from agent.proto.wireguard.constants import REJECT_AFTER_MESSAGES
from agent.proto.wireguard.replay import WINDOW_SIZE, ReplayWindow


def test_replay_basics() -> None:
    w = ReplayWindow()
    assert w.accept(0)
    assert not w.accept(0)
    assert w.accept(2)
    assert w.accept(1)
    assert not w.accept(1)
    assert w.accept(WINDOW_SIZE + 10)
    assert not w.accept(5)  # fell out of the window
    assert not w.accept(REJECT_AFTER_MESSAGES)


@settings(max_examples=300)
@given(st.lists(st.integers(0, 3 * WINDOW_SIZE), max_size=300))
def test_replay_matches_reference(counters: list[int]) -> None:
    w = ReplayWindow()
    seen: set[int] = set()
    highest = -1
    for c in counters:
        # The reference: accept if unseen and not more than WINDOW_SIZE behind the highest.
        # (The ring may also keep slightly older counters; only ever accept each once.)
        got = w.accept(c)
        if c in seen:
            assert not got
        elif highest - c <= WINDOW_SIZE - 64:
            assert got
        elif highest - c > WINDOW_SIZE:
            assert not got
        if got:
            seen.add(c)
            highest = max(highest, c)


@settings(max_examples=300)
@given(st.lists(st.integers(-70, 70), max_size=400), st.integers(0, 1 << 20))
def test_replay_mostly_in_order_matches_reference(steps: list[int], start: int) -> None:
    # Counters walk forward by small steps (the in-order short path) with repeats and a few
    # packets from behind, across many 64-counter blocks.
    w = ReplayWindow()
    seen: set[int] = set()
    highest = -1
    c = start
    for step in steps:
        c = max(0, c + step)
        got = w.accept(c)
        if c in seen or highest - c > WINDOW_SIZE:
            assert not got
        elif highest - c <= WINDOW_SIZE - 64:
            assert got
        if got:
            seen.add(c)
            highest = max(highest, c)


def test_replay_in_order_near_the_counter_limit() -> None:
    w = ReplayWindow()
    top = REJECT_AFTER_MESSAGES - 1
    assert w.accept(top - 1)
    assert w.accept(top)
    assert not w.accept(top)
    assert not w.accept(REJECT_AFTER_MESSAGES)
    assert not w.accept(REJECT_AFTER_MESSAGES + 1)


def _ref_lookup(table: dict[IPv4Network | IPv6Network, int], addr: bytes) -> int | None:
    ip = ipaddress.ip_address(addr)
    best: tuple[int, int] | None = None
    for net, value in table.items():
        if net.version == ip.version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, value)
    return None if best is None else best[1]


nets4 = st.builds(
    lambda a, n: ip_network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
nets6 = st.builds(
    lambda a, n: ip_network((a, n), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.one_of(nets4, nets6), st.integers(0, 5)), max_size=30),
    st.lists(st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16))),
    st.lists(st.integers(0, 5), max_size=3),
)
def test_allowedips_matches_reference(
    inserts: list[tuple[IPv4Network | IPv6Network, int]], probes: list[bytes], removed: list[int]
) -> None:
    t: AllowedIPs[int] = AllowedIPs()
    ref: dict[IPv4Network | IPv6Network, int] = {}
    for net, v in inserts:
        t.insert(net, v)
        ref[net] = v
    for v in removed:
        t.remove_value(v)
        ref = {n: x for n, x in ref.items() if x != v}
    for net in ref:
        probes.append(net.network_address.packed)
    for p in probes:
        assert t.lookup(p) == _ref_lookup(ref, p)
    for v in range(6):
        assert sorted(map(str, t.networks_of(v))) == sorted(
            str(n) for n, x in ref.items() if x == v
        )
