"""The packet filter on hand-built packets: rules, replies, spoofing, malformed input, caching."""

from __future__ import annotations

import struct
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.filter import FilterDrop, FilterLimits, PacketFilter, PeerSources
from agent.policy.flows import Flow
from agent.policy.rules import ALL_PORTS, FilterRule, NetPortRange, PortRange
from tests.policy import packets as pk

ME4, ME6 = "100.64.0.1", "fd7a::1"
PEER4, PEER6 = "100.64.0.2", "fd7a::2"
OTHER4, OTHER6 = "100.64.0.3", "fd7a::3"


def rule(sources: list[str], dst: list[tuple[str, int, int]], protocols: set[int]) -> FilterRule:
    return FilterRule(
        tuple(ip_network(s) for s in sources),
        tuple(NetPortRange(ip_network(n), PortRange(a, b)) for n, a, b in dst),
        frozenset(protocols),
    )


RULES = (
    # the peer reaches this node on TCP 22 and UDP 53, and pings it (both families)
    rule([f"{PEER4}/32", f"{PEER6}/128"], [(f"{ME4}/32", 22, 22), (f"{ME6}/128", 22, 22)],
         {pk.TCP, pk.ICMP, pk.ICMPV6}),
    rule([f"{PEER4}/32", f"{PEER6}/128"], [(f"{ME4}/32", 53, 53), (f"{ME6}/128", 53, 53)],
         {pk.UDP}),
    # GRE from the peer, all ports
    rule([f"{PEER4}/32"], [(f"{ME4}/32", 0, 65535)], {pk.GRE}),
)  # fmt: skip


@pytest.fixture
def flt() -> PacketFilter:
    return PacketFilter(RULES, [ip_address(ME4), ip_address(ME6)])


@pytest.fixture
def peer() -> PeerSources:
    return PeerSources([ip_network(f"{PEER4}/32"), ip_network(f"{PEER6}/128")])


@pytest.mark.parametrize(("me", "them"), [(ME4, PEER4), (ME6, PEER6)])
def test_rules_accept_only_their_ports(
    flt: PacketFilter, peer: PeerSources, me: str, them: str
) -> None:
    assert flt.check_inbound(pk.tcp(them, 40000, me, 22), peer) is None
    assert flt.check_inbound(pk.tcp(them, 40000, me, 23), peer) is FilterDrop.DENIED
    assert flt.check_inbound(pk.udp(them, 40000, me, 53), peer) is None
    assert flt.check_inbound(pk.udp(them, 40000, me, 22), peer) is FilterDrop.DENIED
    assert flt.check_inbound(pk.echo_request(them, me), peer) is None
    assert flt.drops[FilterDrop.DENIED] == 2


def test_tcp_without_syn_passes_as_in_tailscale(flt: PacketFilter, peer: PeerSources) -> None:
    # Port 80 is not allowed: a SYN is dropped, but a segment of an existing flow passes (and
    # so does the SYN-ACK answering a connection this node opened).
    assert flt.check_inbound(pk.tcp(PEER4, 80, ME4, 50000, pk.SYN), peer) is FilterDrop.DENIED
    assert flt.check_inbound(pk.tcp(PEER4, 80, ME4, 50000, pk.SYN_ACK), peer) is None
    assert flt.check_inbound(pk.tcp(PEER4, 80, ME4, 50000, pk.ACK), peer) is None
    assert flt.check_inbound(pk.tcp(PEER6, 80, ME6, 50000, pk.ACK), peer) is None
    # the cached decision still tells SYN from non-SYN
    assert flt.check_inbound(pk.tcp(PEER4, 80, ME4, 50000, pk.SYN), peer) is FilterDrop.DENIED


@pytest.mark.parametrize(("me", "them"), [(ME4, PEER4), (ME6, PEER6)])
def test_udp_replies_pass_only_for_flows_this_node_opened(
    flt: PacketFilter, peer: PeerSources, me: str, them: str
) -> None:
    reply = pk.udp(them, 9999, me, 41000)
    assert flt.check_inbound(reply, peer) is FilterDrop.DENIED  # cached as denied...
    flt.note_outbound(pk.udp(me, 41000, them, 9999))
    assert flt.check_inbound(reply, peer) is None  # ...until this node opens the flow
    assert flt.check_inbound(reply, peer) is None
    assert flt.check_inbound(pk.udp(them, 9999, me, 41001), peer) is FilterDrop.DENIED
    assert flt.check_inbound(pk.udp(them, 9998, me, 41000), peer) is FilterDrop.DENIED


def test_sctp_replies_like_udp(flt: PacketFilter, peer: PeerSources) -> None:
    assert flt.check_inbound(pk.sctp(PEER4, 5000, ME4, 6000), peer) is FilterDrop.DENIED
    flt.note_outbound(pk.sctp(ME4, 6000, PEER4, 5000))
    assert flt.check_inbound(pk.sctp(PEER4, 5000, ME4, 6000), peer) is None


@pytest.mark.parametrize(("me", "them"), [(ME4, PEER4), (ME6, PEER6)])
def test_icmp_echo_replies_need_our_echo(me: str, them: str) -> None:
    flt = PacketFilter([], [ip_address(me)])  # no rules at all
    peer = PeerSources([ip_network(them)])
    assert flt.check_inbound(pk.echo_reply(them, me, ident=5), peer) is FilterDrop.DENIED
    assert flt.check_inbound(pk.echo_request(them, me), peer) is FilterDrop.DENIED
    flt.note_outbound(pk.echo_request(me, them, ident=5))
    assert flt.check_inbound(pk.echo_reply(them, me, ident=5), peer) is None
    assert flt.check_inbound(pk.echo_reply(them, me, ident=6), peer) is FilterDrop.DENIED
    unreachable = 3 if ip_address(me).version == 4 else 1
    assert flt.check_inbound(pk.icmp(them, me, unreachable), peer) is None  # errors pass


def test_icmp_rules_need_the_icmp_protocol(peer: PeerSources) -> None:
    tcp_only = [rule([f"{PEER4}/32"], [(f"{ME4}/32", 0, 65535)], {pk.TCP})]
    flt = PacketFilter(tcp_only, [ip_address(ME4)])
    assert flt.check_inbound(pk.echo_request(PEER4, ME4), peer) is FilterDrop.DENIED


def test_other_protocols_need_a_rule_with_every_port(flt: PacketFilter, peer: PeerSources) -> None:
    assert flt.check_inbound(pk.ip(PEER4, ME4, pk.GRE, b"\x00" * 8), peer) is None
    assert flt.check_inbound(pk.ip(PEER4, ME4, 50, b"\x00" * 8), peer) is FilterDrop.DENIED
    narrow = [rule([f"{PEER4}/32"], [(f"{ME4}/32", 1, 10)], {pk.GRE})]
    assert (
        PacketFilter(narrow, [ip_address(ME4)]).check_inbound(
            pk.ip(PEER4, ME4, pk.GRE, b"\x00" * 8), peer
        )
        is FilterDrop.DENIED
    )


@pytest.mark.parametrize(("me", "liar"), [(ME4, OTHER4), (ME6, OTHER6)])
def test_spoofed_source_gets_nothing_through(
    flt: PacketFilter, peer: PeerSources, me: str, liar: str
) -> None:
    # OTHER is allowed by no rule here, but even an allowed port must not pass from a source
    # the sending peer does not own; nor must a TCP non-SYN or a reply to an open flow.
    for packet in (pk.tcp(liar, 1, me, 22), pk.tcp(liar, 1, me, 22, pk.ACK),
                   pk.udp(liar, 1, me, 53), pk.echo_request(liar, me)):  # fmt: skip
        assert flt.check_inbound(packet, peer) is FilterDrop.SPOOFED_SOURCE
    flt.note_outbound(pk.udp(me, 41000, liar, 9999))
    assert flt.check_inbound(pk.udp(liar, 9999, me, 41000), peer) is FilterDrop.SPOOFED_SOURCE
    assert flt.drops[FilterDrop.SPOOFED_SOURCE] == 5


def test_a_flow_cached_for_one_peer_is_not_reused_for_another(flt: PacketFilter) -> None:
    owner = PeerSources([ip_network(f"{PEER4}/32")])
    impostor = PeerSources([ip_network(f"{OTHER4}/32")])
    packet = pk.udp(PEER4, 1, ME4, 53)
    assert flt.check_inbound(packet, owner) is None
    assert flt.check_inbound(packet, impostor) is FilterDrop.SPOOFED_SOURCE
    assert flt.check_inbound(packet, owner) is None


def test_peer_sources_with_prefixes() -> None:
    sources = PeerSources([ip_network("10.1.0.0/16"), ip_network("fd00::/64"), ip_network(PEER4)])
    assert ip_address("10.1.2.3").packed in sources
    assert ip_address("10.2.0.1").packed not in sources
    assert ip_address("fd00::99").packed in sources
    assert ip_address("fd00:0:0:1::1").packed not in sources
    assert ip_address(PEER4).packed in sources
    assert "10.1.2.3" not in sources


def test_destination_must_be_this_node(flt: PacketFilter, peer: PeerSources) -> None:
    assert flt.check_inbound(pk.tcp(PEER4, 1, OTHER4, 22), peer) is FilterDrop.NOT_LOCAL
    assert flt.check_inbound(pk.udp(PEER6, 1, "ff02::1", 53), peer) is FilterDrop.NOT_LOCAL
    assert flt.check_inbound(pk.tcp(PEER4, 1, OTHER4, 22, pk.ACK), peer) is FilterDrop.NOT_LOCAL


def test_fragments_after_the_first_follow_it(flt: PacketFilter, peer: PeerSources) -> None:
    assert flt.check_inbound(pk.fragment4(PEER4, ME4, pk.UDP, 100, b"\x00" * 40), peer) is None
    assert flt.check_inbound(pk.fragment4(OTHER4, ME4, pk.UDP, 100, b"\x00" * 40), peer) is (
        FilterDrop.SPOOFED_SOURCE
    )
    hop = (0, b"\x00" * 7)
    later = (44, b"\x00" + struct.pack("!HI", 100 << 3, 1))
    first = (44, b"\x00" + struct.pack("!HI", 1, 1))  # offset 0, more fragments
    udp_header = struct.pack("!HHHH", 1, 53, 8, 0)
    tail = pk.ipv6_with_extensions(PEER6, ME6, [hop, later], pk.UDP, b"\x00" * 16)
    assert flt.check_inbound(tail, peer) is None
    head_ok = pk.ipv6_with_extensions(PEER6, ME6, [hop, first], pk.UDP, udp_header)
    assert flt.check_inbound(head_ok, peer) is None
    head_bad = pk.ipv6_with_extensions(
        PEER6, ME6, [first], pk.UDP, struct.pack("!HHHH", 1, 54, 8, 0)
    )
    assert flt.check_inbound(head_bad, peer) is FilterDrop.DENIED


@pytest.mark.parametrize(
    "packet",
    [
        b"\x45",
        b"\x45" + b"\x00" * 18,  # shorter than an IPv4 header
        pk.tcp(PEER4, 1, ME4, 22)[:30],  # truncated TCP header
        pk.udp(PEER4, 1, ME4, 53)[:24],
        b"\x46" + pk.tcp(PEER4, 1, ME4, 22)[1:20],  # options claimed, not there
        b"\x70" + b"\x00" * 59,  # IP version 7
        pk.tcp(PEER6, 1, ME6, 22)[:50],
        pk.icmp(PEER4, ME4, 8)[:24],
        pk.ipv6_with_extensions(PEER6, ME6, [(0, b"\x00" * 7)] * 9, pk.UDP, b"\x00" * 8),
        bytes([0x45, 0, 0, 200]) + pk.udp(PEER4, 1, ME4, 53)[4:],  # total length > packet
    ],
)
def test_malformed_packets_are_dropped_and_counted(
    flt: PacketFilter, peer: PeerSources, packet: bytes
) -> None:
    assert flt.check_inbound(packet, peer) is FilterDrop.MALFORMED
    assert flt.drops[FilterDrop.MALFORMED] == 1
    flt.note_outbound(packet)  # ignored, never raises
    assert flt.flow_of(packet) is None


def test_empty_packet_is_malformed(flt: PacketFilter, peer: PeerSources) -> None:
    assert flt.check_inbound(b"", peer) is FilterDrop.MALFORMED


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 119), st.integers(0, 255))
def test_no_bytes_make_the_filter_raise(data: bytes, index: int, value: int) -> None:
    flt = PacketFilter(RULES, [ip_address(ME4), ip_address(ME6)])
    peer = PeerSources([ip_network(f"{PEER4}/32"), ip_network(f"{PEER6}/128")])
    seeds = [
        data,
        pk.tcp(PEER4, 1, ME4, 22),
        pk.udp(PEER6, 1, ME6, 53),
        pk.echo_request(PEER4, ME4),
    ]
    for seed in seeds:
        mutated = bytearray(seed)
        if mutated:
            mutated[index % len(mutated)] = value
        for packet in (bytes(mutated), bytes(mutated[: index % (len(mutated) + 1)])):
            flt.note_outbound(packet)
            verdict = flt.check_inbound(packet, peer)
            assert verdict is None or isinstance(verdict, FilterDrop)


def test_caches_are_bounded(peer: PeerSources) -> None:
    limits = FilterLimits(decisions=50, flows=20)
    wide = [rule(["0.0.0.0/0"], [(f"{ME4}/32", 0, 65535)], {pk.UDP})]
    flt = PacketFilter(wide, [ip_address(ME4)], limits)
    anyone = PeerSources([ip_network("0.0.0.0/0")])
    for port in range(1, 500):
        assert flt.check_inbound(pk.udp(PEER4, port, ME4, 53), anyone) is None
        flt.note_outbound(pk.udp(ME4, port, PEER4, 53))
    assert flt.cached_decisions <= 50
    assert flt.open_flows == 20


def test_an_evicted_reply_flow_is_no_longer_accepted(peer: PeerSources) -> None:
    flt = PacketFilter([], [ip_address(ME4)], FilterLimits(flows=2))
    flt.note_outbound(pk.udp(ME4, 1000, PEER4, 53))
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 1000), peer) is None  # cached as accepted
    flt.note_outbound(pk.udp(ME4, 1001, PEER4, 53))
    flt.note_outbound(pk.udp(ME4, 1002, PEER4, 53))  # evicts 1000, and its cached decision
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 1000), peer) is FilterDrop.DENIED
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 1002), peer) is None


def test_update_rules_clears_decisions_and_keeps_flows(
    flt: PacketFilter, peer: PeerSources
) -> None:
    assert flt.check_inbound(pk.udp(PEER4, 1, ME4, 53), peer) is None
    flt.note_outbound(pk.udp(ME4, 41000, PEER4, 9999))
    flt.update_rules([])
    assert flt.check_inbound(pk.udp(PEER4, 1, ME4, 53), peer) is FilterDrop.DENIED
    assert flt.check_inbound(pk.udp(PEER4, 9999, ME4, 41000), peer) is None


def test_allow_all_rule_passes_every_protocol(peer: PeerSources) -> None:
    everything = FilterRule(
        (ip_network("0.0.0.0/0"), ip_network("::/0")),
        (NetPortRange(ip_network(ME4), ALL_PORTS), NetPortRange(ip_network(ME6), ALL_PORTS)),
        frozenset(),
    )
    flt = PacketFilter([everything], [ip_address(ME4), ip_address(ME6)])
    packets = [pk.tcp(PEER4, 1, ME4, 1), pk.udp(PEER6, 1, ME6, 9), pk.ip(PEER4, ME4, 50, b"x" * 8)]
    for packet in [*packets, pk.echo_request(PEER6, ME6)]:
        assert flt.check_inbound(packet, peer) is None


def test_should_log_once_per_flow_per_minute(flt: PacketFilter, peer: PeerSources) -> None:
    packet = pk.tcp(PEER4, 40000, ME4, 23)
    assert flt.check_inbound(packet, peer) is FilterDrop.DENIED
    flow = flt.flow_of(packet)
    assert flow == Flow(pk.TCP, ip_address(PEER4), 40000, ip_address(ME4), 23)
    assert str(flow) == "tcp 100.64.0.2:40000 -> 100.64.0.1:23"
    assert flt.should_log(flow, now=100.0)
    assert not flt.should_log(flow, now=100.0)
    assert not flt.should_log(flow, now=159.9)
    other = Flow(pk.UDP, ip_address(PEER6), 1, ip_address(ME6), 2)
    assert str(other) == "udp [fd7a::2]:1 -> [fd7a::1]:2"
    assert flt.should_log(other, now=120.0)
    assert flt.should_log(flow, now=160.0)


# -- flows expire when idle (times are the caller's clock, passed as `now`) -----------------


@pytest.mark.parametrize(("me", "them"), [(ME4, PEER4), (ME6, PEER6)])
def test_udp_replies_stop_once_the_flow_is_idle(peer: PeerSources, me: str, them: str) -> None:
    flt = PacketFilter([], [ip_address(me)])
    reply = pk.udp(them, 53, me, 41000)
    flt.note_outbound(pk.udp(me, 41000, them, 53), now=1000.0)
    assert flt.check_inbound(reply, peer, now=1100.0) is None  # cached, and keeps it open
    assert flt.check_inbound(reply, peer, now=1219.0) is None  # 119 s after the last reply
    assert flt.check_batch([reply, reply], peer, now=1339.0) == ([reply, reply], [])
    # nothing either way for 120 s and a bit: the flow is gone, cached or not
    assert flt.check_inbound(reply, peer, now=1459.5) is FilterDrop.DENIED
    assert flt.open_flows == 0
    # our next packet opens it again, and the cached denial no longer holds
    flt.note_outbound(pk.udp(me, 41000, them, 53), now=1500.0)
    assert flt.check_batch([reply], peer, now=1500.0) == ([reply], [])


def test_our_packets_keep_a_flow_open(peer: PeerSources) -> None:
    flt = PacketFilter([], [ip_address(ME4)])
    for t in range(0, 1000, 100):  # we send every 100 s, nothing comes back
        flt.note_outbound(pk.udp(ME4, 41000, PEER4, 53), now=float(t))
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 41000), peer, now=1019.0) is None
    other = pk.udp(PEER4, 53, ME4, 41001)
    assert flt.check_inbound(other, peer, now=1019.0) is FilterDrop.DENIED


@pytest.mark.parametrize(("me", "them"), [(ME4, PEER4), (ME6, PEER6)])
def test_echo_replies_pass_for_30_seconds(me: str, them: str) -> None:
    flt = PacketFilter([], [ip_address(me)])
    peer = PeerSources([ip_network(them)])
    flt.note_outbound(pk.echo_request(me, them, ident=9), now=10.0)
    assert flt.check_inbound(pk.echo_reply(them, me, ident=9), peer, now=40.0) is None
    assert flt.check_inbound(pk.echo_reply(them, me, ident=9), peer, now=70.0) is None
    assert flt.check_inbound(pk.echo_reply(them, me, ident=9), peer, now=100.5) is (
        FilterDrop.DENIED
    )


def test_limits_set_the_idle_times(peer: PeerSources) -> None:
    flt = PacketFilter([], [ip_address(ME4)], FilterLimits(udp_idle=5.0, echo_idle=1.0))
    flt.note_outbound(pk.udp(ME4, 41000, PEER4, 53), now=0.0)
    flt.note_outbound(pk.echo_request(ME4, PEER4), now=0.0)
    assert flt.check_inbound(pk.echo_reply(PEER4, ME4), peer, now=2.0) is FilterDrop.DENIED
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 41000), peer, now=4.0) is None
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 41000), peer, now=9.5) is FilterDrop.DENIED


def test_a_flow_in_use_outlives_a_flood_of_new_ones(peer: PeerSources) -> None:
    flt = PacketFilter([], [ip_address(ME4)], FilterLimits(flows=4))
    flt.note_outbound(pk.udp(ME4, 5000, PEER4, 53), now=0.0)
    for port in range(6000, 6100):  # a scan opens 100 flows while ours keeps talking
        flt.note_outbound(pk.udp(ME4, port, PEER4, 53), now=1.0)
        assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 5000), peer, now=1.0) is None
    assert flt.open_flows == 4
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 6000), peer, now=1.0) is FilterDrop.DENIED


def test_time_without_now_stands_still(peer: PeerSources) -> None:
    flt = PacketFilter([], [ip_address(ME4)])
    flt.note_outbound(pk.udp(ME4, 41000, PEER4, 53), now=500.0)
    assert flt.check_inbound(pk.udp(PEER4, 53, ME4, 41000), peer) is None  # still 500
    flt.check_inbound(pk.udp(PEER4, 1, ME4, 1), peer, now=400.0)  # the clock never goes back
    reply = pk.udp(PEER4, 53, ME4, 41000)
    assert flt.check_inbound(reply, peer, now=621.0) is FilterDrop.DENIED
