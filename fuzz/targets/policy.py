"""Access policies: the HuJSON parser, the policy checker and the per-node compiler
(agent/policy: parse_policy, check_policy, CompiledPolicy).

Contract: PolicyError and nothing else for any text. Invariants: a policy that parses compiles
for a fixed set of nodes without raising; every node's filter rules name only that node's
addresses as destinations; the peer map is symmetric.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from agent.policy.checks import check_policy
from agent.policy.compile import CompiledPolicy
from agent.policy.errors import PolicyError
from agent.policy.rules import Node
from fuzz.common import Seed, check, tag

NODES = (
    Node(1, "alice-laptop", "alice", frozenset(), (ip_address("100.64.0.1"),)),
    Node(2, "bob-laptop", "bob", frozenset(), (ip_address("100.64.0.2"),)),
    Node(3, "web", None, frozenset({"tag:web"}), (ip_address("100.64.0.3"),)),
    Node(4, "db", None, frozenset({"tag:db"}), (ip_address("100.64.0.4"),)),
)
SEED = b"""{
  // comments and trailing commas are HuJSON
  "groups": {"group:dev": ["alice@"]},
  "tagOwners": {"tag:web": ["group:dev"], "tag:db": ["alice@"]},
  "hosts": {"nas": "100.64.0.9/32"},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"], "proto": "tcp"},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
    {"action": "accept", "src": ["*"], "dst": ["nas:1000-2000", "100.64.0.0/10:22"]},
  ],
  "tests": [{"src": "alice@", "accept": ["tag:web:443"], "deny": ["tag:db:5432"]}],
}"""


class Harness:
    name = "policy"
    contract = "PolicyError"
    dictionary = (b'"acls"', b'"groups"', b'"tagOwners"', b'"hosts"', b'"tests"', b'"src"',
                  b'"dst"', b'"proto"', b'"accept"', b'"deny"', b'"action"', b"group:dev",
                  b"tag:web", b"autogroup:self", b"autogroup:member", b"alice@", b":*",
                  b"/*", b"*/", b"//", b",]", b",}", b"100.64.0.0/10", b"[fd7a::1]:80",
                  b"\\u00")  # fmt: skip

    def run(self, data: bytes) -> str:
        try:
            policy = check_policy(data, nodes=NODES)
        except PolicyError as exc:
            return tag(exc)
        compiled = CompiledPolicy(policy, NODES)
        peers = compiled.peer_map()
        for node in NODES:
            own = {ip_network(a) for a in node.addresses}
            for rule in compiled.filter_for(node.id):
                for dst in rule.destinations:
                    check(any(dst.network.overlaps(n) for n in own), "rule for another node")
            for other in peers.get(node.id, ()):
                check(node.id in peers.get(other, ()), "peer map not symmetric")
        return f"ok:{len(policy.acls)}"

    def seeds(self) -> list[bytes]:
        return [SEED, b"{}", b'{"acls": []}', Seed().raw(SEED[:120]).build()]
