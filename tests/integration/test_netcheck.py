"""`agent netcheck` in namespaces: two DERP regions on a router; one loses STUN, one goes away.

ns c (client)                  ns r (router, both relays on lo)
198.18.1.1  ---- veth1 ---->   198.18.1.2
default via 198.18.1.2         198.18.0.10  region 1 "one": `agent derper` :443, STUN :3478
                               198.18.0.11  region 2 "two": `agent derper` :8443, STUN :3478
                               nftables input rules drop what a step wants blocked

This kernel has no netem (tc cannot add delay), so a region is made worse by dropping its STUN
(its latency then comes from the HTTPS check) or all of its traffic (unreachable).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from .lab import REPO_ROOT, Lab, keypair, start_derper

pytestmark = pytest.mark.netns

CLIENT = "198.18.1.1"
RELAYS = {1: ("198.18.0.10", 443), 2: ("198.18.0.11", 8443)}


def _config(lab: Lab, certs: dict[int, Path]) -> Path:
    priv, _pub = keypair()
    lines = ["[interface]", f'private_key = "{priv}"', 'addresses = ["100.64.0.1/32"]']
    for region, (ip, port) in RELAYS.items():
        lines += [
            "",
            "[[derp.regions]]",
            f"id = {region}",
            f'code = "{"one" if region == 1 else "two"}"',
            f'nodes = [{{ host = "{ip}", port = {port}, stun_port = 3478, '
            f'ca_file = "{certs[region] / f"{ip}.crt"}" }}]',
        ]
    path = lab.path("agent.conf")
    path.write_text("\n".join(lines) + "\n")
    return path


def _netcheck(lab: Lab, ns: str, conf: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    res = lab.run(
        ns, sys.executable, "-m", "agent", "netcheck", "-c", str(conf), *extra, env=env, timeout=30
    )
    return res.stdout


def _report(lab: Lab, ns: str, conf: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_netcheck(lab, ns, conf, "--json"))
    return data


def _drop(lab: Lab, ns: str, rule: str) -> None:
    lab.run(
        ns,
        "nft",
        "add table inet agtnc; "
        "add chain inet agtnc input { type filter hook input priority 0; }; "
        f"add rule inet agtnc input {rule} drop",
    )


def test_netcheck_reflects_blocked_stun_and_an_unreachable_region(lab: Lab) -> None:
    ns_c, ns_r = lab.add_ns("c"), lab.add_ns("r")
    lab.link(ns_c, ns_r, subnet=1)
    lab.run(None, "ip", "-n", ns_c, "route", "add", "default", "via", "198.18.1.2")
    certs: dict[int, Path] = {}
    for region, (ip, port) in RELAYS.items():
        lab.run(None, "ip", "-n", ns_r, "addr", "add", f"{ip}/32", "dev", "lo")
        certs[region] = lab.path(f"certs-{region}")
        start_derper(lab, ns_r, ip, port, certs[region])
    conf = _config(lab, certs)

    # 1. Everything open: UDP works, both regions measured over STUN, no NAT in the way.
    rep = _report(lab, ns_c, conf)
    assert rep["udp"] is True
    assert rep["global_v4"].startswith(f"{CLIENT}:")
    assert rep["mapping_varies_by_dest_ip"] is False
    assert set(rep["region_v4_latency"]) == {"1", "2"}
    assert rep["https_regions"] == []
    assert rep["preferred_region"] in (1, 2)
    assert all(0 < v < 0.5 for v in rep["region_latency"].values())

    text = _netcheck(lab, ns_c, conf)
    assert "\t* UDP: true" in text
    assert f"\t* IPv4: yes, {CLIENT}:" in text
    assert "- one: " in text
    assert "- two: " in text

    # 2. Region 2's STUN is dropped: its latency comes from the HTTPS check; UDP still works.
    _drop(lab, ns_r, f"ip daddr {RELAYS[2][0]} udp dport 3478")
    rep = _report(lab, ns_c, conf)
    assert rep["udp"] is True
    assert set(rep["region_v4_latency"]) == {"1"}
    assert rep["https_regions"] == [2]
    assert set(rep["region_latency"]) == {"1", "2"}
    assert rep["mapping_varies_by_dest_ip"] is None  # only one STUN server answered
    text = _netcheck(lab, ns_c, conf)
    assert "(https)  (region 2)" in text

    # 3. Region 1 disappears entirely: region 2 (HTTPS only) becomes the home.
    lab.run(ns_r, "nft", f"add rule inet agtnc input ip daddr {RELAYS[1][0]} drop")
    rep = _report(lab, ns_c, conf)
    assert rep["udp"] is False
    assert set(rep["region_latency"]) == {"2"}
    assert rep["preferred_region"] == 2
    assert rep["nearest_region"] == 2
    text = _netcheck(lab, ns_c, conf)
    assert "\t* UDP: false" in text
    assert "- one: unreachable  (region 1)" in text
    assert "\t* Nearest DERP: two (region 2)" in text
