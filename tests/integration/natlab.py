"""Two agents behind NAT routers, an "internet" router with a DERP relay and STUN (root only).

    ns a         ns na (NAT)            ns r (internet)         ns nb (NAT)             ns b
    agent        lan        wan         wana       wanb         wan        lan          agent
    10.0.1.2 --- 10.0.1.1   198.18.1.1 - 198.18.1.2 198.18.2.2 - 198.18.2.1 10.0.2.1 --- 10.0.2.2
                 masquerade             lo 198.18.0.10:         masquerade
                                        agent derper :443 (TLS), STUN :3478
                                        lo 198.18.0.11(/.12):
                                        a second STUN server :3478 (region 901, no relay)

The second STUN server (its own region, as a second DERP region gives a real node) lets netcheck
compare what two servers saw: MappingVariesByDestIP is true behind "symmetric", false behind
"cone", and the agents tell each other (NatInfo), which decides the birthday technique
(engine/birthday.py). Home region 900 is pinned, so 901 is never a relay.

NAT kinds (nftables masquerade on the NAT router's wan side; Linux conntrack filters inbound
packets per remote address and port; unsolicited packets from the wan side are dropped):
    "cone"       masquerade keeping the source port when free: endpoint-independent mapping,
                 so the address STUN reports is the one peers can punch to
    "symmetric"  masquerade fully-random (iptables: --random-fully): a new random port per
                 destination (endpoint-dependent mapping), so the port STUN reports is useless
                 to peers
`block_udp()` drops all UDP the internet router forwards (STUN included; DERP over TCP 443
still works), `unblock_udp()` removes the rule.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .lab import (
    Agent,
    Lab,
    Peer,
    Proc,
    block_forwarded_udp,
    keypair,
    start_derper,
    unblock_forwarded_udp,
)

NatKind = Literal["cone", "symmetric"]

RELAY_IP = "198.18.0.10"
STUN2_IP, STUN2_ALT_IP = "198.18.0.11", "198.18.0.12"
REGION = 900
STUN2_REGION = 901
A4, B4 = "100.64.0.1", "100.64.0.2"
PORT_A, PORT_B = 41641, 41642


@dataclass
class NatNet:
    lab: Lab
    ns_a: str
    ns_b: str
    ns_na: str
    ns_nb: str
    ns_r: str
    a: Agent
    b: Agent
    relay: Proc
    cert_dir: Path

    def block_udp(self) -> None:
        block_forwarded_udp(self.lab, self.ns_r)

    def unblock_udp(self) -> None:
        unblock_forwarded_udp(self.lab, self.ns_r)

    def restart_relay(self) -> None:
        self.relay.stop()
        self.relay = start_relay(self.lab, self.ns_r, self.cert_dir)


def _veth(lab: Lab, ns1: str, dev1: str, ip1: str, ns2: str, dev2: str, ip2: str) -> None:
    lab.run(None, "ip", "link", "add", dev1, "netns", ns1, "type", "veth", "peer", "name", dev2,
            "netns", ns2)  # fmt: skip
    for ns, dev, ip in ((ns1, dev1, ip1), (ns2, dev2, ip2)):
        lab.run(None, "ip", "-n", ns, "addr", "add", ip, "dev", dev)
        lab.run(None, "ip", "-n", ns, "link", "set", dev, "up")


def _nat(lab: Lab, ns: str, kind: NatKind) -> None:
    flags = " fully-random" if kind == "symmetric" else ""
    lab.run(
        ns,
        "nft",
        "add table ip agtnat; "
        "add chain ip agtnat postrouting { type nat hook postrouting priority 100; }; "
        f'add rule ip agtnat postrouting oifname "wan" masquerade{flags}; '
        # A home router's firewall: unsolicited packets from the internet are dropped. Dropped
        # before conntrack confirms them, they leave no entry behind that would clash with
        # (and re-port) the mapping our own outgoing packet creates a moment later.
        "add chain ip agtnat input { type filter hook input priority 0; }; "
        'add rule ip agtnat input iifname "wan" ct state new drop',
    )


def start_relay(lab: Lab, ns_r: str, cert_dir: Path) -> Proc:
    return start_derper(lab, ns_r, RELAY_IP, 443, cert_dir)


def start_stun2(lab: Lab, ns_r: str) -> Proc:
    """The second STUN server on 198.18.0.11:3478 in the internet namespace."""
    for ip in (STUN2_IP, STUN2_ALT_IP):
        lab.run(None, "ip", "-n", ns_r, "addr", "add", f"{ip}/32", "dev", "lo")
    return lab.spawn(ns_r, sys.executable, "-m", "tests.integration.stun5780", STUN2_IP,
                     STUN2_ALT_IP, tag="stun2")  # fmt: skip


def agent_pair(
    lab: Lab, ns_a: str, ns_b: str, cert_dir: Path, *, stun2: bool = False
) -> tuple[Agent, Agent]:
    """Agents a (A4) and b (B4) that know each other only by key and home region 900 (the lab
    relay whose certificate is in `cert_dir`): no endpoints, DISCO finds the path. With
    `stun2`, the DERP map also lists region 901: the second STUN server (start_stun2)."""
    derp = (
        f'[derp]\nhome_region = {REGION}\n\n[[derp.regions]]\nid = {REGION}\ncode = "lab"\n'
        f'nodes = [{{ host = "{RELAY_IP}", port = 443, stun_port = 3478, '
        f'ca_file = "{cert_dir}/{RELAY_IP}.crt" }}]\n'
    )
    if stun2:
        derp += (
            f'\n[[derp.regions]]\nid = {STUN2_REGION}\ncode = "stun2"\n'
            f'nodes = [{{ host = "{STUN2_IP}", port = 443, stun_port = 3478 }}]\n'
        )
    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    a = Agent(
        lab,
        ns_a,
        private_key=priv_a,
        addresses=[f"{A4}/32"],
        listen_port=PORT_A,
        peers=[Peer("b", pub_b, (f"{B4}/32",), derp_region=REGION)],
        derp_toml=derp,
    )
    b = Agent(
        lab,
        ns_b,
        private_key=priv_b,
        addresses=[f"{B4}/32"],
        listen_port=PORT_B,
        peers=[Peer("a", pub_a, (f"{A4}/32",), derp_region=REGION)],
        derp_toml=derp,
    )
    return a, b


def build(lab: Lab, nat_a: NatKind, nat_b: NatKind) -> NatNet:
    ns_a, ns_na, ns_r = lab.add_ns("a"), lab.add_ns("na"), lab.add_ns("r")
    ns_nb, ns_b = lab.add_ns("nb"), lab.add_ns("b")
    _veth(lab, ns_a, "lan", "10.0.1.2/24", ns_na, "lan", "10.0.1.1/24")
    _veth(lab, ns_na, "wan", "198.18.1.1/24", ns_r, "wana", "198.18.1.2/24")
    _veth(lab, ns_nb, "wan", "198.18.2.1/24", ns_r, "wanb", "198.18.2.2/24")
    _veth(lab, ns_b, "lan", "10.0.2.2/24", ns_nb, "lan", "10.0.2.1/24")
    lab.run(None, "ip", "-n", ns_a, "route", "add", "default", "via", "10.0.1.1")
    lab.run(None, "ip", "-n", ns_b, "route", "add", "default", "via", "10.0.2.1")
    lab.run(None, "ip", "-n", ns_na, "route", "add", "default", "via", "198.18.1.2")
    lab.run(None, "ip", "-n", ns_nb, "route", "add", "default", "via", "198.18.2.2")
    lab.run(None, "ip", "-n", ns_r, "addr", "add", f"{RELAY_IP}/32", "dev", "lo")
    for ns in (ns_na, ns_nb, ns_r):
        lab.run(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _nat(lab, ns_na, nat_a)
    _nat(lab, ns_nb, nat_b)
    cert_dir = lab.path("derper-certs")
    relay = start_relay(lab, ns_r, cert_dir)
    start_stun2(lab, ns_r)
    # No endpoints: behind NAT, neither side knows where the other is reachable.
    a, b = agent_pair(lab, ns_a, ns_b, cert_dir, stun2=True)
    return NatNet(lab, ns_a, ns_b, ns_na, ns_nb, ns_r, a, b, relay, cert_dir)


# -- two agents behind one NAT (test_same_nat.py) ---------------------------------------------

SAME_NAT_NFT = (
    "add table ip agtnat; "
    "add chain ip agtnat postrouting { type nat hook postrouting priority 100; }; "
    'add rule ip agtnat postrouting oifname "wan" masquerade fully-random; '
    "add chain ip agtnat input { type filter hook input priority 0; }; "
    'add rule ip agtnat input iifname "wan" ct state new drop; '
    "add chain ip agtnat lan { type filter hook prerouting priority -300; }; "
    # UDP from the LAN to the router's public address: what a hairpinned path would send
    'add rule ip agtnat lan iifname "br0" ip daddr 198.18.1.1 meta l4proto udp counter'
)


def build_same_nat(lab: Lab) -> tuple[Agent, Agent, str, str]:
    """a (10.0.1.2) and b (10.0.1.3) on one bridged LAN behind one symmetric NAT router without
    hairpinning, the relay behind it (test_same_nat.py): (a, b, a's namespace, the router's)."""
    ns_a, ns_b, ns_n, ns_r = lab.add_ns("a"), lab.add_ns("b"), lab.add_ns("n"), lab.add_ns("r")
    lab.run(ns_n, "ip", "link", "add", "br0", "type", "bridge")
    lab.run(ns_n, "ip", "addr", "add", "10.0.1.1/24", "dev", "br0")
    lab.run(ns_n, "ip", "link", "set", "br0", "up")
    for ns, ip, port in ((ns_a, "10.0.1.2/24", "pa"), (ns_b, "10.0.1.3/24", "pb")):
        lab.run(None, "ip", "link", "add", "lan", "netns", ns, "type", "veth", "peer", "name",
                port, "netns", ns_n)  # fmt: skip
        lab.run(ns, "ip", "addr", "add", ip, "dev", "lan")
        lab.run(ns, "ip", "link", "set", "lan", "up")
        lab.run(ns_n, "ip", "link", "set", port, "master", "br0")
        lab.run(ns_n, "ip", "link", "set", port, "up")
        lab.run(ns, "ip", "route", "add", "default", "via", "10.0.1.1")
    _veth(lab, ns_n, "wan", "198.18.1.1/24", ns_r, "wana", "198.18.1.2/24")
    lab.run(ns_n, "ip", "route", "add", "default", "via", "198.18.1.2")
    lab.run(ns_r, "ip", "addr", "add", f"{RELAY_IP}/32", "dev", "lo")
    lab.run(ns_n, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    lab.run(ns_n, "nft", SAME_NAT_NFT)
    cert_dir = lab.path("derper-certs")
    start_derper(lab, ns_r, RELAY_IP, 443, cert_dir)
    a, b = agent_pair(lab, ns_a, ns_b, cert_dir)
    return a, b, ns_a, ns_n
