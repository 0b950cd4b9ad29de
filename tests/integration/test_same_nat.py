"""Two agents behind one NAT router go direct over their LAN, not through the router (root only).

    ns a 10.0.1.2 --+
                    +-- br0 10.0.1.1 (ns n, NAT)  wan 198.18.1.1 --- 198.18.1.2 (ns r, internet)
    ns b 10.0.1.3 --+   masquerade fully-random                     lo 198.18.0.10: agent derper
                        no hairpin: unsolicited packets from the wan side are dropped

Each agent's endpoints include its local address with the WireGuard port (source `local`,
engine/local_endpoints), sent in CallMeMaybe; the peer pings it over the bridge and the path
is direct to 10.0.1.x. The router's symmetric NAT makes the STUN endpoints useless, and a
counter on its LAN side shows that, once direct, no traffic is sent to its public address.
"""

from __future__ import annotations

import re

import pytest

from .lab import Agent, Lab, _wait_for, ping, start_derper
from .natlab import B4, PORT_A, PORT_B, RELAY_IP, _veth, agent_pair

pytestmark = pytest.mark.netns

NFT = (
    "add table ip agtnat; "
    "add chain ip agtnat postrouting { type nat hook postrouting priority 100; }; "
    'add rule ip agtnat postrouting oifname "wan" masquerade fully-random; '
    "add chain ip agtnat input { type filter hook input priority 0; }; "
    'add rule ip agtnat input iifname "wan" ct state new drop; '
    "add chain ip agtnat lan { type filter hook prerouting priority -300; }; "
    # UDP from the LAN to the router's public address: what a hairpinned path would send
    'add rule ip agtnat lan iifname "br0" ip daddr 198.18.1.1 meta l4proto udp counter'
)


def _build(lab: Lab) -> tuple[Agent, Agent, str, str]:
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
    lab.run(ns_n, "nft", NFT)
    cert_dir = lab.path("derper-certs")
    start_derper(lab, ns_r, RELAY_IP, 443, cert_dir)
    a, b = agent_pair(lab, ns_a, ns_b, cert_dir)
    return a, b, ns_a, ns_n


def test_behind_one_nat_they_go_direct_over_the_lan(lab: Lab) -> None:
    a, b, ns_a, ns_n = _build(lab)
    a.start()
    b.start()
    assert ping(ns_a, B4, count=2, timeout=15), "no ping through the relay"

    def direct() -> bool:
        ping(ns_a, B4, count=1, timeout=1)
        return str(a.peer_status(b.public_key)["path"]) == "direct"

    assert _wait_for(direct, 15, interval=0.2), a.status()
    assert a.peer_status(b.public_key)["endpoint"] == f"10.0.1.3:{PORT_B}"
    assert _wait_for(lambda: b.peer_status(a.public_key)["path"] == "direct", 10, interval=0.2)
    assert b.peer_status(a.public_key)["endpoint"] == f"10.0.1.2:{PORT_A}"
    before = _hairpinned(lab, ns_n)
    assert ping(ns_a, B4, count=10, timeout=10)
    assert str(a.peer_status(b.public_key)["path"]) == "direct"
    assert _hairpinned(lab, ns_n) == before  # the overlay traffic stayed on the LAN


def _hairpinned(lab: Lab, ns_n: str) -> int:
    out = lab.run(ns_n, "nft", "list", "chain", "ip", "agtnat", "lan").stdout
    m = re.search(r"counter packets (\d+)", out)
    assert m, out
    return int(m.group(1))
