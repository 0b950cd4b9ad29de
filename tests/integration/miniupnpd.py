"""Debian's miniupnpd as a lab router's port-mapping daemon (UPnP IGD, NAT-PMP and PCP).

What it needs in a lab (tests/integration/PORTMAP_LAB.md): an RFC 5780 STUN responder
(`stun5780.py`) at `stun_ip`, because it refuses a reserved WAN address (198.18.0.0/15) without
a passing STUN check; the `inet filter` table with its chains, made by the test (the package's
nft_init.sh needs a helper file it does not ship); and no lease file, so a restart comes back
with an empty table.

`UpnpRouter` puts it into the NAT lab (natlab.py): a's router becomes a symmetric NAT running
miniupnpd, offering UPnP IGD, NAT-PMP and PCP or only one of them (test_portmap_nat.py, and the
port-mapping cells of bench/nat_traversal.py).
"""

from __future__ import annotations

import sys

from .lab import Lab, Proc, _wait_for
from .natlab import NatNet

CHAINS = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")


def conf(
    *, stun_ip: str, lan: str, min_lifetime: int, uuid: str, upnp: bool = True, natpmp: bool = True
) -> str:
    """A config mapping ports 1024-65535 for hosts in `lan` (a CIDR), nothing else; `upnp`
    and `natpmp` (one switch for NAT-PMP and PCP) turn the protocols on."""
    return f"""\
ext_ifname=wan
listening_ip=lan
http_port=5000
enable_upnp={"yes" if upnp else "no"}
enable_natpmp={"yes" if natpmp else "no"}
ext_perform_stun=yes
ext_stun_host={stun_ip}
ext_stun_port=3478
secure_mode=yes
system_uptime=no
min_lifetime={min_lifetime}
max_lifetime=86400
clean_ruleset_interval=2
uuid={uuid}
allow 1024-65535 {lan} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


class Miniupnpd:
    """One daemon in namespace `ns` with config text `text`; `start()` waits until it serves."""

    def __init__(self, lab: Lab, ns: str, text: str, name: str = "miniupnpd") -> None:
        self.lab, self.ns, self.name = lab, ns, name
        self.conf = lab.path(f"{name}.conf")
        self.conf.write_text(text)
        self.daemon: Proc | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.daemon = self.lab.spawn(
            self.ns, "miniupnpd", "-d", "-f", str(self.conf),
            "-P", str(self.lab.path(f"{self.name}.pid")), tag=self.name,
        )  # fmt: skip
        upnp_only = "enable_natpmp=no" in self.conf.read_text()
        ready = "HTTP listening" if upnp_only else "Listening for NAT-PMP/PCP"
        started = _wait_for(lambda: ready in self.log(), timeout, 0.1)
        assert started, f"miniupnpd did not start:\n{self.log()[-3000:]}"

    def log(self) -> str:
        d = self.daemon
        return "" if d is None else d.stderr_text() + d.stdout_text()

    def restart_empty(self) -> None:
        """A router reboot: the daemon goes, its table with it, and it comes back empty."""
        assert self.daemon is not None
        self.daemon.stop()
        for chain in CHAINS:
            self.lab.run(self.ns, "nft", "flush", "chain", "inet", "filter", chain)
        self.start()


# -- a's router in the NAT lab -------------------------------------------------------------------

STUN_IP, STUN_ALT_IP = "198.18.0.20", "198.18.0.21"  # the RFC 5780 responder its check needs

ROUTER_NFT = f"""
table inet filter {{
  chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}
  chain miniupnpd {{ }}
  chain prerouting {{ type nat hook prerouting priority -100; policy accept;
                     jump prerouting_miniupnpd; }}
  chain postrouting {{ type nat hook postrouting priority 100; policy accept;
                      jump postrouting_miniupnpd;
                      ip saddr 10.0.1.0/24 oifname "wan" masquerade fully-random; }}
  chain prerouting_miniupnpd {{ }}
  chain postrouting_miniupnpd {{ }}
  chain input {{ type filter hook input priority 0; policy accept;
                iifname "wan" ct state new ip saddr != {{ {STUN_IP}, {STUN_ALT_IP} }} drop; }}
}}
"""

# miniupnpd has one switch for NAT-PMP and PCP (both on UDP 5351); the router drops the other
# one's requests by their first byte, the version (NAT-PMP 0, PCP 2), to offer only one of them.
ONLY_ONE = 'add rule inet filter input iifname "lan" udp dport 5351 @th,64,8 {} drop'


class UpnpRouter:
    """miniupnpd in a's NAT router of `net`, replacing natlab's plain masquerade (a symmetric
    NAT for a's LAN); `only` offers one protocol ("upnp", "pmp" or "pcp"; None: all three)."""

    def __init__(self, net: NatNet, only: str | None = None) -> None:
        self.lab, self.ns = net.lab, net.ns_na
        self.lab.run(self.ns, "nft", "delete", "table", "ip", "agtnat")
        self.lab.run(self.ns, "nft", ROUTER_NFT)
        if only in ("pmp", "pcp"):
            self.lab.run(self.ns, "nft", ONLY_ONE.format(2 if only == "pmp" else 0))
        for ip in (STUN_IP, STUN_ALT_IP):
            self.lab.run(None, "ip", "-n", net.ns_r, "addr", "add", f"{ip}/32", "dev", "lo")
        self.lab.spawn(net.ns_r, sys.executable, "-m", "tests.integration.stun5780", STUN_IP,
                       STUN_ALT_IP, tag="stun5780")  # fmt: skip
        text = conf(stun_ip=STUN_IP, lan="10.0.1.0/24", min_lifetime=120,
                    uuid="3d3cec3a-8cf0-11e0-98ee-001a6bd2d07c",
                    upnp=only in (None, "upnp"), natpmp=only != "upnp")  # fmt: skip
        self.upnpd = Miniupnpd(self.lab, self.ns, text, name="miniupnpd-na")
        self.upnpd.start()
        self.restart_empty = self.upnpd.restart_empty
