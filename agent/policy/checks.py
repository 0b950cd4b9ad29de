"""Run a policy's own `tests`, as Tailscale does before it accepts a policy.

    {"src": "alice@", "proto": "tcp", "accept": ["tag:web:443"], "deny": ["tag:db:5432"]}

A test is about identities, not about which nodes happen to be online: `alice@` stands for any
untagged node of alice's, `tag:web` for any node tagged tag:web. An IP (or a host alias) stands
for that address, and when one of `nodes` has it, for that node's identity too. Without `proto`
a test checks TCP. An `accept` entry passes when every protocol tested is accepted, a `deny` entry
when none is.

`check_policy` is what `policy set` and `policy check` call: parse, check, run the tests, and
refuse the policy (a `PolicyError` listing every failure) if any test fails.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from agent.policy.aliases import Alias, Host, Prefix, Tag, User
from agent.policy.compile import CompiledPolicy
from agent.policy.errors import PolicyError, format_path
from agent.policy.hujson import Document
from agent.policy.model import Destination, Policy, parse_policy
from agent.policy.rules import PROTO_TCP, IPAddress, Node

__all__ = ["TestFailure", "run_tests", "check_policy"]

_PRINCIPAL_ID = -1  # synthetic nodes standing for a test's identities


@dataclass(frozen=True, slots=True)
class TestFailure:
    path: str  # "tests[0].deny[1]"
    source: str
    destination: str
    expected: str  # "accept" or "deny"

    def __str__(self) -> str:
        verb = "should reach" if self.expected == "accept" else "should not reach"
        return f"{self.path}: {self.source} {verb} {self.destination}"


def run_tests(policy: Policy, nodes: Iterable[Node] = ()) -> tuple[TestFailure, ...]:
    """Every failing test entry, in file order (empty when all pass)."""
    known = tuple(nodes)
    compiled = CompiledPolicy(policy, known)
    failures: list[TestFailure] = []
    for t_index, test in enumerate(policy.tests):
        src = _principal(test.source, known)
        protocols = sorted(test.protocols or {PROTO_TCP})
        for expected, entries in (("accept", test.accept), ("deny", test.deny)):
            for i, dst in enumerate(entries):
                target = _principal(dst.target, known)
                port = dst.ports[0].first
                verdicts = [compiled.allows(src, target, p, port) for p in protocols]
                ok = all(verdicts) if expected == "accept" else not any(verdicts)
                if not ok:
                    path = format_path(("tests", t_index, expected, i))
                    failures.append(TestFailure(path, str(test.source), _dst(dst), expected))
    return tuple(failures)


def check_policy(
    source: str | bytes | Document,
    *,
    known_users: Collection[str] | None = None,
    nodes: Iterable[Node] = (),
) -> Policy:
    """Parse and check a policy and run its tests; raise `PolicyError` unless all is well."""
    policy = parse_policy(source, known_users=known_users)
    failures = run_tests(policy, nodes)
    if failures:
        lines = "\n".join(str(f) for f in failures)
        raise PolicyError(f"{len(failures)} policy test(s) failed:\n{lines}")
    return policy


def _dst(dst: Destination) -> str:
    return f"{dst.target}:{dst.ports[0]}"


def _principal(alias: Alias, nodes: tuple[Node, ...]) -> Node:
    """A synthetic node standing for a test's source or destination identity."""
    name = str(alias)
    match alias:
        case User(user):
            return Node(_PRINCIPAL_ID, name, user, frozenset(), ())
        case Tag(tag):
            return Node(_PRINCIPAL_ID, name, None, frozenset({tag}), ())
        case Prefix(network) | Host(_, network):
            address: IPAddress = network.network_address
            for node in nodes:
                if address in node.addresses:
                    return Node(_PRINCIPAL_ID, name, node.user, node.tags, (address,))
            return Node(_PRINCIPAL_ID, name, None, frozenset(), (address,))
    raise AssertionError(f"model.parse_policy admits no test identity {alias!r}")
