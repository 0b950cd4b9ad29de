"""Port mapping turns a hard NAT into an easy one: a behind a symmetric NAT whose router runs
miniupnpd, b behind a cone NAT (root only).

    ns a         ns na (router)                 ns r (internet)               ns nb (NAT)   ns b
    agent        lan           wan              wana         wanb             wan   lan     agent
    10.0.1.2 --- 10.0.1.1      198.18.1.1 ----- 198.18.1.2   198.18.2.2 ----- 198.18.2.1 -- 10.0.2.2
                 miniupnpd (UPnP IGD, NAT-PMP,  lo 198.18.0.10: agent derper  masquerade (cone)
                 PCP); masquerade fully-random  lo 198.18.0.20/.21: stun5780
                 for LAN sources only

Without mapping, symmetric/cone stays on DERP (b's probes reach a's NAT on a port that
is not the one a's packets to b use) while the birthday technique is off; these tests turn it
off (`nat_birthday = false`) so that only port mapping is at work (test_nat_birthday.py has
the same pair going direct by it). With it, a's CallMeMaybe and endpoint list carry
198.18.1.1:<mapped> (source `portmap`), b's pings to it are forwarded to a, and the path
goes direct. The router's own STUN check (miniupnpd refuses a reserved WAN address
otherwise, tests/integration/PORTMAP_LAB.md) needs the RFC 5780 responder in the internet
namespace and its answers let through the router's input filter.
"""

from __future__ import annotations

import time

import pytest

from .lab import Agent, Lab, _wait_for, ping
from .miniupnpd import UpnpRouter
from .natlab import B4, REGION, NatNet, build

pytestmark = pytest.mark.netns


def _build(lab: Lab, *, portmap: bool, only: str | None = None) -> tuple[NatNet, UpnpRouter]:
    net = build(lab, "symmetric", "cone")
    router = UpnpRouter(net, only)
    net.a.portmap = portmap
    net.a.nat_birthday = net.b.nat_birthday = False
    return net, router


def _path(agent: Agent, peer_key: str) -> str:
    return str(agent.peer_status(peer_key)["path"])


def _time_to_direct(net: NatNet, within: float) -> float | None:
    """Seconds from the first ping until a's path to b is direct (pings drive it), or None."""
    start = time.monotonic()

    def direct() -> bool:
        ping(net.ns_a, B4, count=1, timeout=1)
        return _path(net.a, net.b.public_key) == "direct"

    return time.monotonic() - start if _wait_for(direct, within, interval=0.2) else None


@pytest.mark.parametrize("protocol", ["upnp", "pmp", "pcp"])
def test_symmetric_nat_with_a_mapping_router_goes_direct(lab: Lab, protocol: str) -> None:
    """One cell per protocol: the router offers only that one."""
    net, _router = _build(lab, portmap=True, only=protocol)
    net.a.start()
    mapped = _wait_for(lambda: net.a.status().get("portmap") is not None, 20, interval=0.2)
    assert mapped, net.a.proc.describe() if net.a.proc else "no agent"
    pm = net.a.status()["portmap"]
    assert pm["external"].startswith("198.18.1.1:"), pm
    assert pm["protocol"] == protocol, pm
    net.b.start()
    took = _time_to_direct(net, 20)
    print(f"\ntime to direct with port mapping: {took}")
    assert took is not None, net.a.status()
    st = net.b.peer_status(net.a.public_key)
    assert st["endpoint"] == pm["external"], (st, pm)  # b reaches a through the mapping
    assert ping(net.ns_a, B4, count=5, timeout=10)
    assert _path(net.a, net.b.public_key) == "direct"


def test_symmetric_nat_without_port_mapping_stays_on_derp(lab: Lab) -> None:
    net, _router = _build(lab, portmap=False)
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=3, timeout=15), "no ping through the relay"
    assert ping(net.ns_a, B4, count=20, timeout=12)  # discovery rounds run meanwhile
    st = net.a.peer_status(net.b.public_key)
    assert (st["path"], st["derp_region"]) == ("derp", REGION)
    assert net.a.status().get("portmap") is None


def test_router_restart_the_path_stays_or_returns_direct(lab: Lab) -> None:
    net, router = _build(lab, portmap=True)
    net.a.start()
    assert _wait_for(lambda: net.a.status().get("portmap") is not None, 15, interval=0.2)
    net.b.start()
    assert _time_to_direct(net, 20) is not None, net.a.status()
    assert net.a.proc is not None
    mapped_before = net.a.proc.stderr_text().count("portmap.mapped")
    router.restart_empty()
    restarted = time.monotonic()

    def remapped() -> bool:
        ping(net.ns_a, B4, count=1, timeout=1)
        assert net.a.proc is not None
        return net.a.proc.stderr_text().count("portmap.mapped") > mapped_before

    assert _wait_for(remapped, 30, interval=0.5), net.a.proc.describe()
    took = time.monotonic() - restarted
    # miniupnpd announces its restart (a PCP unsolicited ANNOUNCE to 224.0.0.1:5350): the agent
    # maps again at once instead of at its next check of the router (every 20 s)
    log = net.a.proc.stderr_text()
    assert "portmap.announcement" in log, log[-3000:]
    assert "announced it lost its mappings" in log
    back = _time_to_direct(net, max(1.0, 30 - (time.monotonic() - restarted)))
    since = time.monotonic() - restarted
    print(f"\nre-mapped {took:.1f} s and direct {since:.1f} s after the restart")
    assert back is not None, net.a.status()
    assert ping(net.ns_a, B4, count=3, timeout=6)
