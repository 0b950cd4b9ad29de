"""Home region by latency: an agent whose first-listed region is unreachable moves its home
to the region that answers, connects there, and its peer reaches it.

ns a 198.18.1.1 --+-- ns r: relays 198.18.0.10 (region 1) and 198.18.0.20 (region 2), router
ns b 198.18.2.1 --+       a cannot reach region 1 at all (nftables drop, TCP and UDP)
"""

from __future__ import annotations

import pytest

from .lab import Agent, Lab, Peer, _wait_for, keypair, ping, start_derper

pytestmark = pytest.mark.netns

A4, B4 = "100.64.0.1", "100.64.0.2"
R1, R2 = "198.18.0.10", "198.18.0.20"


def _derp(certs: str, pinned: int | None) -> str:
    lines = ["[derp]"] + ([f"home_region = {pinned}"] if pinned else [])
    for rid, ip in ((1, R1), (2, R2)):
        lines += [
            "",
            "[[derp.regions]]",
            f"id = {rid}",
            f'code = "r{rid}"',
            f'nodes = [{{ host = "{ip}", port = 443, stun_port = 3478, '
            f'ca_file = "{certs}/{ip}.crt" }}]',
        ]
    return "\n".join(lines) + "\n"


def test_home_moves_to_the_region_that_answers(lab: Lab) -> None:
    ns_a, ns_b, ns_r = lab.add_ns("a"), lab.add_ns("b"), lab.add_ns("r")
    lab.link(ns_a, ns_r, subnet=1)
    lab.link(ns_b, ns_r, subnet=2)
    lab.run(None, "ip", "-n", ns_a, "route", "add", "default", "via", "198.18.1.2")
    lab.run(None, "ip", "-n", ns_b, "route", "add", "default", "via", "198.18.2.2")
    for ip in (R1, R2):
        lab.run(None, "ip", "-n", ns_r, "addr", "add", f"{ip}/32", "dev", "lo")
    lab.run(ns_r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    certs = lab.path("certs")
    start_derper(lab, ns_r, R1, 443, certs)
    start_derper(lab, ns_r, R2, 443, certs)
    lab.run(
        ns_r,
        "nft",
        "add table inet agtlab; "
        "add chain inet agtlab in { type filter hook input priority 0; }; "
        f"add rule inet agtlab in ip saddr 198.18.1.1 ip daddr {R1} drop",
    )
    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    a = Agent(
        lab,
        ns_a,
        private_key=priv_a,
        addresses=[f"{A4}/32"],
        listen_port=41641,
        peers=[Peer("b", pub_b, (f"{B4}/32",), derp_region=2)],
        derp_toml=_derp(str(certs), None),
    )
    b = Agent(
        lab,
        ns_b,
        private_key=priv_b,
        addresses=[f"{B4}/32"],
        listen_port=41642,
        peers=[Peer("a", pub_a, (f"{A4}/32",), derp_region=2)],
        derp_toml=_derp(str(certs), 2),
    )
    a.start()
    b.start()
    assert a.status()["derp"]["home_region"] in (1, 2)

    def moved() -> bool:
        derp = a.status()["derp"]
        return bool(derp["home_region"] == 2 and 2 in derp["connected_regions"])

    assert _wait_for(moved, 15, interval=0.3), a.status()["derp"]
    assert ping(ns_a, B4, count=3, timeout=15)
    assert ping(ns_b, A4, count=3, timeout=10)
    assert a.peer_status(pub_b)["derp_region"] == 2
    assert a.status()["derp"]["home_region"] == 2
