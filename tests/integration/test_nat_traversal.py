"""Agents behind NAT routers (tests/integration/natlab.py): relayed first, direct when possible."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from .lab import Agent, Lab, _wait_for, iperf3, ping
from .natlab import A4, B4, REGION, NatNet, build

pytestmark = pytest.mark.netns


def test_behind_symmetric_nats_they_stay_on_the_relay_and_still_ping(lab: Lab) -> None:
    net = build(lab, "symmetric", "symmetric")
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=3, timeout=15), "no ping through the relay"
    assert ping(net.ns_b, A4, count=3, timeout=10)
    # hole punching is tried (pings, CallMeMaybe) but cannot work: still relayed 8 s later
    assert ping(net.ns_a, B4, count=20, timeout=12)
    st = net.a.peer_status(net.b.public_key)
    assert (st["path"], st["derp_region"]) == ("derp", REGION)
    disco = net.a.status()["dataplane"]["disco"]
    assert disco["sent_ping"] > 0
    assert disco["sent_call_me_maybe"] > 0
    for agent in (net.a, net.b):  # both know their NAT is hard: no birthday round (hopeless)
        birthday = agent.status()["dataplane"]["birthday"]
        assert birthday["nat"] == "hard", birthday
        assert birthday["opened"] == 0, birthday


def test_with_udp_blocked_they_stay_on_the_relay(lab: Lab) -> None:
    net = build(lab, "cone", "cone")
    net.block_udp()
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=10, timeout=15)
    st = net.a.peer_status(net.b.public_key)
    assert (st["path"], st["derp_region"]) == ("derp", REGION)
    disco = net.a.status()["dataplane"]["disco"]
    assert disco["sent_ping"] > 0  # tried over UDP ...
    assert "received_pong" not in disco or all(  # ... but every pong came through the relay
        p["path"] == "derp" for p in net.a.status()["peers"]
    )


def _path(agent: Agent, peer_key: str) -> str:
    return str(agent.peer_status(peer_key)["path"])


def _wait_direct(net: NatNet, within: float = 15) -> bool:
    """Ping from a until its path to b is direct (the pings are the traffic that drives it)."""

    def direct() -> bool:
        ping(net.ns_a, B4, count=1, timeout=2)
        return _path(net.a, net.b.public_key) == "direct"

    return _wait_for(direct, within, interval=0.3)


def test_behind_cone_nats_they_go_direct(lab: Lab) -> None:
    net = build(lab, "cone", "cone")
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=2, timeout=15)
    assert _wait_direct(net), net.a.status()
    st = net.a.peer_status(net.b.public_key)
    assert st["endpoint"].startswith("198.18.2.1:"), st  # b's NAT's public address
    assert _wait_for(lambda: _path(net.b, net.a.public_key) == "direct", 10, interval=0.3)


def test_udp_blocked_mid_transfer_moves_to_the_relay_and_back(lab: Lab) -> None:
    """iperf3 TCP keeps going while the path moves: direct -> DERP (<= 3 s) -> direct."""
    net = build(lab, "cone", "cone")
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=2, timeout=15)
    assert _wait_direct(net)
    result: dict[str, Any] = {}
    stream = threading.Thread(
        target=lambda: result.update(iperf3(net.ns_b, net.ns_a, B4, seconds=16, check=False))
    )
    stream.start()
    try:
        time.sleep(3)
        net.block_udp()
        blocked = time.monotonic()
        assert _wait_for(lambda: _path(net.a, net.b.public_key) == "derp", 10, interval=0.2)
        to_derp = time.monotonic() - blocked
        time.sleep(3)
        net.unblock_udp()
        unblocked = time.monotonic()
        assert _wait_for(lambda: _path(net.a, net.b.public_key) == "direct", 30, interval=0.2)
        to_direct = time.monotonic() - unblocked
    finally:
        stream.join(40)
    assert "error" not in result, result.get("error")
    intervals = [i["sum"]["bits_per_second"] for i in result["intervals"]]
    stalled = max(
        (len(run) for run in "".join("0" if b < 1e5 else "1" for b in intervals).split("1")),
        default=0,
    )
    # a direct path that goes silent under traffic is probed after 0.5 s and dropped 0.5 s
    # later (measured 1.3 s here, including the 0.2 s status polling); the issue asks <= 5 s
    assert to_derp <= 3.0, f"moved to DERP after {to_derp:.1f} s"
    assert to_direct <= 30.0
    # TCP's own retransmission backoff (0.2+0.4+0.8+1.6 s) adds up to one more doubling
    # before the stream is seen flowing again (measured: 1 s)
    assert stalled <= 4, f"TCP stalled for {stalled} s: {intervals}"
    assert sum(1 for b in intervals[-6:] if b > 1e6) >= 4, f"not flowing at the end: {intervals}"
    assert result["end"]["sum_received"]["bytes"] > 0
    probes = re.search(
        r"^agent_disco_silence_probes_total (\d+)$", net.a.cli("metrics").stdout, re.M
    )
    assert probes is not None
    assert int(probes.group(1)) >= 1, "the silent path was not probed"
    print(f"to DERP {to_derp:.1f} s, back to direct {to_direct:.1f} s, stall {stalled} s")


def test_agent_ping_until_direct_shows_the_switch(lab: Lab) -> None:
    net = build(lab, "cone", "cone")
    net.block_udp()  # relayed until the router lets UDP through
    net.a.start()
    net.b.start()
    first = net.a.cli("ping", "b", "-n", "1").stdout
    assert first.startswith("pong from b (100.64.0.2) via DERP(lab) in "), first
    net.unblock_udp()
    out = net.a.cli("ping", "b", "--until-direct", "-n", "60", "--interval", "0.2", timeout=60)
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("pong from b (100.64.0.2) via 198.18.2.1:41642 in "), lines
    assert all(line.startswith("pong from b (100.64.0.2) via ") for line in lines), lines
    metrics = net.a.cli("metrics").stdout
    assert 'agent_peer_path{peer="b"' in metrics
    assert "agent_peer_path_switches_total" in metrics
