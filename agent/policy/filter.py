"""The node's packet filter: which packets from the tunnel may reach the TUN.

Per packet from an authenticated peer, in order (the semantics of Tailscale's wgengine/filter):

    1. malformed (truncated, bad lengths, not IPv4/IPv6)        -> drop MALFORMED
    2. source outside the peer's allowed addresses              -> drop SPOOFED_SOURCE
    3. destination not one of this node's addresses             -> drop NOT_LOCAL
    4. a fragment after the first                               -> accept (follows the first)
    5. TCP without SYN (or SYN+ACK)                             -> accept: it continues a flow,
       and the stack resets what it does not know; only a SYN opens a connection
    6. UDP/SCTP reply to a flow this node opened (flow table)   -> accept
       ICMP echo reply to an echo this node sent (flow table)   -> accept
       ICMP error (unreachable, too big, time exceeded, ...)    -> accept
    7. a rule accepts it: source prefix, destination address and port, protocol
       (ICMP and port-less protocols match on addresses and protocol only) -> accept
    8. otherwise                                                -> drop DENIED

The flow table is fed by `note_outbound()` with every packet this node sends into the tunnel
(reversed UDP/SCTP 5-tuples and ICMP echo identifiers), bounded, least recently used out.

Decisions are cached per flow, keyed by the address and port bytes sliced from the packet, in a
bounded LRU. A cached entry also records the peer it was decided for (by identity: pass the
same `PeerSources` object for a peer every time) and the protocol, so a hit costs one dict
lookup and two comparisons. ICMP, fragments, IPv4 options, IPv6 extension headers and other
protocols take the uncached path. New rules (`update_rules`) clear the cache and keep the flows.

Nothing here raises on any bytes: every drop returns its `FilterDrop` and is counted in `drops`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from agent.policy.flows import Flow, LogLimiter
from agent.policy.packet import ICMP_ERRORS, PORTED, MalformedPacket, Parsed, parse
from agent.policy.rules import ALL_PORTS, FilterRule, IPAddress, IPNetwork

__all__ = ["FilterDrop", "FilterLimits", "PeerSources", "PacketFilter"]

_Entry = tuple["PeerSources", int, "FilterDrop | None", "FilterDrop | None"]
_FlowKey = tuple[int, bytes]


class FilterDrop(StrEnum):
    """Why the filter dropped a packet from the tunnel."""

    MALFORMED = "malformed"
    SPOOFED_SOURCE = "spoofed_source"  # source outside the sending peer's addresses
    NOT_LOCAL = "not_local"  # destination is not this node
    DENIED = "denied"  # no rule accepts the new flow


@dataclass(frozen=True, slots=True)
class FilterLimits:
    decisions: int = 16384  # flows whose decision is cached
    flows: int = 4096  # flows this node opened whose replies pass (UDP/SCTP, ICMP echo)
    log_interval: float = 60.0  # seconds between two log lines about one dropped flow
    log_flows: int = 4096  # dropped flows the log limiter remembers


class PeerSources:
    """The source addresses one authenticated peer may use (its allowed IPs)."""

    __slots__ = ("_exact", "_ranges", "networks")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._exact: frozenset[bytes] = frozenset(
            n.network_address.packed for n in self.networks if n.num_addresses == 1
        )
        self._ranges: dict[int, tuple[tuple[int, int], ...]] = {
            size: tuple(
                (int(n.network_address), int(n.broadcast_address))
                for n in self.networks
                if n.num_addresses > 1 and n.max_prefixlen == size * 8
            )
            for size in (4, 16)
        }

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, bytes):
            return False
        if address in self._exact:
            return True
        value = int.from_bytes(address)
        return any(lo <= value <= hi for lo, hi in self._ranges.get(len(address), ()))


class _Mode(IntEnum):
    PORTS = 0  # TCP, UDP, SCTP: the destination port must be in range
    ADDRESSES = 1  # ICMP: addresses and protocol only
    ALL_PORTS = 2  # other protocols: only rules that allow every port


@dataclass(frozen=True, slots=True)
class _Match:
    sources: tuple[tuple[int, int], ...]
    destinations: tuple[tuple[int, int, int, int], ...]  # address lo, hi, first port, last port
    protocols: frozenset[int]  # empty: every protocol


def _compile(rules: Iterable[FilterRule], version: int) -> tuple[_Match, ...]:
    def span(n: IPNetwork) -> tuple[int, int]:
        return int(n.network_address), int(n.broadcast_address)

    out: list[_Match] = []
    for rule in rules:
        sources = tuple(span(n) for n in rule.sources if n.version == version)
        destinations = tuple(
            (*span(d.network), d.ports.first, d.ports.last)
            for d in rule.destinations
            if d.network.version == version
        )
        if sources and destinations:
            out.append(_Match(sources, destinations, rule.protocols))
    return tuple(out)


class PacketFilter:
    """Inbound filter for one node. Owned by the data plane; not thread-safe."""

    def __init__(
        self,
        rules: Iterable[FilterRule],
        local_addresses: Iterable[IPAddress],
        limits: FilterLimits = FilterLimits(),
    ) -> None:
        self.limits = limits
        self.drops: Counter[FilterDrop] = Counter()
        self._local: frozenset[bytes] = frozenset()
        self._matches: dict[int, tuple[_Match, ...]] = {}
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._flows: OrderedDict[_FlowKey, None] = OrderedDict()
        self._log = LogLimiter(limits.log_interval, limits.log_flows)
        self.update_rules(rules, local_addresses)

    def update_rules(
        self, rules: Iterable[FilterRule], local_addresses: Iterable[IPAddress] | None = None
    ) -> None:
        """Install new rules (and addresses); cached decisions go, open flows stay."""
        rules = tuple(rules)
        if local_addresses is not None:
            self._local = frozenset(a.packed for a in local_addresses)
        self._matches = {4: _compile(rules, 4), 6: _compile(rules, 6)}
        self._cache.clear()

    # -- the per-packet path --------------------------------------------------------------

    def check_inbound(self, packet: bytes, peer: PeerSources) -> FilterDrop | None:
        """None to deliver `packet` (from `peer`, decrypted) to the TUN, else why to drop it."""
        n = len(packet)
        if n >= 40:
            b0 = packet[0]
            if b0 == 0x45 and not (packet[7] or packet[6] & 0x1F):
                proto, key, syn = packet[9], packet[12:24], packet[33] & 0x12 == 0x02
            elif b0 >> 4 == 6 and n >= 60 and packet[6] in PORTED:
                proto, key, syn = packet[6], packet[8:44], packet[53] & 0x12 == 0x02
            else:
                return self._decide(packet, peer)
            entry = self._cache.get(key)
            if entry is not None and entry[0] is peer and entry[1] == proto:
                self._cache.move_to_end(key)
                drop = entry[3] if syn and proto == 6 else entry[2]
                if drop is not None:
                    self.drops[drop] += 1
                return drop
        return self._decide(packet, peer)

    def _decide(self, packet: bytes, peer: PeerSources) -> FilterDrop | None:
        try:
            p = parse(packet)
        except MalformedPacket:
            self.drops[FilterDrop.MALFORMED] += 1
            return FilterDrop.MALFORMED
        always = new = self._addressing(p, peer)
        if always is None and not p.fragment:
            if p.protocol in PORTED:
                new = self._decide_ported(p)
                if p.protocol != 6:
                    always = new
            elif p.icmp_type >= 0:
                always = new = self._decide_icmp(p)
            else:
                always = new = None if self._match(p, _Mode.ALL_PORTS) else FilterDrop.DENIED
        if p.flow_key is not None:
            self._cache[p.flow_key] = (peer, p.protocol, always, new)
            if len(self._cache) > self.limits.decisions:
                self._cache.popitem(last=False)
        drop = new if p.is_tcp_syn else always
        if drop is not None:
            self.drops[drop] += 1
        return drop

    def _addressing(self, p: Parsed, peer: PeerSources) -> FilterDrop | None:
        if p.src not in peer:
            return FilterDrop.SPOOFED_SOURCE
        if p.dst not in self._local:
            return FilterDrop.NOT_LOCAL
        return None

    def _decide_ported(self, p: Parsed) -> FilterDrop | None:
        """Whether a new TCP/UDP/SCTP flow is accepted (a reply, or by a rule)."""
        if p.protocol != 6:
            reply = (p.protocol, p.src + p.dst + _ports(p.src_port, p.dst_port))
            if reply in self._flows:
                return None
        return None if self._match(p, _Mode.PORTS) else FilterDrop.DENIED

    def _decide_icmp(self, p: Parsed) -> FilterDrop | None:
        if p.icmp_type in ICMP_ERRORS[p.version]:
            return None
        reply = 0 if p.version == 4 else 129
        if p.icmp_type == reply and (p.protocol, p.src + p.dst + _port(p.icmp_id)) in self._flows:
            return None
        return None if self._match(p, _Mode.ADDRESSES) else FilterDrop.DENIED

    def _match(self, p: Parsed, mode: _Mode) -> bool:
        src, dst = int.from_bytes(p.src), int.from_bytes(p.dst)
        port, protocol = p.dst_port, p.protocol
        for m in self._matches[p.version]:
            if m.protocols and protocol not in m.protocols:
                continue
            for lo, hi in m.sources:
                if lo <= src <= hi:
                    break
            else:
                continue
            for lo, hi, first, last in m.destinations:
                if not lo <= dst <= hi:
                    continue
                if mode is _Mode.ADDRESSES or (first <= port <= last and mode is _Mode.PORTS):
                    return True
                if mode is _Mode.ALL_PORTS and (first, last) == (ALL_PORTS.first, ALL_PORTS.last):
                    return True
        return False

    # -- outbound: the flow table ---------------------------------------------------------

    def note_outbound(self, packet: bytes) -> None:
        """Record a packet this node sends into the tunnel, so replies to it pass."""
        try:
            p = parse(packet)
        except MalformedPacket:
            return
        if p.fragment:
            return
        if p.protocol in PORTED and p.protocol != 6:
            key = p.dst + p.src + _ports(p.dst_port, p.src_port)
        elif p.icmp_type == (8 if p.version == 4 else 128):
            key = p.dst + p.src + _port(p.icmp_id)
        else:
            return
        flow = (p.protocol, key)
        if flow in self._flows:
            self._flows.move_to_end(flow)
            return
        self._flows[flow] = None
        self._cache.pop(key, None)  # a cached "denied" for the reply no longer holds
        while len(self._flows) > self.limits.flows:
            old, _ = self._flows.popitem(last=False)
            self._cache.pop(old[1], None)  # nor does a cached "reply accepted"

    # -- reporting ------------------------------------------------------------------------

    def should_log(self, flow: Flow, now: float) -> bool:
        """Whether to log a drop of `flow` now: at most once per flow per `log_interval`."""
        return self._log.should_log(flow, now)

    @staticmethod
    def flow_of(packet: bytes) -> Flow | None:
        """The flow `packet` belongs to, for a log line; None if it is malformed."""
        try:
            return Flow.of(parse(packet))
        except MalformedPacket:
            return None

    @property
    def cached_decisions(self) -> int:
        return len(self._cache)

    @property
    def open_flows(self) -> int:
        return len(self._flows)


def _port(port: int) -> bytes:
    return port.to_bytes(2)


def _ports(first: int, second: int) -> bytes:
    return first.to_bytes(2) + second.to_bytes(2)
