# ruff: noqa: E501  (tables of one case per line read better unwrapped)
"""Compiling the issue's four-node example, autogroup:self, tags replacing users, no policy,
the policy `tests`, and the netmap codec for filter rules."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from agent.policy.checks import check_policy, run_tests
from agent.policy.compile import CompiledPolicy, compile_filter, peer_map
from agent.policy.errors import PolicyError
from agent.policy.filter import FilterDrop, PacketFilter, PeerSources
from agent.policy.model import parse_policy
from agent.policy.rules import FilterRule, Node, rules_from_json, rules_to_json
from tests.policy import packets as pk


def node(id_: int, name: str, user: str | None, tags: set[str], v4: str, v6: str) -> Node:
    return Node(id_, name, user, frozenset(tags), (ip_address(v4), ip_address(v6)))


ALICE = node(1, "alice-laptop", "alice", set(), "100.64.0.1", "fd7a::1")
BOB = node(2, "bob-laptop", "bob", set(), "100.64.0.2", "fd7a::2")
WEB = node(3, "web", "alice", {"tag:web"}, "100.64.0.3", "fd7a::3")  # alice made it; tags win
DB = node(4, "db", None, {"tag:db"}, "100.64.0.4", "fd7a::4")
NODES = (ALICE, BOB, WEB, DB)

POLICY = """{
  // the example of the access-control issue
  "groups": {"group:dev": ["alice@", "bob@"]},
  "tagOwners": {"tag:web": ["group:dev"], "tag:db": ["tag:web"]},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:80,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
  "tests": [
    {"src": "alice@", "accept": ["tag:web:80", "tag:web:443", "alice@:22"],
     "deny": ["tag:web:22", "tag:db:5432", "bob@:22"]},
    {"src": "tag:web", "accept": ["tag:db:5432"], "deny": ["alice@:22", "tag:db:22"]},
    {"src": "100.64.0.3", "proto": "udp", "accept": ["100.64.0.4:5432"]},
  ],
}"""


def reaches(compiled: CompiledPolicy, src: Node, dst: Node, protocol: int, port: int) -> bool:
    """Through the real filter of `dst`, with packets from `src`'s first address."""
    flt = PacketFilter(compiled.filter_for(dst.id), dst.addresses)
    peer = PeerSources(ip_network(a) for a in src.addresses)
    s, d = str(src.addresses[0]), str(dst.addresses[0])
    packet = pk.tcp(s, 40000, d, port) if protocol == pk.TCP else pk.udp(s, 40000, d, port)
    return flt.check_inbound(packet, peer) is None


def test_four_node_example_filters_and_peers() -> None:
    compiled = CompiledPolicy(check_policy(POLICY, nodes=NODES), NODES)
    allowed = {
        (ALICE, WEB, 80), (ALICE, WEB, 443), (BOB, WEB, 80), (BOB, WEB, 443), (WEB, DB, 5432),
    }  # fmt: skip
    for src in NODES:
        for dst in NODES:
            for port in (22, 80, 443, 5432):
                for proto in (pk.TCP, pk.UDP):
                    own_device = src is dst and not src.tagged  # each user reaches their own
                    expected = (src, dst, port) in allowed or own_device
                    assert reaches(compiled, src, dst, proto, port) is expected, (
                        src.name,
                        dst.name,
                        port,
                    )
                    assert compiled.allows(src, dst, proto, port) is expected
    assert compiled.peer_map() == {1: {3}, 2: {3}, 3: {1, 2, 4}, 4: {3}}
    assert peer_map(compiled.policy, NODES) == compiled.peer_map()


def test_autogroup_self_reaches_the_users_other_devices_only() -> None:
    phone = node(5, "alice-phone", "alice", set(), "100.64.0.5", "fd7a::5")
    nodes = (*NODES, phone)
    compiled = CompiledPolicy(parse_policy(POLICY), nodes)
    assert compiled.peers_of(phone.id) == {ALICE.id, WEB.id}
    (web_rule, self_rule) = (None, *compiled.filter_for(phone.id))
    assert web_rule is None
    assert set(self_rule.sources) == {ip_network(a) for a in (*ALICE.addresses, *phone.addresses)}
    assert reaches(compiled, ALICE, phone, pk.TCP, 5000)
    assert reaches(compiled, phone, ALICE, pk.UDP, 5000)
    assert not reaches(compiled, BOB, phone, pk.TCP, 5000)
    assert not reaches(compiled, WEB, phone, pk.TCP, 5000)  # alice's, but tagged


def test_tags_replace_the_user() -> None:
    policy = parse_policy(
        '{"tagOwners": {"tag:web": []},'
        ' "acls": [{"action": "accept", "src": ["alice@"], "dst": ["alice@:*"]}]}'
    )
    compiled = CompiledPolicy(policy, NODES)
    assert compiled.filter_for(WEB.id) == ()  # WEB was created by alice but is tagged
    assert compiled.peers_of(WEB.id) == frozenset()
    assert compiled.filter_for(ALICE.id)[0].sources == tuple(ip_network(a) for a in ALICE.addresses)


def test_ips_cidrs_and_hosts_as_sources_and_destinations() -> None:
    policy = parse_policy("""{
      "hosts": {"office": "192.0.2.0/24", "db": "100.64.0.4"},
      "acls": [
        {"action": "accept", "src": ["office", "100.64.0.1"], "dst": ["db:5432", "100.64.0.0/30:22"]},
        {"action": "accept", "src": ["*"], "dst": ["[fd7a::2]:8080"], "proto": "tcp"},
      ]}""")
    compiled = CompiledPolicy(policy, NODES)
    (db_rule,) = compiled.filter_for(DB.id)
    assert db_rule.sources == (ip_network("100.64.0.1/32"), ip_network("192.0.2.0/24"))
    assert [str(d.network) for d in db_rule.destinations] == ["100.64.0.4/32"]
    (bob_rule, bob_web) = compiled.filter_for(BOB.id)
    assert [(str(d.network), d.ports.first) for d in bob_rule.destinations] == [
        ("100.64.0.2/32", 22)
    ]
    assert bob_web.sources == (ip_network("0.0.0.0/0"), ip_network("::/0"))
    assert [str(d.network) for d in bob_web.destinations] == ["fd7a::2/128"]
    assert bob_web.protocols == {pk.TCP}
    assert compiled.peers_of(DB.id) == {ALICE.id, BOB.id}  # DB may send to BOB:8080
    assert compiled.peers_of(BOB.id) == {ALICE.id, WEB.id, DB.id}  # "*" is everyone


def test_no_policy_allows_everything() -> None:
    compiled = CompiledPolicy(None, NODES)
    assert compiled.peer_map() == {n.id: {m.id for m in NODES} - {n.id} for n in NODES}
    assert reaches(compiled, DB, ALICE, pk.TCP, 1)
    (rule,) = compile_filter(None, ALICE, NODES)
    assert rule.protocols == frozenset()
    flt = PacketFilter((rule,), ALICE.addresses)
    gre = pk.ip("100.64.0.4", "100.64.0.1", pk.GRE, b"\x00" * 8)
    assert flt.check_inbound(gre, PeerSources([ip_network("100.64.0.4/32")])) is None


def test_empty_policy_denies_everything() -> None:
    compiled = CompiledPolicy(parse_policy("{}"), NODES)
    assert compiled.peer_map() == {n.id: frozenset() for n in NODES}
    assert not reaches(compiled, ALICE, BOB, pk.TCP, 22)


def test_wildcard_destination_with_proto() -> None:
    policy = parse_policy(
        '{"acls": [{"action": "accept", "src": ["autogroup:tagged"], "dst": ["*:*"], "proto": "icmp"}]}'
    )
    compiled = CompiledPolicy(policy, NODES)
    flt = PacketFilter(compiled.filter_for(ALICE.id), ALICE.addresses)
    from_db = PeerSources(ip_network(a) for a in DB.addresses)
    assert flt.check_inbound(pk.echo_request("100.64.0.4", "100.64.0.1"), from_db) is None
    assert (
        flt.check_inbound(pk.tcp("100.64.0.4", 1, "100.64.0.1", 22), from_db) is FilterDrop.DENIED
    )
    assert compiled.peers_of(DB.id) == {ALICE.id, BOB.id, WEB.id}


def test_policy_tests_report_failures() -> None:
    policy = parse_policy(POLICY.replace('"tag:web:80,443"', '"tag:web:80"'))
    failures = run_tests(policy, NODES)
    assert [str(f) for f in failures] == ["tests[0].accept[1]: alice@ should reach tag:web:443"]
    with pytest.raises(PolicyError, match=r"1 policy test\(s\) failed:\ntests\[0\]\.accept\[1\]"):
        check_policy(POLICY.replace('"tag:web:80,443"', '"tag:web:80"'), nodes=NODES)


def test_policy_tests_deny_and_protocols() -> None:
    text = """{"tagOwners": {"tag:dns": []},
      "acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:dns:53"], "proto": "udp"}],
      "tests": [
        {"src": "alice@", "proto": "udp", "accept": ["tag:dns:53"]},
        {"src": "alice@", "accept": ["tag:dns:53"]},
        {"src": "alice@", "proto": "icmp", "deny": ["tag:dns:*"]},
        {"src": "bob@", "proto": "udp", "deny": ["tag:dns:53"]},
        {"src": "alice@", "proto": "udp", "deny": ["tag:dns:53"]},
      ]}"""
    failures = [f.path for f in run_tests(parse_policy(text))]
    assert failures == ["tests[1].accept[0]", "tests[4].deny[0]"]  # default proto is tcp


def test_test_sources_by_ip_take_the_identity_of_the_node() -> None:
    text = POLICY.replace('"accept": ["100.64.0.4:5432"]', '"deny": ["100.64.0.4:5432"]')
    assert [f.path for f in run_tests(parse_policy(text), NODES)] == ["tests[2].deny[0]"]
    # without nodes the address has no identity, so no identity rule lets it through
    assert [f.path for f in run_tests(parse_policy(text))] == []


def test_filter_rules_round_trip_through_the_netmap_codec() -> None:
    compiled = CompiledPolicy(parse_policy(POLICY), NODES)
    for n in NODES:
        rules = compiled.filter_for(n.id)
        assert rules_from_json(rules_to_json(rules)) == rules
    doc = rules_to_json(compiled.filter_for(DB.id))
    assert doc[0]["SrcIPs"] == ["100.64.0.3/32", "fd7a::3/128"]
    assert doc[0]["DstPorts"][0] == {"IP": "100.64.0.4/32", "Ports": {"First": 5432, "Last": 5432}}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "filter: expected a list"),
        ([{"SrcIPs": []}], r"filter\[0\]: expected an object with SrcIPs"),
        (
            [{"SrcIPs": ["x"], "DstPorts": [], "IPProto": []}],
            r"filter\[0\]\.SrcIPs\[0\]: bad prefix",
        ),
        (
            [
                {
                    "SrcIPs": [],
                    "DstPorts": [{"IP": "1.2.3.4", "Ports": {"First": 9, "Last": 1}}],
                    "IPProto": [],
                }
            ],
            "bad port range",
        ),
        ([{"SrcIPs": [], "DstPorts": [], "IPProto": [300]}], "IPProto must be numbers"),
        ([{"SrcIPs": [], "DstPorts": [], "IPProto": [True]}], "IPProto must be numbers"),
    ],
)
def test_rules_from_json_is_strict(doc: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        rules_from_json(doc)


def test_filter_rule_from_json_accepts_bare_addresses() -> None:
    (rule,) = rules_from_json([{"SrcIPs": ["100.64.0.1"], "DstPorts": [], "IPProto": [6]}])
    assert rule == FilterRule((ip_network("100.64.0.1/32"),), (), frozenset({6}))
