"""Cone NAT against symmetric NAT, no port mapping: the birthday technique (engine/birthday.py)
finds a direct path (root only).

Topology: natlab.py with a behind the cone NAT (nftables masquerade: endpoint-independent
mapping, address-and-port filtering) and b behind the symmetric one (masquerade fully-random).
Its two STUN servers tell each agent what its NAT is (netcheck MappingVariesByDestIP: a easy,
b hard); they tell each other in NatInfo. b opens 256 extra sockets and pings a's endpoint from
each; a pings random ports of b's NAT; a hit lands on one of b's extra sockets, which then
carries the path. Ordinary hole punching cannot work here (test_portmap_nat shows the same
pair staying on DERP with the technique off).
"""

from __future__ import annotations

import time

import pytest

from .lab import Agent, Lab, _wait_for, ping
from .natlab import A4, B4, REGION, NatNet, build

pytestmark = pytest.mark.netns


def _path(agent: Agent, peer_key: str) -> str:
    return str(agent.peer_status(peer_key)["path"])


def _time_to_direct(net: NatNet, within: float) -> float | None:
    start = time.monotonic()

    def direct() -> bool:
        ping(net.ns_a, B4, count=1, timeout=1)
        return _path(net.a, net.b.public_key) == "direct"

    return time.monotonic() - start if _wait_for(direct, within, interval=0.2) else None


def test_cone_against_symmetric_goes_direct_through_a_guessed_port(lab: Lab) -> None:
    net = build(lab, "cone", "symmetric")
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=2, timeout=15), "no ping through the relay"
    took = _time_to_direct(net, 40)
    print(f"\ntime to direct (birthday): {took}")
    assert took is not None, (net.a.status()["dataplane"], net.b.status()["dataplane"])
    assert _wait_for(lambda: _path(net.b, net.a.public_key) == "direct", 10, interval=0.2)
    easy, hard = net.a.status()["dataplane"], net.b.status()["dataplane"]
    assert easy["birthday"]["nat"] == "easy", easy
    assert hard["birthday"]["nat"] == "hard", hard
    assert hard["birthday"]["bound"] == 1, hard  # b sends to a through one extra socket ...
    assert hard["birthday"]["sockets"] == 1, hard  # ... and the round's others are closed
    assert easy["disco"]["sent_ping"] >= 1
    a_sees_b = net.a.peer_status(net.b.public_key)["endpoint"]
    assert a_sees_b.startswith("198.18.2.1:"), a_sees_b  # b's NAT, on the guessed port
    assert net.b.peer_status(net.a.public_key)["endpoint"] == f"198.18.1.1:{net.a.listen_port}"
    # The overlay traffic really takes it: with the relay gone, pings still pass both ways.
    net.relay.stop()
    assert ping(net.ns_a, B4, count=10, timeout=10)
    assert ping(net.ns_b, A4, count=5, timeout=10)
    assert _path(net.a, net.b.public_key) == "direct"
    assert _path(net.b, net.a.public_key) == "direct"


def test_with_the_technique_off_on_one_side_they_stay_on_derp(lab: Lab) -> None:
    net = build(lab, "cone", "symmetric")
    net.b.nat_birthday = False
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=3, timeout=15), "no ping through the relay"
    assert ping(net.ns_a, B4, count=25, timeout=12)  # discovery rounds run meanwhile
    st = net.a.peer_status(net.b.public_key)
    assert (st["path"], st["derp_region"]) == ("derp", REGION)
    easy, hard = net.a.status()["dataplane"], net.b.status()["dataplane"]
    assert hard["birthday"]["opened"] == 0, hard
    assert easy["disco"].get("sent_nat_info", 0) >= 1  # a says what its NAT is ...
    assert easy["birthday"]["round"] is None  # ... but b never asks it to guess
    assert net.b.status()["dataplane"]["disco"].get("sent_nat_info", 0) == 0
