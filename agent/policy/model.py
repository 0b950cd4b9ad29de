"""A Tailscale-syntax policy document, checked and typed: `parse_policy(text) -> Policy`.

Supported sections (the subset of Tailscale's policy file this coordinator enforces):

    groups     {"group:dev": ["alice@", "bob@"]}          users only, no nested groups
    tagOwners  {"tag:web": ["group:dev", "tag:ops"]}      every tag used anywhere must be here
    hosts      {"db": "100.64.0.7", "lab": "10.1.0.0/16"}
    acls       [{"action": "accept", "src": [...], "dst": ["tag:web:80,443"], "proto": "tcp"}]
    tests      [{"src": "alice@", "accept": ["tag:web:80"], "deny": ["tag:db:5432"]}]

Sections that cannot widen or narrow access here (`ssh`, `nodeAttrs`, ...) are accepted and
listed in `Policy.ignored`; ones that would change who reaches what (`grants`, `postures`, ...)
are refused, since silently dropping them would enforce a different policy than the one written.

Every refusal is a `PolicyError` naming the path of the bad value (`acls[2].dst[0]: unknown tag
'tag:wbe'`) and its line and column in the file.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar

from agent.policy import aliases
from agent.policy.aliases import (
    Alias,
    AutoGroup,
    AutoGroupKind,
    Group,
    Host,
    Name,
    Prefix,
    Tag,
    User,
    Wildcard,
)
from agent.policy.errors import PathItem, PolicyError
from agent.policy.hujson import Document, JSONValue, parse
from agent.policy.rules import ALL_PORTS, PORTED_PROTOCOLS, IPNetwork, PortRange

__all__ = ["Destination", "AclRule", "PolicyTest", "Policy", "parse_policy", "IGNORED_SECTIONS"]

IGNORED_SECTIONS = frozenset(
    {"ssh", "nodeAttrs", "autoApprovers", "derpMap", "randomizeClientPort", "disableIPv4",
     "OneCGNATRoute"}
)  # fmt: skip
_SECTIONS = ("groups", "tagOwners", "hosts", "acls", "tests")
_T = TypeVar("_T")
Path = tuple[PathItem, ...]


@dataclass(frozen=True, slots=True)
class Destination:
    target: Alias
    ports: tuple[PortRange, ...]


@dataclass(frozen=True, slots=True)
class AclRule:
    sources: tuple[Alias, ...]
    destinations: tuple[Destination, ...]
    protocols: frozenset[int] | None  # None: no `proto` given (TCP, UDP and ICMP)


@dataclass(frozen=True, slots=True)
class PolicyTest:
    source: Alias
    accept: tuple[Destination, ...]
    deny: tuple[Destination, ...]
    protocols: frozenset[int] | None


@dataclass(frozen=True, slots=True)
class Policy:
    groups: Mapping[str, frozenset[str]]  # "group:dev" -> user names
    tag_owners: Mapping[str, tuple[Alias, ...]]  # "tag:web" -> users, groups, tags
    hosts: Mapping[str, IPNetwork]
    acls: tuple[AclRule, ...]
    tests: tuple[PolicyTest, ...]
    ignored: tuple[str, ...] = ()  # top-level sections accepted but not enforced

    def may_assign_tag(self, user: str, tag: str) -> bool:
        """Whether `user` owns `tag` in tagOwners (directly, via a group or an owning tag)."""
        return self._owns(user, tag, frozenset())

    def _owns(self, user: str, tag: str, seen: frozenset[str]) -> bool:
        for owner in self.tag_owners.get(tag, ()):
            if isinstance(owner, User) and owner.name == user:
                return True
            if isinstance(owner, Group) and user in self.groups.get(owner.name, ()):
                return True
            if (
                isinstance(owner, Tag)
                and owner.name not in seen
                and self._owns(user, owner.name, seen | {tag})
            ):
                return True
        return False


def parse_policy(
    source: str | bytes | Document, *, known_users: Collection[str] | None = None
) -> Policy:
    """Check and type a policy; `known_users` (if given) must contain every bare user name."""
    doc = source if isinstance(source, Document) else parse(source)
    return _Checker(doc, known_users).policy()


class _Checker:
    def __init__(self, doc: Document, known_users: Collection[str] | None) -> None:
        self.doc = doc
        self.known_users = None if known_users is None else frozenset(known_users)
        self.hosts: dict[str, IPNetwork] = {}
        self.groups: dict[str, frozenset[str]] = {}
        self.tags: set[str] = set()

    def fail(self, path: Path, message: str) -> PolicyError:
        return PolicyError(message, path=path, position=self.doc.position(path))

    # -- typed access ---------------------------------------------------------------------

    def obj(self, value: JSONValue, path: Path) -> dict[str, JSONValue]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected an object, got {_kind(value)}")
        return value

    def array(self, value: JSONValue, path: Path) -> list[JSONValue]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {_kind(value)}")
        return value

    def text(self, value: JSONValue, path: Path) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {_kind(value)}")
        return value

    def grammar(self, parser: Callable[[str], _T], value: JSONValue, path: Path) -> _T:
        text = self.text(value, path)
        try:
            return parser(text)
        except ValueError as e:
            raise self.fail(path, str(e)) from None

    def keys(self, doc: dict[str, JSONValue], path: Path, allowed: Collection[str]) -> None:
        for key in doc:
            if key not in allowed:
                raise self.fail((*path, key), f"unknown field {key!r}")

    # -- sections -------------------------------------------------------------------------

    def policy(self) -> Policy:
        top = self.obj(self.doc.value, ())
        ignored = tuple(k for k in top if k in IGNORED_SECTIONS)
        self.keys(top, (), (*_SECTIONS, *IGNORED_SECTIONS))
        for name, section in (("hosts", self.host_section), ("groups", self.group_section)):
            if name in top:
                section(self.obj(top[name], (name,)))
        owners = self.tag_section(self.obj(top.get("tagOwners", {}), ("tagOwners",)))
        acls = tuple(
            self.acl(item, ("acls", i))
            for i, item in enumerate(self.array(top.get("acls", []), ("acls",)))
        )
        tests = tuple(
            self.test(item, ("tests", i))
            for i, item in enumerate(self.array(top.get("tests", []), ("tests",)))
        )
        return Policy(dict(self.groups), owners, dict(self.hosts), acls, tests, ignored)

    def host_section(self, doc: dict[str, JSONValue]) -> None:
        for name, value in doc.items():
            path: Path = ("hosts", name)
            target = aliases.parse_target(name) if _plain_name(name) else None
            if not isinstance(target, Name):
                raise self.fail(path, f"bad host name {name!r}")
            network = self.grammar(aliases.parse_target, value, path)
            if not isinstance(network, Prefix):
                raise self.fail(path, f"a host must be an IP address or prefix, not {value!r}")
            self.hosts[name] = network.network

    def group_section(self, doc: dict[str, JSONValue]) -> None:
        for name, value in doc.items():
            path: Path = ("groups", name)
            if not (name.startswith("group:") and isinstance(_target_or_none(name), Group)):
                raise self.fail(path, f"bad group name {name!r}: expected 'group:<name>'")
            members: set[str] = set()
            for i, item in enumerate(self.array(value, path)):
                member = self.resolve(self.grammar(aliases.parse_target, item, (*path, i)))
                if not isinstance(member, User):
                    raise self.fail((*path, i), f"a group can contain only users, not {item!r}")
                members.add(member.name)
            self.groups[name] = frozenset(members)

    def tag_section(self, doc: dict[str, JSONValue]) -> dict[str, tuple[Alias, ...]]:
        for name in doc:
            if not (name.startswith("tag:") and isinstance(_target_or_none(name), Tag)):
                raise self.fail(("tagOwners", name), f"bad tag name {name!r}")
            self.tags.add(name)  # first, so tags may own each other in any order
        owners: dict[str, tuple[Alias, ...]] = {}
        for name, value in doc.items():
            path: Path = ("tagOwners", name)
            found: list[Alias] = []
            for i, item in enumerate(self.array(value, path)):
                owner = self.alias(item, (*path, i))
                if not isinstance(owner, User | Group | Tag):
                    message = f"a tag owner must be a user, group or tag, not {item!r}"
                    raise self.fail((*path, i), message)
                found.append(owner)
            owners[name] = tuple(found)
        return owners

    def acl(self, value: JSONValue, path: Path) -> AclRule:
        doc = self.obj(value, path)
        self.keys(doc, path, ("action", "src", "dst", "proto"))
        for field in ("action", "src", "dst"):
            if field not in doc:
                raise self.fail(path, f"missing {field!r}")
        if doc["action"] != "accept":
            raise self.fail((*path, "action"), f"action must be 'accept', not {doc['action']!r}")
        protocols = self.protocol(doc, path)
        destinations = self.destinations(doc["dst"], (*path, "dst"), protocols)
        sources = self.sources(doc["src"], (*path, "src"))
        if any(d.target == AutoGroup(AutoGroupKind.SELF) for d in destinations):
            for i, src in enumerate(sources):
                if not isinstance(src, Wildcard | User | Group | AutoGroup):
                    raise self.fail(
                        (*path, "src", i),
                        f"{src} cannot reach autogroup:self: sources of such a rule must be "
                        "users, groups, autogroup:member or *",
                    )
        return AclRule(sources, destinations, protocols)

    def test(self, value: JSONValue, path: Path) -> PolicyTest:
        doc = self.obj(value, path)
        self.keys(doc, path, ("src", "accept", "deny", "proto"))
        if "src" not in doc:
            raise self.fail(path, "missing 'src'")
        src = self.alias(doc["src"], (*path, "src"))
        if not (isinstance(src, User | Tag) or _is_single_address(src)):
            message = f"a test source must be one user, tag, host or IP, not {src}"
            raise self.fail((*path, "src"), message)
        protocols = self.protocol(doc, path)
        checks: dict[str, tuple[Destination, ...]] = {}
        for field in ("accept", "deny"):
            found = self.destinations(doc.get(field, []), (*path, field), protocols)
            for i, d in enumerate(found):
                if not (isinstance(d.target, User | Tag) or _is_single_address(d.target)):
                    message = (
                        f"a test destination must be one user, tag, host or IP, not {d.target}"
                    )
                    raise self.fail((*path, field, i), message)
                portless = protocols is not None and not protocols <= PORTED_PROTOCOLS
                if not portless and (len(d.ports) != 1 or d.ports[0].first != d.ports[0].last):
                    raise self.fail((*path, field, i), "a test destination needs one port")
            checks[field] = found
        return PolicyTest(src, checks["accept"], checks["deny"], protocols)

    # -- entries --------------------------------------------------------------------------

    def protocol(self, doc: dict[str, JSONValue], path: Path) -> frozenset[int] | None:
        if "proto" not in doc:
            return None
        return frozenset(self.grammar(aliases.parse_protocol, doc["proto"], (*path, "proto")))

    def sources(self, value: JSONValue, path: Path) -> tuple[Alias, ...]:
        items = self.array(value, path)
        if not items:
            raise self.fail(path, "empty source list")
        found: list[Alias] = []
        for i, item in enumerate(items):
            alias = self.alias(item, (*path, i))
            if alias == AutoGroup(AutoGroupKind.SELF):
                raise self.fail((*path, i), "autogroup:self is only valid as a destination")
            found.append(alias)
        return tuple(found)

    def destinations(
        self, value: JSONValue, path: Path, protocols: frozenset[int] | None
    ) -> tuple[Destination, ...]:
        items = self.array(value, path)
        if not items and path[-1] == "dst":
            raise self.fail(path, "empty destination list")
        found: list[Destination] = []
        for i, item in enumerate(items):
            where = (*path, i)
            target, ports = self.grammar(aliases.parse_destination, item, where)
            target = self.reference(target, where)
            if (
                protocols is not None
                and not protocols <= PORTED_PROTOCOLS
                and ports != (ALL_PORTS,)
            ):
                raise self.fail(where, "only tcp, udp and sctp have ports; use '*' with this proto")
            found.append(Destination(target, ports))
        return tuple(found)

    def alias(self, value: JSONValue, path: Path) -> Alias:
        """A target string, parsed and checked by `reference`."""
        return self.reference(self.grammar(aliases.parse_target, value, path), path)

    def reference(self, alias: Alias, path: Path) -> Alias:
        """Resolve bare names and check that groups, tags and users referred to exist."""
        alias = self.resolve(alias)
        if isinstance(alias, Name):
            raise self.fail(path, f"unknown user or host {alias.name!r}")
        if isinstance(alias, Group) and alias.name not in self.groups:
            raise self.fail(path, f"unknown group {alias.name!r}")
        if isinstance(alias, Tag) and alias.name not in self.tags:
            raise self.fail(path, f"unknown tag {alias.name!r}")
        return alias

    def resolve(self, alias: Alias) -> Alias:
        if not isinstance(alias, Name):
            return alias
        if alias.name in self.hosts:
            return Host(alias.name, self.hosts[alias.name])
        if self.known_users is None or alias.name in self.known_users:
            return User(alias.name)
        return alias


def _kind(value: JSONValue) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _target_or_none(text: str) -> Alias | None:
    try:
        return aliases.parse_target(text)
    except ValueError:
        return None


def _plain_name(text: str) -> bool:
    return isinstance(_target_or_none(text), Name)


def _is_single_address(alias: Alias) -> bool:
    return isinstance(alias, Prefix | Host) and alias.network.num_addresses == 1
