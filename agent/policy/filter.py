"""The node's packet filter: which packets from the tunnel may reach the TUN.

Per packet from an authenticated peer, in order (the semantics of Tailscale's wgengine/filter):

    1. malformed (truncated, bad lengths, not IPv4/IPv6)        -> drop MALFORMED
    2. source outside the peer's allowed addresses              -> drop SPOOFED_SOURCE
    3. destination not one of this node's addresses             -> drop NOT_LOCAL
    4. a fragment after the first                               -> accept (follows the first)
    5. TCP without SYN (or SYN+ACK)                             -> accept: it continues a flow,
       and the stack resets what it does not know; only a SYN opens a connection
    6. a rule accepts it: source prefix, destination address and port, protocol
       (ICMP and port-less protocols match on addresses and protocol only) -> accept
    7. UDP/SCTP reply to a flow this node opened (flow table)   -> accept
       ICMP echo reply to an echo this node sent (flow table)   -> accept
       ICMP error (unreachable, too big, time exceeded, ...)    -> accept
    8. otherwise                                                -> drop DENIED

Rules are looked up through `RuleIndex` (index.py), not scanned. The flow tables are fed by
`note_outbound()` with the packets this node sends into the tunnel; a flow lives while packets
pass either way and is forgotten after `FilterLimits.udp_idle` (UDP, SCTP) or `echo_idle`
(ICMP echo) seconds without one, or when its table is full (least recently used first).
Tailscale's filter bounds its table of UDP flows (512, LRU) but sets no idle time; the idle
times here are the defaults of Linux conntrack for a UDP stream (120 s) and ICMP (30 s).

Time is the caller's monotonic clock, passed as `now`; a call without `now` takes the latest
time seen (so a filter nobody tells the time never expires anything).

Decisions are cached per peer (by identity: pass the same `PeerSources` object for a peer every
time) and flow, keyed by the 12 (IPv4) or 36 (IPv6) bytes of addresses and ports sliced from
the packet, in one table per protocol (TCP, UDP, SCTP). A cached flow costs one dict lookup:

    IPv4 with a 20-byte header  table[packet[9]].get(packet[12:24])
    IPv6 without extensions     table[packet[6]].get(packet[8:44])

and the value is the verdict: ACCEPT, a `FilterDrop`, SYN_DENIED ("a SYN is denied, the rest
of the TCP flow passes"), or the key of the open flow a reply belongs to (accepted while that
flow lives; the packet refreshes it). A non-first IPv4 fragment may find its flow's entry: passing
it is right (later fragments pass uncached too), any other verdict is decided again uncached.
A packet that matches
a cached flow's addresses, ports and protocol is not checked again for truncation: the WireGuard
device has cut it to its IP total length, and the kernel's stack drops a datagram too short for
its transport header. ICMP, fragments, IPv4 options, IPv6 extension headers and other protocols
are never cached. New rules (`update_rules`) clear the caches and keep the flows; a flow opened
by `note_outbound` clears a cached denial of its replies.

`check_batch` runs a list of packets from one peer (what the data plane has after decrypting a
batch) with the lookup inlined; `check_inbound` is a batch of one. `fast_view(peer)` hands the
same tables to the compiled data plane (native/lanes.c), which passes what the cached path here
would pass (ACCEPT; SYN_DENIED and not a SYN) and gives everything else back to `check_batch`.

Nothing here raises on any bytes: every drop returns its `FilterDrop` and is counted in `drops`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import NamedTuple, TypeVar

from agent.policy.flows import Flow, FlowKey, FlowTable, LogLimiter
from agent.policy.index import Mode, RuleIndex
from agent.policy.packet import ICMP_ERRORS, PORTED, MalformedPacket, Parsed, parse
from agent.policy.rules import FilterRule, IPAddress, IPNetwork

__all__ = ["FilterDrop", "FilterLimits", "PeerSources", "PacketFilter", "FastView"]

Buffer = TypeVar("Buffer", bound=bytes | bytearray | memoryview)


class FilterDrop(StrEnum):
    """Why the filter dropped a packet from the tunnel."""

    MALFORMED = "malformed"
    SPOOFED_SOURCE = "spoofed_source"  # source outside the sending peer's addresses
    NOT_LOCAL = "not_local"  # destination is not this node
    DENIED = "denied"  # no rule accepts the new flow


@dataclass(frozen=True, slots=True)
class FilterLimits:
    decisions: int = 16384  # flows whose decision is cached, per peer
    peers: int = 256  # peers (PeerSources objects) with a decision cache
    flows: int = 4096  # UDP/SCTP flows this node opened whose replies pass
    echoes: int = 512  # ICMP echoes this node sent whose replies pass
    udp_idle: float = 120.0  # seconds a UDP/SCTP flow lives without a packet either way
    echo_idle: float = 30.0  # seconds an ICMP echo flow lives without a packet either way
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


class _Mark(Enum):
    ACCEPT = 0  # every packet of the flow passes
    SYN_DENIED = 1  # TCP: a SYN is denied, every other segment passes


# What a decision cache holds for a flow: ACCEPT, a drop, SYN_DENIED, or the open flow a reply
# is for. A lookup that finds nothing gives None.
_Cached = _Mark | FilterDrop | FlowKey
_Lookup = Callable[[object], _Cached | None]
_ACCEPT = _Mark.ACCEPT
_SYN_DENIED = _Mark.SYN_DENIED
_NO_TABLE: dict[object, _Cached] = {}  # never written: the table of protocols never cached
_KEY4, _KEY6 = slice(12, 24), slice(8, 44)  # addresses and ports; built once, not per packet
_NOT_YET = object()


class FastView(NamedTuple):
    """One peer's decision tables as the compiled data plane reads them (never writes)."""

    v4: Mapping[int, Mapping[object, object]]  # protocol -> {packet[12:24]: decision} (dicts)
    v6: Mapping[int, Mapping[object, object]]  # protocol -> {packet[8:44]: decision}
    accept: object  # the decision "every packet of the flow passes"
    syn_denied: object  # "a SYN is denied, every other TCP segment passes"


class _Decisions:
    """One peer's cached decisions: a table per IP version and cacheable protocol."""

    __slots__ = ("get4", "get6", "tables", "view")

    def __init__(self) -> None:
        self.tables: dict[tuple[int, int], dict[object, _Cached]] = {
            (version, protocol): {} for version in (4, 6) for protocol in PORTED
        }
        self.get4: list[_Lookup] = [_NO_TABLE.get] * 256
        self.get6: list[_Lookup] = [_NO_TABLE.get] * 256
        for (version, protocol), table in self.tables.items():
            (self.get4 if version == 4 else self.get6)[protocol] = table.get
        self.view = FastView(
            {proto: t for (version, proto), t in self.tables.items() if version == 4},
            {proto: t for (version, proto), t in self.tables.items() if version == 6},
            _ACCEPT,
            _SYN_DENIED,
        )

    def __len__(self) -> int:
        return sum(map(len, self.tables.values()))


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
        self._local_addresses: tuple[IPAddress, ...] = ()
        self._rules: tuple[FilterRule, ...] = ()
        self._index = RuleIndex((), ())
        self._decisions: dict[PeerSources, _Decisions] = {}
        self._flows = FlowTable(limits.udp_idle, limits.flows)
        self._echoes = FlowTable(limits.echo_idle, limits.echoes)
        self._now = 0.0
        self._sweep_at = 0.0
        self._log = LogLimiter(limits.log_interval, limits.log_flows)
        self.update_rules(rules, local_addresses)

    def update_rules(
        self, rules: Iterable[FilterRule], local_addresses: Iterable[IPAddress] | None = None
    ) -> None:
        """Install new rules (and addresses); cached decisions go, open flows stay."""
        self._rules = tuple(rules)
        if local_addresses is not None:
            self._local_addresses = tuple(local_addresses)
            self._local = frozenset(a.packed for a in self._local_addresses)
        self._index = RuleIndex(self._rules, self._local_addresses)
        self._decisions.clear()

    # -- the per-packet path --------------------------------------------------------------

    def fast_view(self, peer: PeerSources) -> FastView:
        """`peer`'s decision tables for the compiled data plane (valid until `update_rules`)."""
        return self._decisions_of(peer).view

    def check_batch(
        self, packets: Sequence[Buffer], peer: PeerSources, now: float | None = None
    ) -> tuple[list[Buffer], list[tuple[Buffer, FilterDrop]]]:
        """Packets from `peer` (decrypted): those to deliver to the TUN, and those to drop with
        why, each list in arrival order."""
        now = self._clock(now)
        decisions = self._decisions_of(peer)
        get4, get6 = decisions.get4, decisions.get6
        accept, syn_denied, key4, key6 = _ACCEPT, _SYN_DENIED, _KEY4, _KEY6
        passed: list[Buffer] = []
        keep = passed.append
        dropped: list[tuple[Buffer, FilterDrop]] = []
        refreshed: object = _NOT_YET
        v: _Cached | None
        for p in packets:
            try:
                b0 = p[0]
                if b0 == 0x45:
                    v = get4[p[9]](p[key4])
                    # or a TCP segment other than a SYN (or a later fragment: those pass too)
                    if v is accept or (v is syn_denied and p[33] & 0x12 != 0x02):
                        keep(p)
                        continue
                elif b0 >> 4 == 6:
                    v = get6[p[6]](p[key6])
                    if v is accept or (v is syn_denied and p[53] & 0x12 != 0x02):
                        keep(p)
                        continue
                else:
                    v = None
            except (IndexError, TypeError, ValueError):  # short; unhashable (a writable buffer)
                v = None
            if v is refreshed or (type(v) is tuple and self._flows.refresh(v, now)):
                keep(p)  # a reply to a flow this node opened: it keeps the flow open
                refreshed = v
                continue
            why = self._uncommon(p, v, peer, decisions, now)
            if why is None:
                keep(p)
            else:
                dropped.append((p, why))
        return passed, dropped

    def check_inbound(
        self, packet: bytes | bytearray | memoryview, peer: PeerSources, now: float | None = None
    ) -> FilterDrop | None:
        """None to deliver `packet` (from `peer`, decrypted) to the TUN, else why to drop it."""
        now = self._clock(now)
        decisions = self._decisions_of(peer)
        p = packet
        v: _Cached | None
        try:  # the lookup of check_batch
            b0 = p[0]
            if b0 == 0x45:
                v = decisions.get4[p[9]](p[_KEY4])
            elif b0 >> 4 == 6:
                v = decisions.get6[p[6]](p[_KEY6])
            else:
                v = None
        except (IndexError, TypeError, ValueError):
            v = None
        if v is _ACCEPT:
            return None
        if type(v) is tuple and self._flows.refresh(v, now):
            return None
        return self._uncommon(p, v, peer, decisions, now)

    def _clock(self, now: float | None) -> float:
        if now is None:
            return self._now
        if now > self._now:
            self._now = now
            if now >= self._sweep_at:
                self._flows.expire(now)
                self._echoes.expire(now)
                self._sweep_at = now + 1.0
        return self._now

    def _decisions_of(self, peer: PeerSources) -> _Decisions:
        decisions = self._decisions.get(peer)
        if decisions is None:
            decisions = self._decisions[peer] = _Decisions()
            if len(self._decisions) > self.limits.peers:
                del self._decisions[next(iter(self._decisions))]
        return decisions

    def _uncommon(
        self,
        p: bytes | bytearray | memoryview,
        cached: _Cached | None,
        peer: PeerSources,
        decisions: _Decisions,
        now: float,
    ) -> FilterDrop | None:
        """A packet the cache does not simply accept: a cached drop or SYN rule, or no entry."""
        if cached is _ACCEPT:
            return None
        if cached is not None and type(cached) is not tuple:
            try:
                b0 = p[0]
                if not (b0 == 0x45 and (p[7] or p[6] & 0x1F)):  # not a later fragment
                    if cached is _SYN_DENIED:
                        if (p[33] if b0 == 0x45 else p[53]) & 0x12 != 0x02:
                            return None
                        cached = FilterDrop.DENIED
                    if isinstance(cached, FilterDrop):
                        self.drops[cached] += 1
                        return cached
            except IndexError:
                pass  # too short for its flow: decided uncached
        return self._decide(p if type(p) is bytes else bytes(p), peer, decisions, now)

    def _decide(
        self, packet: bytes, peer: PeerSources, decisions: _Decisions, now: float
    ) -> FilterDrop | None:
        """The uncached decision, cached for the flow when the packet allows."""
        try:
            p = parse(packet)
        except MalformedPacket:
            self.drops[FilterDrop.MALFORMED] += 1
            return FilterDrop.MALFORMED
        drop = self._addressing(p, peer)
        cached: _Cached = _ACCEPT if drop is None else drop
        if drop is None and not p.fragment:
            if p.protocol in PORTED:
                cached = self._decide_ported(p, now)
                if cached is _SYN_DENIED:
                    drop = FilterDrop.DENIED if p.is_tcp_syn else None
                elif isinstance(cached, FilterDrop):
                    drop = cached
            elif p.icmp_type >= 0:
                drop = self._decide_icmp(p, now)
            elif not self._index.accepts(p.src, p.dst, p.protocol, 0, Mode.ALL_PORTS):
                drop = FilterDrop.DENIED
        if p.flow_key is not None and p.protocol in PORTED:
            table = decisions.tables[(p.version, p.protocol)]
            table[p.flow_key] = cached
            if len(decisions) > self.limits.decisions:
                del table[next(iter(table))]
        if drop is not None:
            self.drops[drop] += 1
        return drop

    def _addressing(self, p: Parsed, peer: PeerSources) -> FilterDrop | None:
        if p.src not in peer:
            return FilterDrop.SPOOFED_SOURCE
        if p.dst not in self._local:
            return FilterDrop.NOT_LOCAL
        return None

    def _decide_ported(self, p: Parsed, now: float) -> _Cached:
        """What to cache for a TCP/UDP/SCTP flow whose addressing is right."""
        if self._index.accepts(p.src, p.dst, p.protocol, p.dst_port, Mode.PORTS):
            return _ACCEPT
        if p.protocol == 6:
            return _SYN_DENIED
        reply = (p.protocol, p.dst + p.src + _ports(p.dst_port, p.src_port))
        if self._flows.alive(reply, now):
            self._flows.touch(reply, now)
            return reply
        return FilterDrop.DENIED

    def _decide_icmp(self, p: Parsed, now: float) -> FilterDrop | None:
        if p.icmp_type in ICMP_ERRORS[p.version]:
            return None
        if p.icmp_type == (0 if p.version == 4 else 129):
            echo = (p.protocol, p.dst + p.src + _port(p.icmp_id))
            if self._echoes.alive(echo, now):
                self._echoes.touch(echo, now)
                return None
        if self._index.accepts(p.src, p.dst, p.protocol, 0, Mode.ADDRESSES):
            return None
        return FilterDrop.DENIED

    # -- outbound: the flow tables --------------------------------------------------------

    def note_outbound(
        self, packet: bytes | bytearray | memoryview, now: float | None = None
    ) -> None:
        """Record a packet this node sends into the tunnel, so replies to it pass."""
        now = self._clock(now)
        try:
            b0 = packet[0]
            if b0 == 0x45:
                protocol = packet[9]
                if protocol == 6:
                    return  # TCP replies need no state: they are not SYNs
                fragment = packet[7] or packet[6] & 0x1F
                key = (protocol, bytes(packet[12:24]))
                if protocol in PORTED and not fragment and self._flows.refresh(key, now):
                    return  # an open flow: kept open
            elif b0 >> 4 == 6:
                protocol = packet[6]
                if protocol == 6:
                    return
                if protocol in PORTED and self._flows.refresh((protocol, bytes(packet[8:44])), now):
                    return
        except IndexError:
            return
        try:
            p = parse(bytes(packet))
        except MalformedPacket:
            return
        if p.fragment:
            return
        if p.protocol in PORTED and p.protocol != 6:
            if self._flows.touch((p.protocol, p.src + p.dst + _ports(p.src_port, p.dst_port)), now):
                # a cached denial of the replies no longer holds
                reply = p.dst + p.src + _ports(p.dst_port, p.src_port)
                for decisions in self._decisions.values():
                    decisions.tables[(p.version, p.protocol)].pop(reply, None)
        elif p.icmp_type == (8 if p.version == 4 else 128):
            self._echoes.touch((p.protocol, p.src + p.dst + _port(p.icmp_id)), now)

    # -- reporting ------------------------------------------------------------------------

    def should_log(self, flow: Flow, now: float) -> bool:
        """Whether to log a drop of `flow` now: at most once per flow per `log_interval`."""
        return self._log.should_log(flow, now)

    @staticmethod
    def flow_of(packet: bytes | bytearray | memoryview) -> Flow | None:
        """The flow `packet` belongs to, for a log line; None if it is malformed."""
        try:
            return Flow.of(parse(bytes(packet)))
        except MalformedPacket:
            return None

    @property
    def cached_decisions(self) -> int:
        return sum(map(len, self._decisions.values()))

    @property
    def open_flows(self) -> int:
        return len(self._flows) + len(self._echoes)


def _port(port: int) -> bytes:
    return port.to_bytes(2)


def _ports(first: int, second: int) -> bytes:
    return first.to_bytes(2) + second.to_bytes(2)
