"""The simulated network itself: NAT mapping and filtering behave as RFC 4787 describes."""

from __future__ import annotations

import functools
import random

import pytest

from tests.engine.netsim import Nat, Sim

INSIDE = ("10.1.0.2", 41641)
X = ("198.51.100.9", 1000)
X2 = ("198.51.100.9", 2000)
Y = ("203.0.113.5", 1000)


def nat(mapping: str, filtering: str) -> Nat:
    return Nat("192.0.2.1", mapping, filtering, random.Random(1))  # type: ignore[arg-type]


def test_eim_keeps_one_mapping_edm_makes_one_per_destination() -> None:
    eim = nat("eim", "eif")
    assert eim.outbound(INSIDE, X) == eim.outbound(INSIDE, Y)
    edm = nat("edm", "apdf")
    assert edm.outbound(INSIDE, X) != edm.outbound(INSIDE, X2)
    assert edm.outbound(INSIDE, X) == edm.outbound(INSIDE, X)


@pytest.mark.parametrize(
    ("filtering", "from_x2", "from_y"),
    [("eif", True, True), ("adf", True, False), ("apdf", False, False)],
)
def test_filtering(filtering: str, from_x2: bool, from_y: bool) -> None:
    n = nat("eim", filtering)
    _, port = n.outbound(INSIDE, X)
    assert n.inbound(port, X) == INSIDE
    assert (n.inbound(port, X2) == INSIDE) is from_x2
    assert (n.inbound(port, Y) == INSIDE) is from_y
    assert n.inbound(port + 1 if port < 65535 else port - 1, X) is None


def test_sim_runs_in_time_order_and_stops_on_condition() -> None:
    sim = Sim(0.0)
    seen: list[float] = []
    for t in (3.0, 1.0, 2.0):
        sim.at(t, functools.partial(seen.append, t))
    assert sim.run_until(10.0, until=lambda: len(seen) == 2) == 2.0
    assert seen == [1.0, 2.0]
    assert sim.run_until(10.0) is None
    assert seen == [1.0, 2.0, 3.0]
    assert sim.now == 10.0
