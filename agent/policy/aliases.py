"""The string grammar of policy entries: targets (`tag:web`), ports (`80,443`) and protocols.

Each parser takes one string and returns a typed value or raises `ValueError` with a message
for the operator; `model.py` adds the path (`acls[2].dst[0]`) and the file position.

    target      := "*" | user | group | tag | autogroup | ip | cidr | name
    user        := name "@" [domain]        "alice@", "alice@example.com"
    group       := "group:" name            tag := "tag:" name
    autogroup   := "autogroup:" ("member" | "tagged" | "self")
    destination := target ":" ports  |  "[" ipv6 ["/" bits] "]:" ports
    ports       := "*" | port-or-range ("," port-or-range)*      "22", "80,443", "1000-2000"
    proto       := name ("tcp", "udp", "icmp", ...) | number 1-255

A bare `name` is a host alias when `hosts` defines it, otherwise a user name; `model.py`
decides, because only it knows the hosts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import ip_address, ip_network

from agent.policy.rules import (
    ALL_PORTS,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    IPNetwork,
    PortRange,
    host_network,
)

__all__ = [
    "Alias",
    "AutoGroup",
    "AutoGroupKind",
    "Group",
    "Host",
    "Name",
    "Prefix",
    "Tag",
    "User",
    "Wildcard",
    "PROTOCOL_NAMES",
    "parse_destination",
    "parse_ports",
    "parse_protocol",
    "parse_target",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_USER = re.compile(r"[^\s@:,*\[\]]+@[^\s@:,*\[\]]*")
_PORT = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")

# IANA numbers by the names Tailscale accepts; "icmp" covers ICMP for both IP versions.
PROTOCOL_NAMES: dict[str, tuple[int, ...]] = {
    "icmp": (PROTO_ICMP, PROTO_ICMPV6),
    "igmp": (2,),
    "ipv4": (4,),
    "ip-in-ip": (4,),
    "tcp": (PROTO_TCP,),
    "egp": (8,),
    "igp": (9,),
    "udp": (PROTO_UDP,),
    "gre": (47,),
    "esp": (50,),
    "ah": (51,),
    "ipv6-icmp": (PROTO_ICMPV6,),
    "icmpv6": (PROTO_ICMPV6,),
    "sctp": (PROTO_SCTP,),
}


class AutoGroupKind(StrEnum):
    MEMBER = "autogroup:member"  # every node owned by a user (untagged)
    TAGGED = "autogroup:tagged"  # every tagged node
    SELF = "autogroup:self"  # destination only: the source user's own untagged nodes


@dataclass(frozen=True, slots=True)
class Wildcard:
    def __str__(self) -> str:
        return "*"


@dataclass(frozen=True, slots=True)
class User:
    name: str  # "alice" for "alice@", "alice@example.com" as written otherwise

    def __str__(self) -> str:
        return self.name if "@" in self.name else f"{self.name}@"


@dataclass(frozen=True, slots=True)
class Group:
    name: str  # with its prefix: "group:dev"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Tag:
    name: str  # with its prefix: "tag:web"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class AutoGroup:
    kind: AutoGroupKind

    def __str__(self) -> str:
        return str(self.kind)


@dataclass(frozen=True, slots=True)
class Prefix:
    network: IPNetwork

    def __str__(self) -> str:
        return str(self.network)


@dataclass(frozen=True, slots=True)
class Name:
    """A bare name before resolution: a host alias or a user."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Host:
    """A resolved host alias."""

    name: str
    network: IPNetwork

    def __str__(self) -> str:
        return self.name


Alias = Wildcard | User | Group | Tag | AutoGroup | Prefix | Name | Host


def parse_target(text: str) -> Alias:
    """One target without ports: `*`, `alice@`, `group:dev`, `tag:web`, `10.0.0.0/8`, `db`."""
    if text == "*":
        return Wildcard()
    for prefix, kind in (("group:", Group), ("tag:", Tag)):
        if text.startswith(prefix):
            if not _NAME.fullmatch(text[len(prefix) :]):
                raise ValueError(f"bad {prefix[:-1]} name {text!r}")
            return kind(text)
    if text.startswith("autogroup:"):
        try:
            return AutoGroup(AutoGroupKind(text))
        except ValueError:
            raise ValueError(f"unsupported autogroup {text!r}") from None
    if _USER.fullmatch(text):
        return User(text[:-1] if text.endswith("@") else text)
    if text[:1].isdigit() or ":" in text:
        return Prefix(_parse_network(text))
    if _NAME.fullmatch(text):
        return Name(text)
    raise ValueError(f"bad target {text!r}")


def _parse_network(text: str) -> IPNetwork:
    try:
        if "/" in text:
            return ip_network(text)
        return host_network(ip_address(text))
    except ValueError as e:
        if "has host bits set" in str(e):
            raise ValueError(f"{text!r} has host bits set") from None
        raise ValueError(f"bad IP address or prefix {text!r}") from None


def parse_destination(text: str) -> tuple[Alias, tuple[PortRange, ...]]:
    """`target:ports`, splitting at the last colon, or `[ipv6]:ports`."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"bad destination {text!r}: expected '[ipv6]:ports'")
        inner, ports = text[1:close], text[close + 2 :]
        if ":" not in inner:
            raise ValueError(f"bad destination {text!r}: brackets are for IPv6 addresses")
        return Prefix(_parse_network(inner)), parse_ports(ports)
    target, colon, ports = text.rpartition(":")
    if not colon or not target:
        raise ValueError(f"bad destination {text!r}: expected 'target:ports'")
    if target in ("group", "tag", "autogroup"):
        raise ValueError(f"bad destination {text!r}: missing ports (write {text}:*)")
    return parse_target(target), parse_ports(ports)


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """`*`, `22`, `80,443`, `1000-2000`, or a comma list of these (no `*` in a list)."""
    if text == "*":
        return (ALL_PORTS,)
    ranges: list[PortRange] = []
    for part in text.split(","):
        m = _PORT.fullmatch(part)
        if not m:
            raise ValueError(f"bad port {part!r}" if part else f"bad port list {text!r}")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last > 0xFFFF:
            raise ValueError(f"port {last} out of range")
        if first > last:
            raise ValueError(f"bad port range {part!r}: {first} > {last}")
        ranges.append(PortRange(first, last))
    return tuple(sorted(set(ranges)))


def parse_protocol(text: str) -> tuple[int, ...]:
    """A protocol name (`tcp`, `icmp`, ...) or IANA number (`17`) -> protocol numbers."""
    if text.isdigit() and text.isascii():
        number = int(text)
        if not 1 <= number <= 255:
            raise ValueError(f"protocol number {number} out of range 1-255")
        return (number,)
    found = PROTOCOL_NAMES.get(text.lower())
    if found is None:
        raise ValueError(f"unknown protocol {text!r}")
    return found
