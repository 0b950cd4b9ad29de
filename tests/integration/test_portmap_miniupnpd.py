"""Port mapping against a real router: Debian's miniupnpd (nftables) with UPnP IGD, NAT-PMP and
PCP (root only).

    ns c (client)              ns gw (router)                       ns inet ("internet")
    portmap_client             miniupnpd                            stun5780 (RFC 5780 STUN)
    UDP :41641 (our port)      lan             wan                  198.18.7.2:3478/3479
    10.7.0.2/24 ------------ 10.7.0.1/24     198.18.7.1/24 ------- 198.18.7.2/24, 198.18.7.3/24
                             masquerade LAN sources only;          sends to the mapped port
                             DNAT rules in miniupnpd's chains

miniupnpd refuses to map on a WAN address it considers reserved (198.18.0.0/15 is) unless its
STUN check (four Binding Requests with CHANGE-REQUEST: none, port, IP, both) shows an
unfiltered, endpoint-independent mapping, so the internet namespace runs an RFC 5780 responder
and the router masquerades LAN sources only (masquerading its own probes would re-port them).

Each protocol is forced in turn. The test checks that the mapping is made, that the external
endpoint reported is the one an outside host reaches our socket through, that it outlives its
lifetime (renewed, still to our internal port), that a router restart (miniupnpd restarted with
an empty table) is noticed and the mapping re-made, and that a clean shutdown deletes it.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from . import miniupnpd
from .lab import Lab, _wait_for
from .natlab import _veth

pytestmark = pytest.mark.netns

CLIENT_IP, ROUTER_LAN, ROUTER_WAN = "10.7.0.2", "10.7.0.1", "198.18.7.1"
STUN_IP, STUN_ALT_IP = "198.18.7.2", "198.18.7.3"
PORT = 41641
OURS = f"dnat ip to {CLIENT_IP}:{PORT}"  # how `nft list` shows a mapping to our socket
LIFETIME = 8  # seconds: renewal at 4 s, so the test sees several

ROUTER_NFT = """
table inet filter {
  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority -100; policy accept;
                     jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority 100; policy accept;
                      ip saddr 10.7.0.0/24 oifname "wan" masquerade;
                      jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
"""



class Router:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.c, self.gw, self.inet = lab.add_ns("c"), lab.add_ns("gw"), lab.add_ns("inet")
        _veth(lab, self.c, "lan", f"{CLIENT_IP}/24", self.gw, "lan", f"{ROUTER_LAN}/24")
        _veth(lab, self.gw, "wan", f"{ROUTER_WAN}/24", self.inet, "wan", f"{STUN_IP}/24")
        lab.run(None, "ip", "-n", self.inet, "addr", "add", f"{STUN_ALT_IP}/24", "dev", "wan")
        lab.run(None, "ip", "-n", self.c, "route", "add", "default", "via", ROUTER_LAN)
        lab.run(self.gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.run(self.gw, "nft", ROUTER_NFT)
        lab.spawn(self.inet, sys.executable, "-m", "tests.integration.stun5780", STUN_IP,
                  STUN_ALT_IP, tag="stun5780")  # fmt: skip
        text = miniupnpd.conf(stun_ip=STUN_IP, lan="10.7.0.0/24", min_lifetime=LIFETIME // 2,
                              uuid="3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b")  # fmt: skip
        self.upnpd = miniupnpd.Miniupnpd(lab, self.gw, text)
        self.start = self.upnpd.start
        self.restart_empty = self.upnpd.restart_empty

    def dnat_rules(self) -> str:
        out = self.lab.run(self.gw, "nft", "list", "chain", "inet", "filter",
                           "prerouting_miniupnpd").stdout  # fmt: skip
        return "\n".join(line for line in out.splitlines() if "dnat" in line)

    def send_from_internet(self, external: str, payload: str) -> None:
        host, port = external.rsplit(":", 1)
        code = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.sendto({payload.encode()!r}, ({host!r}, {int(port)}))"
        )
        self.lab.run(self.inet, sys.executable, "-c", code)


class Client:
    def __init__(self, lab: Lab, ns: str, protocol: str) -> None:
        self.proc = lab.spawn(
            ns, sys.executable, "-m", "tests.integration.portmap_client", "--port", str(PORT),
            "--protocol", protocol, "--lifetime", str(LIFETIME), "--check", "1",
            "--backoff", "1", tag=f"portmap-{protocol}",
        )  # fmt: skip

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.proc.stdout_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float, after: int = 0
                 ) -> dict[str, Any]:  # fmt: skip
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [x for x in self.lines()[after:] if pred(x)]
            return bool(found) or not self.proc.alive()

        _wait_for(seen, timeout)
        assert found, f"not seen within {timeout}s; client said:\n{self.proc.describe()}"
        return found[0]

    def reached(self, router: Router, external: str, payload: str) -> None:
        """An outside host's datagram to `external` arrives on our socket (sent until it does)."""

        def arrived() -> bool:
            return any(x.get("recv") == payload for x in self.lines())

        for _ in range(20):
            router.send_from_internet(external, payload)
            if _wait_for(arrived, 0.5):
                return
        pytest.fail(f"{payload!r} to {external} never reached the client:\n{self.proc.describe()}")


@pytest.mark.parametrize("protocol", ["upnp", "pmp", "pcp"])
def test_mapping_lifecycle_against_miniupnpd(lab: Lab, protocol: str) -> None:
    router = Router(lab)
    router.start()
    client = Client(lab, router.c, protocol)

    probe = client.wait_for(lambda x: x.get("event") == "probe", 15.0)
    assert protocol in probe["available"], probe
    mapped = client.wait_for(lambda x: x.get("event") == "mapped", 15.0)
    assert mapped["protocol"] == protocol
    external = mapped["external"]
    assert external.startswith(f"{ROUTER_WAN}:"), mapped
    assert OURS in router.dnat_rules(), router.dnat_rules()
    client.reached(router, external, "hello-1")

    # Outlive two lifetimes: renewals must keep the mapping, and keep it on OUR port.
    time.sleep(2 * LIFETIME + 1)
    rules = router.dnat_rules()
    assert OURS in rules, f"mapping gone, or not to our port, after renewals:\n{rules}"
    assert not [x for x in client.lines() if x.get("event") == "lost"], client.lines()
    client.reached(router, external, "hello-2")

    # The router reboots with an empty table: the client notices and maps again.
    before = len(client.lines())
    router.restart_empty()
    lost = client.wait_for(lambda x: x.get("event") == "lost", 20.0, after=before)
    assert lost["protocol"] == protocol
    again = client.wait_for(lambda x: x.get("event") == "mapped", 20.0, after=before)
    assert OURS in router.dnat_rules()
    client.reached(router, again["external"], "hello-3")

    # A clean shutdown deletes the mapping on the router.
    client.proc.stop(timeout=10.0)
    closed = client.wait_for(lambda x: x.get("event") == "closed", 1.0)
    assert closed["mapping"] is None
    assert _wait_for(lambda: not router.dnat_rules(), 5.0), router.dnat_rules()


def test_stun5780_answers_from_the_requested_address() -> None:
    from .stun5780 import answer

    req = bytes.fromhex("000100082112a442") + b"T" * 12 + bytes.fromhex("0003000400000006")
    resp, flags = answer(req, ("198.18.7.1", 4000), (STUN_ALT_IP, 3479))
    assert flags == 6
    assert resp[:2] == b"\x01\x01"
    assert resp[8:20] == b"T" * 12
    assert socket.inet_aton("198.18.7.1") in resp
