"""The packet filter, caches and all, against a plain model of its rules, over random histories.

The model below follows the filter's documented order of checks with nothing cached: it parses
every packet, scans every rule and keeps open flows in a dict of deadlines. A history is a
random sequence of inbound batches (from one of two peers), single inbound packets, outbound
packets, clock steps and rule changes; every verdict of the filter must be the model's. The
decision cache is kept tiny so that entries are evicted too.

Packets are well formed here: a truncated packet that matches a cached flow's header fields may
take that flow's verdict (see agent/policy/filter.py); tests/policy/test_filter.py and the fuzz
target cover malformed input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.filter import FilterDrop, FilterLimits, PacketFilter, PeerSources
from agent.policy.index import Mode
from agent.policy.packet import ICMP_ERRORS, MalformedPacket, parse
from agent.policy.rules import FilterRule, IPNetwork, NetPortRange, PortRange
from tests.policy import packets as pk
from tests.policy.test_index import linear

ME4, ME6 = "100.64.0.1", "fd7a::1"
ADDRESSES = {4: ["100.64.0.1", "100.64.0.2", "100.64.0.3", "10.0.0.7"],
             6: ["fd7a::1", "fd7a::2", "fd7a::3"]}  # fmt: skip
PEERS = [
    [ip_network("100.64.0.2/32"), ip_network("fd7a::2/128")],
    [ip_network("100.64.0.3/32"), ip_network("10.0.0.0/8"), ip_network("fd7a::3/128")],
]
IDLE = {17: 120.0, 132: 120.0, 1: 30.0, 58: 30.0}


# -- the model ---------------------------------------------------------------------------


@dataclass
class Model:
    rules: list[FilterRule]
    flows: dict[tuple[int, bytes], float] = field(default_factory=dict)
    now: float = 0.0

    def inbound(self, packet: bytes, peer: list[IPNetwork]) -> FilterDrop | None:
        try:
            p = parse(packet)
        except MalformedPacket:
            return FilterDrop.MALFORMED
        if not any(p.src_address in n for n in peer if n.version == p.version):
            return FilterDrop.SPOOFED_SOURCE
        if p.dst_address not in (ip_address(ME4), ip_address(ME6)):
            return FilterDrop.NOT_LOCAL
        if p.fragment:
            return None
        src, dst, proto = p.src_address, p.dst_address, p.protocol
        if proto in (6, 17, 132):
            if proto == 6 and not p.is_tcp_syn:
                return None
            if linear(self.rules, src, dst, proto, p.dst_port, Mode.PORTS):
                return None
            ports = struct.pack("!HH", p.dst_port, p.src_port)
            if proto != 6 and self._used((proto, p.dst + p.src + ports)):
                return None
            return FilterDrop.DENIED
        if p.icmp_type >= 0:
            if p.icmp_type in ICMP_ERRORS[p.version]:
                return None
            echo = (proto, p.dst + p.src + struct.pack("!H", p.icmp_id))
            if p.icmp_type in (0, 129) and self._used(echo):
                return None
            ok = linear(self.rules, src, dst, proto, 0, Mode.ADDRESSES)
            return None if ok else FilterDrop.DENIED
        ok = linear(self.rules, src, dst, proto, 0, Mode.ALL_PORTS)
        return None if ok else FilterDrop.DENIED

    def _used(self, key: tuple[int, bytes]) -> bool:
        """Whether flow `key` is open; a packet of it keeps it open."""
        if self.flows.get(key, -1.0) < self.now:
            return False
        self.flows[key] = self.now + IDLE[key[0]]
        return True

    def outbound(self, packet: bytes) -> None:
        p = parse(packet)
        if p.fragment:
            return
        if p.protocol in (17, 132):
            ports = struct.pack("!HH", p.src_port, p.dst_port)
            self.flows[(p.protocol, p.src + p.dst + ports)] = self.now + IDLE[p.protocol]
        elif p.icmp_type in (8, 128):
            key = (p.protocol, p.src + p.dst + struct.pack("!H", p.icmp_id))
            self.flows[key] = self.now + IDLE[p.protocol]


# -- random packets, rules and histories --------------------------------------------------


# A few flows, so that histories revisit them: (other address, protocol, port, port). An inbound
# packet goes from the other address to this node, an outbound one back; either may swap ports.
FLOWS = [
    ("100.64.0.2", 6, 40000, 22),
    ("100.64.0.2", 17, 1000, 53),
    ("100.64.0.3", 17, 53, 1000),
    ("10.0.0.7", 6, 80, 40000),
    ("100.64.0.2", 132, 1000, 1001),
    ("fd7a::2", 17, 1000, 53),
    ("fd7a::2", 6, 40000, 22),
    ("fd7a::3", 6, 80, 1000),
]


@st.composite
def packets(draw: st.DrawFn, inbound: bool = True) -> bytes:
    other, protocol, sport, dport = draw(st.sampled_from(FLOWS))
    version = ip_address(other).version
    local = ME4 if version == 4 else ME6
    if draw(st.booleans()):
        sport, dport = dport, sport
    src, dst = (other, local) if inbound else (local, other)
    if draw(st.integers(0, 9)) == 0:  # now and then, to somewhere else
        dst = draw(st.sampled_from(ADDRESSES[version]))
    flags = draw(st.sampled_from([pk.SYN, pk.ACK, pk.SYN_ACK, 0x18, 0x11]))
    if protocol == 6:
        packet = pk.tcp(src, sport, dst, dport, flags)
    elif protocol == 17:
        packet = pk.udp(src, sport, dst, dport)
    else:
        packet = pk.sctp(src, sport, dst, dport)
    kind = draw(st.sampled_from(["flow", "flow", "flow", "echo", "reply", "error", "gre",
                                 "fragment", "options", "extension"]))  # fmt: skip
    header = 20 if version == 4 else 40
    if kind in ("echo", "reply"):
        make = pk.echo_request if kind == "echo" else pk.echo_reply
        return make(src, dst, ident=draw(st.sampled_from([7, 8])))
    if kind == "error":
        return pk.icmp(src, dst, 3 if version == 4 else 1)
    if kind == "gre":
        return pk.ip(src, dst, pk.GRE, b"\x00" * 8)
    if kind == "fragment" and version == 4:  # a later fragment that reads like a flow's header
        return pk.fragment4(src, dst, protocol, 100, packet[header:])
    if kind == "options" and version == 4:  # a 24-byte header: not cached
        options = bytearray(packet[:20] + b"\x01\x01\x01\x00" + packet[20:])
        options[0], options[3] = 0x46, len(options)
        return bytes(options)
    if kind == "extension" and version == 6:  # a hop-by-hop header: not cached
        return pk.ipv6_with_extensions(src, dst, [(0, b"\x00" * 7)], protocol, packet[40:])
    return packet


def _net(address: str, length: int) -> IPNetwork:
    return ip_network(f"{address}/{length}", strict=False)


@st.composite
def filter_rules(draw: st.DrawFn) -> list[FilterRule]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        sources = draw(st.lists(st.sampled_from([
            _net("100.64.0.2", 32), _net("100.64.0.3", 32), _net("100.64.0.0", 30),
            _net("10.0.0.0", 8), _net("0.0.0.0", 0), _net("fd7a::2", 128), _net("fd7a::", 64),
        ]), min_size=1, max_size=3))  # fmt: skip
        ranges = [(22, 22), (53, 53), (1000, 1001), (0, 65535), (80, 80)]
        destinations = draw(st.lists(st.builds(
            NetPortRange,
            st.sampled_from([_net(ME4, 32), _net(ME6, 128), _net("100.64.0.0", 10)]),
            st.sampled_from(ranges).map(lambda r: PortRange(*r)),
        ), min_size=1, max_size=2))  # fmt: skip
        protocols = draw(st.frozensets(st.sampled_from([6, 17, 132, 1, 58, 47]), max_size=3))
        out.append(FilterRule(tuple(sources), tuple(destinations), protocols))
    return out


def reverse(packet: bytes) -> bytes:
    """The packet going the other way: addresses and ports swapped, an echo for a reply."""
    b = bytearray(packet)
    if b[0] == 0x45:
        at, size, transport, protocol = 12, 4, 20, b[9]
        if b[6] & 0x1F or b[7]:
            protocol = -1  # a later fragment: no transport header
    elif b[0] >> 4 == 6:
        at, size, transport, protocol = 8, 16, 40, b[6]
    else:
        return packet
    middle = at + size
    b[at:middle], b[middle : middle + size] = b[middle : middle + size], b[at:middle]
    if protocol in (6, 17, 132):
        b[transport : transport + 2], b[transport + 2 : transport + 4] = (
            b[transport + 2 : transport + 4],
            b[transport : transport + 2],
        )
    elif protocol in (1, 58):
        b[transport] = {8: 0, 0: 8, 128: 129, 129: 128}.get(b[transport], b[transport])
    return bytes(b)


OPERATIONS = ["batch", "one", "out", "tick", "rules", "again", "reply", "answer"]
TICKS = [0.5, 10.0, 29.0, 31.0, 119.0, 121.0]


@settings(max_examples=120, deadline=None)
@given(filter_rules(), st.data())
def test_the_filter_decides_as_the_model(rules: list[FilterRule], data: st.DataObject) -> None:
    local = [ip_address(ME4), ip_address(ME6)]
    now = 1000.0
    flt = PacketFilter(rules, local, FilterLimits(decisions=8, peers=1))
    model = Model(list(rules), now=now)
    peers = [PeerSources(nets) for nets in PEERS]
    received: list[bytes] = []
    sent: list[bytes] = []

    def receive(batch: list[bytes], who: int, alone: bool) -> None:
        batch = [bytes(bytearray(p)) for p in batch]  # one object each
        received.extend(batch)
        if alone:
            for p in batch:
                assert flt.check_inbound(p, peers[who], now) is model.inbound(p, PEERS[who]), p
            return
        expected = [model.inbound(p, PEERS[who]) for p in batch]
        passed, dropped = flt.check_batch(batch, peers[who], now)
        got = {id(p): why for p, why in dropped}
        assert [got.get(id(p)) for p in batch] == expected, batch
        assert passed == [p for p, e in zip(batch, expected, strict=True) if e is None]

    for _ in range(data.draw(st.integers(0, 40))):
        op = data.draw(st.sampled_from(OPERATIONS))
        who = data.draw(st.integers(0, 1))
        if op == "batch":
            receive(data.draw(st.lists(packets(), min_size=1, max_size=6)), who, alone=False)
        elif op == "one":
            receive([data.draw(packets())], who, alone=True)
        elif op == "again" and received:  # the same packets again: from the cache now
            again = data.draw(st.lists(st.sampled_from(received), min_size=1, max_size=4))
            receive(again, who, alone=data.draw(st.booleans()))
        elif op == "reply" and sent:  # the answer to something this node sent
            receive(
                [reverse(data.draw(st.sampled_from(sent)))], who, alone=data.draw(st.booleans())
            )
        elif op in ("out", "answer"):
            if op == "answer" and received:
                packet = reverse(data.draw(st.sampled_from(received)))
            else:
                packet = data.draw(packets(inbound=False))
            sent.append(packet)
            flt.note_outbound(packet, now)
            model.outbound(packet)
        elif op == "tick":
            now += data.draw(st.sampled_from(TICKS))
            model.now = now
        elif op == "rules":
            new = data.draw(filter_rules())
            flt.update_rules(new)
            model.rules = list(new)
    assert flt.cached_decisions <= 8


def test_model_sanity() -> None:
    """The model itself: a reply passes after our packet, not before, not after the idle time."""
    model = Model([])
    me, them = ME4, "100.64.0.2"
    reply = pk.udp(them, 53, me, 1000)
    assert model.inbound(reply, PEERS[0]) is FilterDrop.DENIED
    model.outbound(pk.udp(me, 1000, them, 53))
    assert model.inbound(reply, PEERS[0]) is None
    model.now = 121.0
    assert model.inbound(reply, PEERS[0]) is FilterDrop.DENIED
