"""An index over a node's filter rules: does some rule accept a new flow, without a scan.

A rule accepts a flow when its protocol set holds the flow's protocol (or is empty: every
protocol), one of its sources holds the source address, and one of its destinations holds the
destination address with the destination port in its range. The index answers that with set
intersections over rule numbers instead of a pass over every rule:

    destination side, built per local address and protocol (the filter only asks about packets
    addressed to this node, so the destination address selects a table, never a search):
        every   rules with a destination here that allows every port
        exact   port -> rules with a destination here for that single port
        ranges  the distinct other port ranges, each with its rules (few in practice)
        any     rules with a destination here, whatever the ports (ICMP needs no port)
    source side:
        host address (a /32 or /128 source) -> rules with that source
        for each other prefix length used by some source, masked address -> rules with it

A flow is accepted when a source set and a destination set share a rule number. Lookups cost a
dict get per distinct prefix length and a C-level `isdisjoint` over the smaller of two sets, so
a first packet costs about the same with 10 rules as with 1,000 (sets of rules that share a
port and a source prefix are the exception: `isdisjoint` walks the smaller one).

`Mode` says which destinations count: PORTS (TCP, UDP, SCTP: the port must be in range),
ADDRESSES (ICMP: any port range) or ALL_PORTS (other protocols: only rules for every port, as
Tailscale's filter does for protocols without ports).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from agent.policy.rules import ALL_PORTS, FilterRule, IPAddress, PortRange

__all__ = ["Mode", "RuleIndex"]

_EVERY_PROTOCOL = -1  # the table of rules without a protocol list
_NONE: frozenset[int] = frozenset()


class Mode(IntEnum):
    PORTS = 0  # TCP, UDP, SCTP: the destination port must be in range
    ADDRESSES = 1  # ICMP: addresses and protocol only
    ALL_PORTS = 2  # other protocols: only rules that allow every port


@dataclass(frozen=True, slots=True)
class _Ports:
    """The rules with a destination at one local address, for one protocol, by port."""

    every: list[frozenset[int]]  # [rules for every port], or [] when there are none
    any: list[frozenset[int]]  # [rules whatever the ports], or []
    exact: dict[int, frozenset[int]]
    ranges: tuple[tuple[int, int, frozenset[int]], ...]

    def at(self, port: int) -> list[frozenset[int]]:
        out = self.every.copy()
        exact = self.exact.get(port)
        if exact is not None:
            out.append(exact)
        for first, last, rules in self.ranges:
            if first <= port <= last:
                out.append(rules)
        return out


@dataclass(slots=True)
class _PortsBuilder:
    by_range: defaultdict[PortRange, set[int]] = field(default_factory=lambda: defaultdict(set))

    def add(self, ports: PortRange, rule: int) -> None:
        self.by_range[ports].add(rule)

    def merged(self, other: _PortsBuilder | None) -> _PortsBuilder:
        out = _PortsBuilder()
        for source in (self, other):
            if source is not None:
                for ports, rules in source.by_range.items():
                    out.by_range[ports] |= rules
        return out

    def build(self) -> _Ports:
        every = frozenset(self.by_range.get(ALL_PORTS, ()))
        exact: dict[int, frozenset[int]] = {}
        ranges: list[tuple[int, int, frozenset[int]]] = []
        for ports, rules in sorted(self.by_range.items()):
            if ports == ALL_PORTS:
                continue
            if ports.first == ports.last:
                exact[ports.first] = frozenset(rules)
            else:
                ranges.append((ports.first, ports.last, frozenset(rules)))
        anything = frozenset().union(*self.by_range.values())
        every_list = [every] if every else []
        return _Ports(every_list, [anything] if anything else [], exact, tuple(ranges))


class RuleIndex:
    """The rules of one node's filter, indexed for `accepts`. Immutable once built."""

    def __init__(self, rules: Sequence[FilterRule], local: Iterable[IPAddress]) -> None:
        local = tuple(local)
        hosts: dict[bytes, set[int]] = {}
        prefixes: dict[int, dict[int, dict[int, set[int]]]] = {4: {}, 16: {}}
        tables: dict[bytes, dict[int, _PortsBuilder]] = {}
        for number, rule in enumerate(rules):
            for net in rule.sources:
                if net.num_addresses == 1:
                    hosts.setdefault(net.network_address.packed, set()).add(number)
                    continue
                shift = net.max_prefixlen - net.prefixlen
                masked = int(net.network_address) >> shift
                by_shift = prefixes[net.max_prefixlen // 8].setdefault(shift, {})
                by_shift.setdefault(masked, set()).add(number)
            for dst in rule.destinations:
                for address in local:
                    if address.version != dst.network.version or address not in dst.network:
                        continue
                    by_protocol = tables.setdefault(address.packed, {})
                    for protocol in rule.protocols or (_EVERY_PROTOCOL,):
                        by_protocol.setdefault(protocol, _PortsBuilder()).add(dst.ports, number)
        # A named protocol's table also holds the rules for every protocol; a protocol no rule
        # names falls back to those alone.
        self._ports: dict[bytes, dict[int, _Ports]] = {
            address: {
                protocol: builder.merged(
                    by_protocol.get(_EVERY_PROTOCOL) if protocol != _EVERY_PROTOCOL else None
                ).build()
                for protocol, builder in by_protocol.items()
            }
            for address, by_protocol in tables.items()
        }
        self._hosts: dict[bytes, frozenset[int]] = {a: frozenset(r) for a, r in hosts.items()}
        self._prefixes: dict[int, tuple[tuple[int, dict[int, frozenset[int]]], ...]] = {
            size: tuple(
                (shift, {masked: frozenset(rules) for masked, rules in by_masked.items()})
                for shift, by_masked in sorted(by_shift.items())
            )
            for size, by_shift in prefixes.items()
        }

    def accepts(self, src: bytes, dst: bytes, protocol: int, port: int, mode: Mode) -> bool:
        """Whether some rule accepts a new flow from `src` to `dst` (packed addresses of one
        family; `dst` one of the local addresses) over `protocol`, to `port` in PORTS mode."""
        by_protocol = self._ports.get(dst)
        if by_protocol is None:
            return False
        table = by_protocol.get(protocol)
        if table is None:
            table = by_protocol.get(_EVERY_PROTOCOL)
            if table is None:
                return False
        # the modes compared as ints: an enum lookup costs more here
        if mode == 0:  # PORTS
            targets = table.at(port)
        elif mode == 1:  # ADDRESSES
            targets = table.any
        else:
            targets = table.every
        if not targets:
            return False
        rules = self._hosts.get(src)
        if rules is not None:
            for target in targets:
                if not rules.isdisjoint(target):
                    return True
        prefixes = self._prefixes[len(src)]
        if prefixes:
            value = int.from_bytes(src)
            for shift, by_masked in prefixes:
                rules = by_masked.get(value >> shift)
                if rules is not None:
                    for target in targets:
                        if not rules.isdisjoint(target):
                            return True
        return False
