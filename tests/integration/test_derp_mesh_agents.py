"""A 3-node DERP region mesh: agent A homes on node 1, agent B on node 3, UDP between them is
dropped; A reaches B through node 1 -> node 3 (one mesh hop), not through node 2.

ns a  198.18.1.1 ---- ns r (router): lo 198.18.0.11 / .12 / .13, three `agent derper` nodes
ns b  198.18.2.1 ----                 meshed with one key; nftables drops forwarded UDP
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from agent.netio.certs import make_self_signed

from .lab import Agent, Lab, Peer, Proc, block_forwarded_udp, keypair, ping, start_derper

pytestmark = pytest.mark.netns

A4, B4 = "100.64.0.1", "100.64.0.2"
NODES = ("198.18.0.11", "198.18.0.12", "198.18.0.13")
REGION = 900


def _relay(lab: Lab, ns: str, ip: str, certs: Path, key_file: Path, bundle: Path) -> Proc:
    others = ",".join(f"https://{n}:443" for n in NODES)
    mesh = ("--mesh-key-file", str(key_file), "--mesh-with", others, "--mesh-ca-file", str(bundle))
    return start_derper(lab, ns, ip, 443, certs, *mesh, stun_port=0)


def _agent(lab: Lab, ns: str, priv: str, me: str, peer: Peer, node: str, ca: Path) -> Agent:
    derp = (
        f'[derp]\nhome_region = {REGION}\n\n[[derp.regions]]\nid = {REGION}\ncode = "mesh"\n'
        f'nodes = [{{ host = "{node}", port = 443, stun_port = 0, ca_file = "{ca}" }}]\n'
    )
    return Agent(
        lab,
        ns,
        private_key=priv,
        addresses=[f"{me}/32"],
        listen_port=41641,
        peers=[peer],
        derp_toml=derp,
    )


def test_three_node_mesh_carries_a_to_b_in_one_hop(lab: Lab) -> None:
    ns_a, ns_b, ns_r = lab.add_ns("a"), lab.add_ns("b"), lab.add_ns("r")
    lab.link(ns_a, ns_r, subnet=1)
    lab.link(ns_b, ns_r, subnet=2)
    lab.run(None, "ip", "-n", ns_a, "route", "add", "default", "via", "198.18.1.2")
    lab.run(None, "ip", "-n", ns_b, "route", "add", "default", "via", "198.18.2.2")
    for ip in NODES:
        lab.run(None, "ip", "-n", ns_r, "addr", "add", f"{ip}/32", "dev", "lo")
    lab.run(ns_r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    block_forwarded_udp(lab, ns_r)
    certs = lab.path("certs")
    for ip in NODES:
        make_self_signed(certs, ip)
    bundle = lab.path("mesh-ca.pem")
    bundle.write_bytes(b"".join((certs / f"{ip}.crt").read_bytes() for ip in NODES))
    key_file = lab.path("mesh.key")
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o600)
    relays = [_relay(lab, ns_r, ip, certs, key_file, bundle) for ip in NODES]

    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    a = _agent(
        lab, ns_a, priv_a, A4, Peer("b", pub_b, (f"{B4}/32",), derp_region=REGION), NODES[0],
        certs / f"{NODES[0]}.crt",
    )  # fmt: skip
    b = _agent(
        lab, ns_b, priv_b, B4, Peer("a", pub_a, (f"{A4}/32",), derp_region=REGION), NODES[2],
        certs / f"{NODES[2]}.crt",
    )  # fmt: skip
    a.start()
    b.start()
    assert ping(ns_a, B4, count=3, timeout=20), "A did not reach B through the mesh"
    assert ping(ns_b, A4, count=3, timeout=10)
    st = a.peer_status(pub_b)
    assert (st["path"], st["derp_region"]) == ("derp", REGION)
    # node 2 is not on the way: without it, A still reaches B (node 1 -> node 3 directly)
    relays[1].stop()
    assert ping(ns_a, B4, count=3, timeout=10)
    # and only the mesh joins them: without node 3, B is unreachable from A's node
    relays[2].stop()
    assert not ping(ns_a, B4, count=1, timeout=3)
