# ruff: noqa: E501  (tables of one case per line read better unwrapped)
"""Policy syntax: every target, port and protocol form, and the errors for each misuse."""

from __future__ import annotations

import json
from ipaddress import ip_network

import pytest

from agent.policy.aliases import (
    AutoGroup,
    AutoGroupKind,
    Group,
    Host,
    Prefix,
    Tag,
    User,
    Wildcard,
    parse_ports,
    parse_protocol,
)
from agent.policy.errors import PolicyError
from agent.policy.model import parse_policy
from agent.policy.rules import ALL_PORTS, PortRange

BASE = {
    "groups": {"group:dev": ["alice@", "bob@example.com"]},
    "tagOwners": {"tag:web": ["group:dev"], "tag:db": ["tag:web"], "tag:ops": []},
    "hosts": {"db-host": "100.64.0.7", "lab": "10.1.0.0/16", "v6lab": "fd00:1::/64"},
}


def policy_with(acls: list[object], **extra: object) -> str:
    return json.dumps({**BASE, "acls": acls, **extra}, indent=2)


def one_rule(src: list[str], dst: list[str], proto: str | None = None) -> str:
    rule: dict[str, object] = {"action": "accept", "src": src, "dst": dst}
    if proto is not None:
        rule["proto"] = proto
    return policy_with([rule])


@pytest.mark.parametrize(
    ("text", "alias"),
    [
        ("*", Wildcard()),
        ("alice@", User("alice")),
        ("bob@example.com", User("bob@example.com")),
        ("carol", User("carol")),  # a bare name that is no host alias is a user
        ("group:dev", Group("group:dev")),
        ("tag:web", Tag("tag:web")),
        ("db-host", Host("db-host", ip_network("100.64.0.7/32"))),
        ("lab", Host("lab", ip_network("10.1.0.0/16"))),
        ("100.64.0.9", Prefix(ip_network("100.64.0.9/32"))),
        ("100.64.0.0/10", Prefix(ip_network("100.64.0.0/10"))),
        ("fd7a::5", Prefix(ip_network("fd7a::5/128"))),
        ("fd7a::/48", Prefix(ip_network("fd7a::/48"))),
        ("autogroup:member", AutoGroup(AutoGroupKind.MEMBER)),
        ("autogroup:tagged", AutoGroup(AutoGroupKind.TAGGED)),
    ],
)
def test_source_forms(text: str, alias: object) -> None:
    policy = parse_policy(one_rule([text], ["*:*"]))
    assert policy.acls[0].sources == (alias,)


@pytest.mark.parametrize(
    ("text", "alias", "ports"),
    [
        ("*:*", Wildcard(), (ALL_PORTS,)),
        ("alice@:22", User("alice"), (PortRange(22, 22),)),
        (
            "bob@example.com:80,443",
            User("bob@example.com"),
            (PortRange(80, 80), PortRange(443, 443)),
        ),
        ("group:dev:1000-2000", Group("group:dev"), (PortRange(1000, 2000),)),
        ("tag:web:80,443", Tag("tag:web"), (PortRange(80, 80), PortRange(443, 443))),
        ("db-host:5432", Host("db-host", ip_network("100.64.0.7/32")), (PortRange(5432, 5432),)),
        ("100.64.0.9:22", Prefix(ip_network("100.64.0.9/32")), (PortRange(22, 22),)),
        ("10.0.0.0/8:*", Prefix(ip_network("10.0.0.0/8")), (ALL_PORTS,)),
        ("[fd7a::1]:80", Prefix(ip_network("fd7a::1/128")), (PortRange(80, 80),)),
        (
            "[fd7a::/48]:22,80",
            Prefix(ip_network("fd7a::/48")),
            (PortRange(22, 22), PortRange(80, 80)),
        ),
        ("fd7a::1:443", Prefix(ip_network("fd7a::1/128")), (PortRange(443, 443),)),
        ("autogroup:self:*", AutoGroup(AutoGroupKind.SELF), (ALL_PORTS,)),
        ("autogroup:member:22", AutoGroup(AutoGroupKind.MEMBER), (PortRange(22, 22),)),
        ("autogroup:tagged:0-65535", AutoGroup(AutoGroupKind.TAGGED), (ALL_PORTS,)),
    ],
)
def test_destination_forms(text: str, alias: object, ports: tuple[PortRange, ...]) -> None:
    src = ["group:dev"]
    policy = parse_policy(one_rule(src, [text]))
    (dst,) = policy.acls[0].destinations
    assert (dst.target, dst.ports) == (alias, ports)


def test_ports_grammar() -> None:
    assert parse_ports("*") == (ALL_PORTS,)
    assert parse_ports("443,80,80-81") == (
        PortRange(80, 80),
        PortRange(80, 81),
        PortRange(443, 443),
    )
    for bad in ("", "x", "80,", "1-", "-5", "70000", "5-3", "*,22", "22 ", "0x50"):
        with pytest.raises(ValueError, match="port"):
            parse_ports(bad)


@pytest.mark.parametrize(
    ("proto", "numbers"),
    [("tcp", {6}), ("udp", {17}), ("icmp", {1, 58}), ("ICMP", {1, 58}), ("sctp", {132}),
     ("gre", {47}), ("esp", {50}), ("ah", {51}), ("igmp", {2}), ("ipv6-icmp", {58}),
     ("17", {17}), ("1", {1}), ("255", {255})],
)  # fmt: skip
def test_protocols(proto: str, numbers: set[int]) -> None:
    ports = "*" if numbers - {6, 17, 132} else "22"
    policy = parse_policy(one_rule(["*"], [f"tag:web:{ports}"], proto))
    assert policy.acls[0].protocols == frozenset(numbers)
    assert set(parse_protocol(proto)) == numbers


def test_no_proto_means_default() -> None:
    assert parse_policy(one_rule(["*"], ["*:*"])).acls[0].protocols is None


def test_no_acls_section_means_nothing_is_allowed_and_empty_policy_is_valid() -> None:
    policy = parse_policy("{}")
    assert policy.acls == ()
    assert policy.tests == ()


def test_ignored_sections_are_reported() -> None:
    policy = parse_policy('{"ssh": [{"action": "check"}], "nodeAttrs": [], "acls": []}')
    assert policy.ignored == ("ssh", "nodeAttrs")


def test_groups_and_tag_owners() -> None:
    policy = parse_policy(policy_with([]))
    assert policy.groups == {"group:dev": frozenset({"alice", "bob@example.com"})}
    assert policy.may_assign_tag("alice", "tag:web")
    assert policy.may_assign_tag("alice", "tag:db")  # via tag:web, which owns tag:db
    assert not policy.may_assign_tag("carol", "tag:web")
    assert not policy.may_assign_tag("alice", "tag:ops")
    assert not policy.may_assign_tag("alice", "tag:nope")


def test_known_users_check_bare_names() -> None:
    text = one_rule(["carol"], ["*:*"])
    assert parse_policy(text, known_users={"carol"}).acls[0].sources == (User("carol"),)
    with pytest.raises(PolicyError, match=r"^acls\[0\]\.src\[0\]: unknown user or host 'carol'"):
        parse_policy(text, known_users={"alice"})
    # the explicit user@ form may name a user who has not joined yet
    assert parse_policy(one_rule(["dave@"], ["*:*"]), known_users={"alice"}).acls


BAD_RULES = [
    ({"action": "accept", "src": ["*"], "dst": ["tag:wbe:80"]}, "acls[0].dst[0]: unknown tag 'tag:wbe'"),
    ({"action": "accept", "src": ["group:ops"], "dst": ["*:*"]}, "acls[0].src[0]: unknown group 'group:ops'"),
    ({"action": "accept", "src": ["tag:nope"], "dst": ["*:*"]}, "acls[0].src[0]: unknown tag 'tag:nope'"),
    ({"action": "deny", "src": ["*"], "dst": ["*:*"]}, "acls[0].action: action must be 'accept'"),
    ({"src": ["*"], "dst": ["*:*"]}, "acls[0]: missing 'action'"),
    ({"action": "accept", "dst": ["*:*"]}, "acls[0]: missing 'src'"),
    ({"action": "accept", "src": ["*"], "dst": []}, "acls[0].dst: empty destination list"),
    ({"action": "accept", "src": [], "dst": ["*:*"]}, "acls[0].src: empty source list"),
    ({"action": "accept", "src": "*", "dst": ["*:*"]}, "acls[0].src: expected a list, got a string"),
    ({"action": "accept", "src": [5], "dst": ["*:*"]}, "acls[0].src[0]: expected a string, got a number"),
    ({"action": "accept", "src": ["*"], "dst": ["tag:web"]}, "acls[0].dst[0]: bad destination"),
    ({"action": "accept", "src": ["*"], "dst": ["*"]}, "acls[0].dst[0]: bad destination"),
    ({"action": "accept", "src": ["*"], "dst": ["tag:web:http"]}, "acls[0].dst[0]: bad port 'http'"),
    ({"action": "accept", "src": ["*"], "dst": ["tag:web:99999"]}, "acls[0].dst[0]: port 99999 out of range"),
    ({"action": "accept", "src": ["*"], "dst": ["tag:web:9-1"]}, "acls[0].dst[0]: bad port range '9-1'"),
    ({"action": "accept", "src": ["*"], "dst": ["10.0.0.1/8:*"]}, "acls[0].dst[0]: '10.0.0.1/8' has host bits set"),
    ({"action": "accept", "src": ["300.1.1.1"], "dst": ["*:*"]}, "acls[0].src[0]: bad IP address or prefix"),
    ({"action": "accept", "src": ["[fd7a::1]"], "dst": ["*:*"]}, "acls[0].src[0]: bad IP address or prefix '[fd7a::1]'"),
    ({"action": "accept", "src": ["*"], "dst": ["[10.0.0.1]:80"]}, "acls[0].dst[0]: bad destination '[10.0.0.1]:80': brackets are for IPv6"),
    ({"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}, "acls[0].src[0]: autogroup:self is only valid as a destination"),
    ({"action": "accept", "src": ["autogroup:internet"], "dst": ["*:*"]}, "acls[0].src[0]: unsupported autogroup 'autogroup:internet'"),
    ({"action": "accept", "src": ["tag:web"], "dst": ["autogroup:self:*"]}, "acls[0].src[0]: tag:web cannot reach autogroup:self"),
    ({"action": "accept", "src": ["lab"], "dst": ["autogroup:self:*"]}, "acls[0].src[0]: lab cannot reach autogroup:self"),
    ({"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "icmp"}, "acls[0].dst[0]: only tcp, udp and sctp have ports"),
    ({"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "bogus"}, "acls[0].proto: unknown protocol 'bogus'"),
    ({"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "256"}, "acls[0].proto: protocol number 256 out of range"),
    ({"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": 6}, "acls[0].proto: expected a string, got a number"),
    ({"action": "accept", "src": ["*"], "dst": ["*:*"], "users": []}, "acls[0].users: unknown field 'users'"),
    ("accept", "acls[0]: expected an object, got a string"),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "message"), BAD_RULES)
def test_rule_errors_name_the_path(rule: object, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(policy_with([rule]))
    assert str(info.value).startswith(message), str(info.value)


def test_semantic_errors_carry_the_position_too() -> None:
    text = """{
  "tagOwners": {"tag:web": []},
  // rules
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:web:80"]},
    {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
    {"action": "accept", "src": ["*"],
     "dst": ["tag:wbe:80"]},
  ],
}"""
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    assert str(info.value) == "acls[2].dst[0]: unknown tag 'tag:wbe' (line 8, column 14)"
    assert info.value.path == ("acls", 2, "dst", 0)
    assert info.value.position == (8, 14)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[]", "1:1: expected an object, got a list"),
        ('{"grants": []}', "grants: unknown field 'grants'"),
        ('{"groups": {"dev": ["alice@"]}}', "groups.dev: bad group name 'dev'"),
        ('{"groups": {"group:dev": ["group:ops"]}}', "groups.group:dev[0]: a group can contain only users"),
        ('{"groups": {"group:dev": ["tag:x"]}}', "groups.group:dev[0]: a group can contain only users"),
        ('{"groups": {"group:dev": "alice@"}}', "groups.group:dev: expected a list"),
        ('{"tagOwners": {"web": []}}', "tagOwners.web: bad tag name 'web'"),
        ('{"tagOwners": {"tag:web": ["tag:db"]}}', "tagOwners.tag:web[0]: unknown tag 'tag:db'"),
        ('{"tagOwners": {"tag:web": ["*"]}}', "tagOwners.tag:web[0]: a tag owner must be a user, group or tag"),
        ('{"hosts": {"db": "db.example.com"}}', "hosts.db: a host must be an IP address or prefix"),
        ('{"hosts": {"db": "10.0.0.1/8"}}', "hosts.db: '10.0.0.1/8' has host bits set"),
        ('{"hosts": {"tag:x": "10.0.0.1"}}', "hosts.tag:x: bad host name"),
        ('{"hosts": {"a@": "10.0.0.1"}}', "hosts.a@: bad host name"),
        ('{"acls": {}}', "acls: expected a list, got an object"),
    ],
)  # fmt: skip
def test_section_errors(document: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(document)
    assert str(info.value).startswith(message), str(info.value)


def test_tags_may_own_each_other_in_any_order() -> None:
    policy = parse_policy('{"tagOwners": {"tag:a": ["tag:b"], "tag:b": ["tag:a", "alice@"]}}')
    assert policy.tag_owners["tag:a"] == (Tag("tag:b"),)
    assert policy.may_assign_tag("alice", "tag:a")  # a cycle terminates
    assert not policy.may_assign_tag("bob", "tag:a")


TEST_ERRORS = [
    ({"accept": ["tag:web:80"]}, "tests[0]: missing 'src'"),
    ({"src": "group:dev", "accept": []}, "tests[0].src: a test source must be one user, tag, host or IP"),
    ({"src": "lab", "accept": []}, "tests[0].src: a test source must be one user, tag, host or IP"),
    ({"src": "alice@", "accept": ["tag:web:80-81"]}, "tests[0].accept[0]: a test destination needs one port"),
    ({"src": "alice@", "accept": ["tag:web:*"]}, "tests[0].accept[0]: a test destination needs one port"),
    ({"src": "alice@", "deny": ["*:22"]}, "tests[0].deny[0]: a test destination must be one user"),
    ({"src": "alice@", "deny": ["tag:wbe:22"]}, "tests[0].deny[0]: unknown tag 'tag:wbe'"),
    ({"src": "alice@", "allow": ["tag:web:22"]}, "tests[0].allow: unknown field 'allow'"),
]  # fmt: skip


@pytest.mark.parametrize(("test", "message"), TEST_ERRORS)
def test_test_section_errors(test: object, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(policy_with([], tests=[test]))
    assert str(info.value).startswith(message), str(info.value)
