"""Agents behind NAT routers (tests/integration/natlab.py): relayed first, direct when possible."""

from __future__ import annotations

import pytest

from .lab import Lab, ping
from .natlab import A4, B4, REGION, build

pytestmark = pytest.mark.netns


def test_behind_nats_without_endpoints_they_reach_each_other_through_the_relay(lab: Lab) -> None:
    net = build(lab, "symmetric", "symmetric")
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=3, timeout=15), "no ping through the relay"
    assert ping(net.ns_b, A4, count=3, timeout=10)
    st = net.a.peer_status(net.b.public_key)
    assert (st["path"], st["derp_region"]) == ("derp", REGION)
