"""Access control end to end: a coordinator with a policy, four nodes, real TCP and UDP sockets.

    alice's laptop (user alice, in group:dev)     bob's laptop (user bob)
    web (tag:web)                                 db (tag:db)

    group:dev   -> tag:web:80,443
    tag:web     -> tag:db:5432
    autogroup:member -> autogroup:self:*     (each user reaches their own devices)

Every allowed pair connects over TCP and UDP (a server in the destination's namespace answers);
every other pair times out; replies to allowed flows pass; each node's netmap holds exactly the
peers it may exchange traffic with. A live `policy set` without the web -> db rule cuts new
packets of that flow within a second, and db leaves web's peers.
"""

from __future__ import annotations

import sys
import time

import pytest

from .lab import Lab, Proc, _wait_for
from .test_coordinator_agents import Site, _site

pytestmark = pytest.mark.netns

POLICY = """{
  // who is who
  "groups": {"group:dev": ["alice@"]},
  "tagOwners": {"tag:web": ["alice@"], "tag:db": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
  "tests": [
    {"src": "alice@", "accept": ["tag:web:80", "tag:web:443"], "deny": ["tag:db:5432"]},
    {"src": "bob@", "deny": ["tag:web:80"]},
  ],
}
"""

# One server per (node, protocol, port): echoes what it receives, so a client sees its reply.
SERVER = """
import socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
if proto == "tcp":
    s.listen()
    while True:
        c, _ = s.accept()
        with c:
            c.sendall(c.recv(100))
else:
    while True:
        data, addr = s.recvfrom(100)
        s.sendto(data, addr)
"""

CLIENT = """
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
with socket.socket(socket.AF_INET, kind) as s:
    s.settimeout(float(sys.argv[4]))
    try:
        if proto == "tcp":
            s.connect((host, port)); s.sendall(b"hi"); ok = s.recv(10) == b"hi"
        else:
            ok = False
            for _ in range(3):  # the first datagram may wait for the handshake
                s.sendto(b"hi", (host, port))
                try:
                    ok = s.recvfrom(10)[0] == b"hi"
                    break
                except TimeoutError:
                    pass
    except OSError:
        ok = False
print("ok" if ok else "no")
"""

PORTS = (80, 443, 5432, 22)


def _connects(site: Site, ns: str, proto: str, host: str, port: int, wait: float = 2.0) -> bool:
    res = site.lab.run(
        ns, sys.executable, "-c", CLIENT, proto, host, str(port), str(wait), timeout=wait * 4 + 5
    )
    return res.stdout.strip() == "ok"


def _servers(site: Site, ns: str) -> list[Proc]:
    return [
        site.lab.spawn(ns, sys.executable, "-c", SERVER, proto, str(port), tag=f"srv-{proto}")
        for proto in ("tcp", "udp")
        for port in PORTS
    ]


def test_four_nodes_reach_exactly_what_the_policy_allows(lab: Lab) -> None:
    site = _site(lab)
    policy = lab.path("policy.hujson")
    policy.write_text(POLICY)
    site.cli("policy", "set", str(policy))
    keys = {
        "alice": site.cli("keys", "create", "--user", "alice").strip(),
        "bob": site.cli("keys", "create", "--user", "bob").strip(),
        "web": site.cli("keys", "create", "--user", "alice", "--tags", "tag:web").strip(),
        "db": site.cli("keys", "create", "--user", "alice", "--tags", "tag:db").strip(),
    }
    agents = {}
    for i, name in enumerate(("alice", "bob", "web", "db"), start=1):
        site.auth_key = keys[name]
        agents[name] = site.agent(name, i, f"100.64.0.{i}/10")
        agents[name].start(timeout=30)
    addr = {name: f"100.64.0.{i}" for i, name in enumerate(agents, start=1)}
    for name in ("web", "db", "alice"):
        _servers(site, agents[name].ns)

    def peers(name: str) -> set[str]:
        return {p["name"] for p in agents[name].status()["peers"]}

    expected_peers = {"alice": {"web"}, "bob": set(), "web": {"alice", "db"}, "db": {"web"}}
    assert _wait_for(
        lambda: all(peers(n) == want for n, want in expected_peers.items()), 15, interval=0.3
    ), {n: peers(n) for n in agents}
    web_status = {p["name"]: p for p in agents["web"].status()["peers"]}
    assert web_status["alice"]["user"] == "alice"
    assert web_status["db"]["tags"] == ["tag:db"]

    allowed = {("alice", "web", 80), ("alice", "web", 443), ("web", "db", 5432)}
    for src, dst, port in sorted(allowed):
        for proto in ("tcp", "udp"):
            assert _connects(site, agents[src].ns, proto, addr[dst], port, wait=5), (
                f"{src} -> {dst}:{port}/{proto} should connect"
            )
    dp = agents["web"].status()["dataplane"]
    if dp["impl"] == "native":  # the filter's cached decisions pass packets in the lanes
        assert dp["lane_rx_packets"] > 0, dp
    denied = [
        ("alice", "web", 22),
        ("alice", "db", 5432),
        ("bob", "web", 80),
        ("db", "web", 80),
        ("web", "alice", 80),
    ]
    for src, dst, port in denied:
        for proto in ("tcp", "udp"):
            assert not _connects(site, agents[src].ns, proto, addr[dst], port, wait=1.5), (
                f"{src} -> {dst}:{port}/{proto} should time out"
            )
    denied_count = agents["web"].status()["drops"].get("filter_denied", 0)
    assert denied_count > 0

    # A live policy change: without web -> db, new packets of that flow stop within a second.
    web_to_db = '{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},'
    policy.write_text(POLICY.replace(web_to_db, ""))
    site.cli("policy", "set", str(policy))
    changed = time.monotonic()
    assert _wait_for(
        lambda: not _connects(site, agents["web"].ns, "udp", addr["db"], 5432, wait=0.3),
        5,
        interval=0.05,
    )
    cut = time.monotonic() - changed
    assert cut < 2.5, cut  # includes the last attempt's own timeouts (3 x 0.3 s)
    assert _wait_for(lambda: "db" not in peers("web"), 5, interval=0.2)
    print(f"web -> db cut {cut:.2f} s after policy set")
