"""Access-control attacks with real agents: an untagged node after tag:web's access.

    web (tag:web, 100.64.0.1) ──5432──► db (tag:db, 100.64.0.2) ◄──22── mallory (100.64.0.3)

mallory joins with an untagged auth key of her own and the host name "web". The coordinator
names her web-1 and keeps her user mallory, without tags; db's netmap opens port 22 to her and
nothing more. From her namespace, TCP and UDP to db:5432 time out while port 22 connects (web
reaches 5432). Then she writes raw packets into her tunnel with web's overlay address as the
source: db's WireGuard drops them (`disallowed_source`: outside her allowed IPs) and db's UDP
server on 5432 never sees them, while web's own datagram arrives. (The other claims, tags in the
registration, web's auth key or node key, are tests/attacks/test_policy_attacks.py.)
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from .lab import Lab, _wait_for
from .test_access_policy import SERVER, _connects
from .test_coordinator_agents import _site

pytestmark = pytest.mark.netns

POLICY = """{
  "tagOwners": {"tag:web": ["alice@"], "tag:db": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["mallory@"], "dst": ["tag:db:22"]},
  ],
  "tests": [{"src": "mallory@", "accept": ["tag:db:22"], "deny": ["tag:db:5432"]}],
}
"""

# db's UDP 5432: notes every datagram's source address and text, answers nothing.
RECORDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
with open(sys.argv[2], "ab", buffering=0) as f:
    while True:
        data, addr = s.recvfrom(2000)
        f.write(addr[0].encode() + b" " + data + b"\\n")
"""

# A UDP datagram with any source address, written whole (IP header included) into the routing
# table, so the tunnel carries it as it is.
SPOOF = """
import socket, struct, sys
src, dst, port, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
udp = struct.pack("!HHHH", 40000, port, 8 + len(text), 0) + text
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
    for _ in range(5):
        s.sendto(ip + udp, (dst, 0))
"""

SEND = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(5):
        s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""


def test_an_untagged_node_named_web_gets_nothing_of_tag_web(lab: Lab) -> None:
    site = _site(lab)
    keys = {
        "web": site.cli("keys", "create", "--user", "alice", "--tags", "tag:web").strip(),
        "db": site.cli("keys", "create", "--user", "alice", "--tags", "tag:db").strip(),
        "mallory": site.cli("keys", "create", "--user", "mallory").strip(),
    }
    policy = lab.path("policy.hujson")
    policy.write_text(POLICY)
    site.cli("policy", "set", str(policy))
    agents = {}
    for i, name in enumerate(("web", "db", "mallory"), start=1):
        site.auth_key = keys[name]
        agents[name] = site.agent(name, i, f"100.64.0.{i}/10")
    mallory = agents["mallory"]
    mallory.control_toml = mallory.control_toml.replace('hostname = "mallory"', 'hostname = "web"')
    for agent in agents.values():
        agent.start(timeout=30)
    web_ip, db_ip, mallory_ip = "100.64.0.1", "100.64.0.2", "100.64.0.3"

    nodes = {n["id"]: n for n in json.loads(site.cli("nodes", "--json"))}
    assert sorted((n["name"], n["user"], n["tags"]) for n in nodes.values()) == [
        ("db", None, ["tag:db"]), ("web", None, ["tag:web"]), ("web-1", "mallory", []),
    ]  # fmt: skip

    def peers(name: str) -> set[str]:
        return {p["name"] for p in agents[name].status()["peers"]}

    expected = {"web": {"db"}, "db": {"web", "web-1"}, "mallory": {"db"}}
    assert _wait_for(lambda: all(peers(n) == p for n, p in expected.items()), 15, interval=0.3), {
        n: peers(n) for n in agents
    }

    db = agents["db"].ns
    received = lab.path("db-5432.log")
    lab.spawn(db, sys.executable, "-c", RECORDER, "5432", str(received), tag="recorder")
    for port in ("5432", "22"):
        lab.spawn(db, sys.executable, "-c", SERVER, "tcp", port, tag=f"srv-tcp-{port}")
    time.sleep(0.5)

    assert _connects(site, agents["web"].ns, "tcp", db_ip, 5432, wait=5)
    assert _connects(site, mallory.ns, "tcp", db_ip, 22, wait=5)
    for proto in ("tcp", "udp"):
        assert not _connects(site, mallory.ns, proto, db_ip, 5432, wait=1.5), proto
    denied = agents["db"].status()["drops"].get("filter_denied", 0)
    assert denied > 0

    lab.run(agents["web"].ns, sys.executable, "-c", SEND, db_ip, "5432", "from-web")
    lab.run(mallory.ns, sys.executable, "-c", SPOOF, web_ip, db_ip, "5432", "spoofed")
    lab.run(mallory.ns, sys.executable, "-c", SEND, db_ip, "5432", "from-mallory")

    def log() -> str:
        return received.read_text() if received.exists() else ""

    assert _wait_for(lambda: f"{web_ip} from-web" in log(), 10, interval=0.1), log()
    assert _wait_for(
        lambda: agents["db"].status()["drops"].get("disallowed_source", 0) >= 1, 10, interval=0.2
    ), agents["db"].status()["drops"]
    time.sleep(1.0)  # time for anything else still on its way
    assert "spoofed" not in log()
    assert "from-mallory" not in log()  # her own address: the policy gives her no 5432
    assert mallory_ip not in log()
