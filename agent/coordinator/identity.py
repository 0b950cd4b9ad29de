"""Who a node is, as the coordinator hands it out and as the access policy sees it.

An auth key carries a user and optionally tags; a node joining with it belongs to that user, or,
when the key has tags, is a tagged node owned by no user (tags replace the user, as in
Tailscale). Tagged keys follow Tailscale's tagOwners rule: when a policy is set, the key's user
must own every tag (directly, through a group, or through an owning tag), checked when the key
is made and again when a node joins with it (the policy may have changed in between). Without a
policy any well-formed tag is accepted: there is nothing to check it against, and everything is
allowed anyway.

    user   alice, alice@example.com          (what the policy writes as `alice@` / bare `alice`)
    tags   tag:web,tag:db                    (sorted, no duplicates)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from agent.coordinator.records import NodeRecord
from agent.policy.aliases import Tag, parse_target
from agent.policy.errors import PolicyError
from agent.policy.model import Policy, parse_policy
from agent.policy.rules import Node

__all__ = [
    "check_user",
    "parse_tags",
    "tags_not_owned",
    "policy_node",
    "policy_nodes",
    "load_policy",
    "describe_refusal",
]

_USER: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}(?:@[A-Za-z0-9][A-Za-z0-9.-]{0,252})?")


def check_user(name: str) -> str:
    """`name` when it is a user name the policy can refer to; ValueError otherwise."""
    if not _USER.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a user name (letters, digits, '.', '_', '+', '-', optionally @domain)"
        )
    return name


def parse_tags(text: str) -> tuple[str, ...]:
    """`tag:a,tag:b` -> ("tag:a", "tag:b") (sorted, unique); ValueError naming a bad one."""
    tags: set[str] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            alias = parse_target(item)
        except ValueError as e:
            raise ValueError(f"{item!r}: {e}") from None
        if not isinstance(alias, Tag):
            raise ValueError(f"{item!r} is not a tag (tag:NAME)")
        tags.add(alias.name)
    return tuple(sorted(tags))


def tags_not_owned(policy_text: str | None, user: str, tags: Iterable[str]) -> list[str]:
    """The tags `user` may not hand out under the stored policy's tagOwners (none without a
    policy; all of them when the stored policy does not parse: it vouches for nothing)."""
    try:
        policy = load_policy(policy_text)
    except PolicyError:
        return list(tags)
    if policy is None:
        return []
    return [t for t in tags if not policy.may_assign_tag(user, t)]


def policy_node(node: NodeRecord) -> Node:
    return Node(node.id, node.name, node.user, frozenset(node.tags), (node.ipv4, node.ipv6))


def policy_nodes(nodes: Iterable[NodeRecord]) -> list[Node]:
    return [policy_node(n) for n in nodes]


def load_policy(text: str | None) -> Policy | None:
    """The stored policy (checked when it was set). PolicyError only if the database was
    edited behind the coordinator's back; the caller then fails closed."""
    if text is None:
        return None
    return parse_policy(text)


def describe_refusal(user: str, tags: list[str]) -> str:
    return (
        f"user {user!r} may not assign {', '.join(tags)}: the policy's tagOwners "
        "do not list them for this user"
    )
