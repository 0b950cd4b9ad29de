"""Agents that join one coordinator with an auth key: no static peers, no addresses in their
configs; they ping each other by overlay address, a node removed on the coordinator becomes
unreachable within seconds, and a coordinator restart loses nothing.

ns a 198.18.1.1 --+
ns b 198.18.2.1 --+-- ns r (router): `agent coordinator` on 198.18.0.30:8443 (SQLite, TLS),
ns c 198.18.3.1 --+                  `agent derper` on 198.18.0.10:443 (the DERP map it hands out)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .lab import (
    REPO_ROOT,
    Agent,
    Lab,
    LabError,
    Proc,
    _tcp_listening,
    _wait_for,
    keypair,
    ping,
    start_derper,
)

pytestmark = pytest.mark.netns

COORD_IP, RELAY_IP, RELAY2_IP = "198.18.0.30", "198.18.0.10", "198.18.0.20"
ENV = {"PYTHONPATH": str(REPO_ROOT)}


@dataclass
class Site:
    lab: Lab
    ns_r: str
    conf: Path
    auth_key: str
    coordinator: Proc | None = None

    def cli(self, *args: str) -> str:
        cmd = (sys.executable, "-m", "agent", "coordinator", "-c", str(self.conf), *args)
        return self.lab.run(None, *cmd, env=ENV, timeout=30).stdout

    def start_coordinator(self) -> None:
        cmd = (sys.executable, "-m", "agent", "coordinator", "-c", str(self.conf))
        self.coordinator = self.lab.spawn(self.ns_r, *cmd, env=ENV, tag="coordinator")
        proc = self.coordinator
        if not _wait_for(lambda: _tcp_listening(self.ns_r, 8443) or not proc.alive(), 15):
            raise LabError(f"coordinator did not listen\n{proc.describe()}")
        if not proc.alive():
            raise LabError(f"coordinator exited\n{proc.describe()}")

    def agent(self, tag: str, subnet: int, expect: str) -> Agent:
        ns = self.lab.add_ns(tag)
        self.lab.link(ns, self.ns_r, subnet=subnet)
        self.lab.run(None, "ip", "-n", ns, "route", "add", "default", "via", f"198.18.{subnet}.2")
        priv, _ = keypair()
        ca = self.lab.path("coord-certs") / f"{COORD_IP}.crt"
        control = (
            f'[control]\nurl = "https://{COORD_IP}:8443"\nauth_key = "{self.auth_key}"\n'
            f'ca_file = "{ca}"\nhostname = "{tag}"\n'
        )
        return Agent(
            self.lab,
            ns,
            private_key=priv,
            addresses=[expect],
            listen_port=41641,
            control_toml=control,
        )


def _site(lab: Lab, regions: int = 1) -> Site:
    ns_r = lab.add_ns("r")
    for ip in (COORD_IP, RELAY_IP, RELAY2_IP):
        lab.run(None, "ip", "-n", ns_r, "addr", "add", f"{ip}/32", "dev", "lo")
    lab.run(ns_r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    relay_certs = lab.path("relay-certs")
    start_derper(lab, ns_r, RELAY_IP, 443, relay_certs)
    second = ""
    if regions == 2:
        start_derper(lab, ns_r, RELAY2_IP, 443, relay_certs)
        second = (
            f'\n[[derp.regions]]\nid = 901\ncode = "lab2"\nnodes = [{{ host = "{RELAY2_IP}", '
            f'port = 443, ca_file = "{relay_certs}/{RELAY2_IP}.crt" }}]\n'
        )
    conf = lab.path("coordinator.conf")
    conf.write_text(
        f"""
[coordinator]
listen = "{COORD_IP}:8443"
hostname = "{COORD_IP}"
database = "{lab.path("coordinator.db")}"

[tls]
mode = "self-signed"
cert_dir = "{lab.path("coord-certs")}"

[[derp.regions]]
id = 900
code = "lab"
nodes = [{{ host = "{RELAY_IP}", port = 443, ca_file = "{relay_certs}/{RELAY_IP}.crt" }}]
{second}"""
    )
    site = Site(lab, ns_r, conf, "")
    site.auth_key = site.cli("keys", "create", "--reusable", "--expiry", "1h").strip()
    site.start_coordinator()
    return site


def _peers(agent: Agent) -> set[str]:
    return {p["name"] for p in agent.status()["peers"]}


def test_three_agents_join_ping_lose_a_removed_node_and_survive_a_restart(lab: Lab) -> None:
    site = _site(lab)
    a = site.agent("a", 1, "100.64.0.1/10")
    b = site.agent("b", 2, "100.64.0.2/10")
    c = site.agent("c", 3, "100.64.0.3/10")
    for agent in (a, b, c):
        agent.start()  # one after the other: the coordinator allocates .1, .2, .3 in order
    assert _wait_for(lambda: _peers(a) == {"b", "c"}, 10, interval=0.2), a.status()["peers"]
    assert ping(a.ns, "100.64.0.2", count=2, timeout=15)
    assert ping(a.ns, "100.64.0.3", count=2, timeout=15)
    assert ping(b.ns, "100.64.0.3", count=2, timeout=15)
    assert ping(c.ns, "fd7a:115c:a1e0::1", count=2, timeout=15)

    # removed on the coordinator: gone from the others within seconds
    site.cli("nodes", "remove", "c")
    removed = time.monotonic()
    assert _wait_for(lambda: _peers(a) == {"b"} and _peers(b) == {"a"}, 10, interval=0.2)
    assert time.monotonic() - removed < 5
    assert not ping(a.ns, "100.64.0.3", count=1, timeout=2)

    # the coordinator restarts: nothing lost, the agents poll again, changes flow again
    assert site.coordinator is not None
    site.coordinator.stop()
    assert ping(a.ns, "100.64.0.2", count=2, timeout=10)  # the tunnel does not need it
    site.start_coordinator()
    d = site.agent("d", 4, "100.64.0.3/10")  # the lowest free address: c's, freed
    d.start(timeout=30)
    assert _wait_for(lambda: _peers(a) == {"b", "d"}, 15, interval=0.3), a.status()["peers"]
    assert ping(a.ns, d.addresses[0].split("/")[0], count=2, timeout=15)
    listed = site.cli("nodes")
    assert "a" in listed
    assert "b" in listed


def test_an_agent_moves_its_home_region_and_the_others_still_reach_it(lab: Lab) -> None:
    """a cannot reach region 900 at all (TCP and STUN dropped), so its netcheck prefers 901;
    it moves its home there and tells the coordinator; b (home 900, UDP to a blocked) reaches
    a through a's new home region, which b learns from the network map."""
    site = _site(lab, regions=2)
    a = site.agent("a", 1, "100.64.0.1/10")
    b = site.agent("b", 2, "100.64.0.2/10")
    lab.run(
        site.ns_r,
        "nft",
        "add table inet agtlab; "
        "add chain inet agtlab in { type filter hook input priority 0; }; "
        f"add rule inet agtlab in ip saddr 198.18.1.1 ip daddr {RELAY_IP} drop; "
        "add chain inet agtlab blockudp { type filter hook forward priority 0; }; "
        "add rule inet agtlab blockudp meta l4proto udp drop",
    )
    a.start()
    b.start()
    assert _wait_for(lambda: a.status()["derp"]["home_region"] == 901, 15, interval=0.3)

    def b_knows() -> bool:
        peers = b.status()["peers"]
        return bool(peers) and peers[0]["derp_region"] == 901

    assert _wait_for(b_knows, 10, interval=0.3), b.status()["peers"]
    assert ping(b.ns, "100.64.0.1", count=3, timeout=15), "b did not reach a in its new region"
    assert ping(a.ns, "100.64.0.2", count=2, timeout=10)
