"""Debian's miniupnpd as a lab router's port-mapping daemon (UPnP IGD, NAT-PMP and PCP).

What it needs in a lab (tests/integration/PORTMAP_LAB.md): an RFC 5780 STUN responder
(`stun5780.py`) at `stun_ip`, because it refuses a reserved WAN address (198.18.0.0/15) without
a passing STUN check; the `inet filter` table with its chains, made by the test (the package's
nft_init.sh needs a helper file it does not ship); and no lease file, so a restart comes back
with an empty table.
"""

from __future__ import annotations

from .lab import Lab, Proc, _wait_for

CHAINS = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")


def conf(*, stun_ip: str, lan: str, min_lifetime: int, uuid: str) -> str:
    """A config mapping ports 1024-65535 for hosts in `lan` (a CIDR), nothing else."""
    return f"""\
ext_ifname=wan
listening_ip=lan
http_port=5000
enable_upnp=yes
enable_natpmp=yes
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
        started = _wait_for(lambda: "Listening for NAT-PMP/PCP" in self.log(), timeout, 0.1)
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
