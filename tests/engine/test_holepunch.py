"""Two PathEngines on the simulated internet (netsim.py): for each NAT pairing the path they end
on, how fast; fallback to DERP when the direct path dies; upgrade when it comes back."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.engine.netsim import Host, Pair, pair

CONE = ["public", "full_cone", "restricted", "port_restricted"]
CONE_PAIRS = [(x, y) for i, x in enumerate(CONE) for y in CONE[i:]]
# Endpoint-dependent mapping on one side is beatable only when the other side filters by
# address at most: the hard side's fresh mapping then gets in.
HARD_DIRECT = [("symmetric", "public"), ("symmetric", "full_cone"), ("symmetric", "restricted")]
HARD_RELAYED = [("symmetric", "port_restricted"), ("symmetric", "symmetric")]


def directed(p: Pair) -> bool:
    return p.both("direct")


def max_gap(rx_times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(rx_times)), default=0.0)


@pytest.mark.parametrize(("nat_a", "nat_b"), CONE_PAIRS)
def test_cone_pairs_go_direct_within_a_second(nat_a: str, nat_b: str) -> None:
    p = pair(nat_a, nat_b)
    t0 = p.sim.now
    p.start()
    t = p.sim.run_for(1.0, until=lambda: directed(p))
    assert t is not None, f"{nat_a}<->{nat_b} still {p.path(p.a, p.b)}/{p.path(p.b, p.a)}"
    assert t - t0 < 1.0
    p.sim.run_for(60)  # and it stays direct on heartbeats
    assert directed(p)
    assert p.a.rx[p.b.key][-1].path == "udp"


@pytest.mark.parametrize(("nat_a", "nat_b"), HARD_DIRECT)
@pytest.mark.parametrize("swap", [False, True])
def test_symmetric_against_open_filtering_goes_direct(nat_a: str, nat_b: str, swap: bool) -> None:
    p = pair(nat_b, nat_a) if swap else pair(nat_a, nat_b)
    p.start()
    assert p.sim.run_for(10.0, until=lambda: directed(p)) is not None
    p.sim.run_for(30)
    assert directed(p)


@pytest.mark.parametrize(("nat_a", "nat_b"), HARD_RELAYED)
def test_symmetric_against_port_filtering_stays_on_derp(nat_a: str, nat_b: str) -> None:
    p = pair(nat_a, nat_b)
    p.start()
    assert p.sim.run_for(60.0, until=lambda: p.path(p.a, p.b) == "direct") is None
    assert p.both("derp")
    rx = [r.at for r in p.b.rx[p.a.key]]
    assert {r.path for r in p.b.rx[p.a.key]} == {"derp"}
    assert max_gap(rx) <= 0.15  # relayed traffic flowed all along
    # it kept trying in the background: at least one probe round per 10 s
    assert p.a.engine.stats.sent["call_me_maybe"] >= 6


@pytest.mark.parametrize("other", ["public", "full_cone", "port_restricted"])
def test_blocked_udp_stays_on_derp(other: str) -> None:
    p = pair("full_cone", other)
    p.a.udp_blocked = True
    p.start()
    assert p.sim.run_for(60.0, until=lambda: p.path(p.b, p.a) == "direct") is None
    assert p.both("derp")
    assert max_gap([r.at for r in p.a.rx[p.b.key]]) <= 0.15


def test_traffic_before_stun_still_punches_once_endpoints_are_known() -> None:
    p = pair("port_restricted", "port_restricted")
    p.flow.start()  # talking before either side knows its public endpoint
    p.sim.run_for(0.5)
    assert p.both("derp")
    t0 = p.sim.now
    p.a.stun()
    p.b.stun()
    t = p.sim.run_for(1.0, until=lambda: directed(p))
    assert t is not None
    assert t - t0 < 1.0


def _block(hosts: list[Host], blocked: bool) -> None:
    for h in hosts:
        h.udp_blocked = blocked


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("side", ["a", "both"])
def test_direct_path_loss_falls_back_within_5s_and_recovers_within_30s(
    seed: int, side: str
) -> None:
    p = pair("port_restricted", "full_cone", seed=seed)
    p.start()
    p.sim.run_for(10.0 + 0.71 * seed)  # break it at a different heartbeat phase per seed
    assert directed(p)
    hosts = [p.a] if side == "a" else [p.a, p.b]
    broken = p.sim.now
    _block(hosts, True)
    t_a = p.sim.run_for(5.0, until=lambda: p.path(p.a, p.b) == "derp")
    assert t_a is not None
    t_both = p.sim.run_until(broken + 5.0, until=lambda: p.both("derp"))
    assert t_both is not None, "both sides on DERP within 5 s"
    assert p.a.engine.targets(p.b.key, p.sim.now).derp is not None
    p.sim.run_until(broken + 20.0)
    assert p.both("derp")
    # the flow survived: no gap over 5 s at either end
    for rx_host, tx_host in ((p.a, p.b), (p.b, p.a)):
        times = [r.at for r in rx_host.rx[tx_host.key] if r.at >= broken - 1]
        assert max_gap(times) <= 5.0
    healed = p.sim.now
    _block(hosts, False)
    t = p.sim.run_for(30.0, until=lambda: directed(p))
    assert t is not None, "back to direct within 30 s"
    assert t - healed < 30.0
    p.sim.run_for(5)
    assert p.a.rx[p.b.key][-1].path == "udp"


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("side", ["a", "both"])
def test_a_path_that_dies_under_traffic_falls_back_in_about_a_second(seed: int, side: str) -> None:
    """Traffic both ways: the side that stops hearing back probes at once (the silence probe)
    instead of waiting for its next heartbeat, so both are on DERP about 1 s later."""
    p = pair("port_restricted", "full_cone", seed=seed)
    p.start()
    p.sim.run_for(10.0 + 0.71 * seed)
    assert directed(p)
    broken = p.sim.now
    _block([p.a] if side == "a" else [p.a, p.b], True)
    t = p.sim.run_for(5.0, until=lambda: p.both("derp"))
    assert t is not None
    assert t - broken <= 1.5, f"fell back after {t - broken:.2f} s"
    assert p.a.engine.stats.silence_probes >= 1
    p.sim.run_for(5.0)
    for rx_host, tx_host in ((p.a, p.b), (p.b, p.a)):
        times = [r.at for r in rx_host.rx[tx_host.key] if r.at >= broken - 1]
        assert max_gap(times) <= 2.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_flapping_costs_at_most_a_second_and_a_half_per_block(seed: int) -> None:
    """UDP between the two hosts is cut and restored every 3-5 s for a minute while traffic
    flows both ways: each cut is bridged through DERP quickly, each restore moves back to
    direct, and no gap in what arrives is longer than the fallback time."""
    p = pair("port_restricted", "full_cone", seed=seed)
    p.start()
    p.sim.run_for(5.0)
    assert directed(p)
    rng = random.Random(seed)
    start = p.sim.now
    seen: set[str] = set()
    blocked = False
    while p.sim.now - start < 60.0:
        blocked = not blocked
        _block([p.a, p.b], blocked)
        until = p.sim.now + rng.uniform(3.0, 5.0)
        while p.sim.now < until:
            p.sim.run_for(0.25)
            seen.add(p.path(p.a, p.b))
    _block([p.a, p.b], False)
    p.sim.run_for(10.0)
    assert seen == {"direct", "derp"}
    assert directed(p)
    for rx_host, tx_host in ((p.a, p.b), (p.b, p.a)):
        times = [r.at for r in rx_host.rx[tx_host.key] if r.at >= start]
        assert max_gap(times) <= 1.5, f"gap of {max_gap(times):.2f} s"
