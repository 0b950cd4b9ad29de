"""DNS over TCP from the TUN (engine/dns_tcp.py, engine/tcp_segment.py), with crafted packets:
handshake, queries and answers, windows both ways, RST, FIN, out-of-order data, bad checksums,
oversized length prefixes, retransmission, idle connections, the bounds."""

from __future__ import annotations

import ipaddress
import struct

import dns.message
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine.dns_tcp import Query, TcpLimits, TcpResponder, is_service_tcp
from agent.engine.tcp_segment import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    BadSegment,
    IPAddress,
    Segment,
    TcpDrop,
    build_segment,
    parse_segment,
)
from agent.proto.dns.names import SERVICE_V4, SERVICE_V6
from agent.proto.dns.responder import NameTable, Reply, Responder, Transport

CLIENT4 = ipaddress.IPv4Address("100.64.0.7")
CLIENT6 = ipaddress.IPv6Address("fd7a:115c:a1e0::7")
ISS = 0x89ABCDEF
TABLE = NameTable({"b": [ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a::2")]})


def fixed_iss(n: int) -> bytes:
    return ISS.to_bytes(n, "big")


def framed(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def query(name: str = "b.mesh.internal", rdtype: str = "A") -> bytes:
    return framed(dns.message.make_query(name, rdtype).to_wire())


class Client:
    """The kernel's side of one connection, built by hand: sends segments, reads ours."""

    def __init__(
        self,
        tcp: TcpResponder,
        src: IPAddress = CLIENT4,
        sport: int = 40000,
        *,
        dport: int = 53,
        isn: int = 1000,
        mss: int | None = 1240,
        window: int = 65535,
    ) -> None:
        self.tcp = tcp
        self.src, self.sport, self.dport = src, sport, dport
        self.dst = SERVICE_V4 if src.version == 4 else SERVICE_V6
        self.seq = isn
        self.ack = 0
        self.mss, self.window = mss, window
        self.now = 0.0
        self.queries: list[Query] = []

    def packet(
        self, flags: int, payload: bytes = b"", *, seq: int | None = None, **kw: int
    ) -> bytes:
        return build_segment(
            self.src, self.sport, self.dst, self.dport,
            seq=self.seq if seq is None else seq, ack=kw.get("ack", self.ack), flags=flags,
            window=kw.get("window", self.window), payload=payload, mss=kw.get("mss"),
        )  # fmt: skip

    def feed(self, packet: bytes) -> list[Segment]:
        out = self.tcp.receive(packet, self.now)
        self.queries += out.queries
        return [parse_segment(p) for p in out.packets]

    def send(self, flags: int, payload: bytes = b"", **kw: int) -> list[Segment]:
        segs = self.feed(self.packet(flags, payload, **kw))
        if "seq" not in kw:
            self.seq = (self.seq + len(payload) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        return segs

    def connect(self) -> Segment:
        (syn_ack,) = self.send(SYN, mss=self.mss) if self.mss else self.send(SYN)
        assert syn_ack.flags == SYN | ACK
        self.ack = (syn_ack.seq + 1) & 0xFFFFFFFF
        assert self.send(ACK) == []
        return syn_ack

    def answer(self, q: Query, wire: bytes | None) -> list[Segment]:
        out = self.tcp.answer(q.conn, wire, self.now)
        self.queries += out.queries
        return [parse_segment(p) for p in out.packets]

    def timer(self, at: float) -> list[Segment]:
        self.now = at
        return [parse_segment(p) for p in self.tcp.on_timer(at)]


def answer_of(q: Query) -> bytes:
    reply = Responder(TABLE).respond(q.wire, Transport.TCP)
    assert isinstance(reply, Reply)
    return reply.wire


@pytest.fixture
def tcp() -> TcpResponder:
    return TcpResponder(TcpLimits(mtu=1280), randbytes=fixed_iss)


# -- the ordinary exchange ---------------------------------------------------------------------


@pytest.mark.parametrize("src", [CLIENT4, CLIENT6])
def test_a_query_over_tcp_is_answered_and_the_connection_closes(
    tcp: TcpResponder, src: IPAddress
) -> None:
    c = Client(tcp, src)
    syn_ack = c.connect()
    assert (syn_ack.seq, syn_ack.ack, syn_ack.src, syn_ack.sport) == (ISS, 1001, c.dst, 53)
    our_mss = 1280 - (40 if src.version == 4 else 60)
    assert syn_ack.mss == our_mss
    assert syn_ack.window == min(1240, our_mss)  # one segment: the kernel never sends TSO
    wire = query()
    (ack,) = c.send(ACK | PSH, wire)
    assert (ack.flags, ack.ack, ack.payload) == (ACK, 1001 + len(wire), b"")
    (q,) = c.queries
    assert q.wire == wire
    answer = answer_of(q)
    (data,) = c.answer(q, answer)
    assert (data.flags, data.seq, data.payload) == (ACK | PSH, ISS + 1, answer)
    got = dns.message.from_wire(data.payload[2:])
    assert [rd.to_text() for rrset in got.answer for rd in rrset] == ["100.64.0.2"]
    c.ack += len(answer)
    assert c.send(ACK) == []  # a bare ACK is not answered
    (fin,) = c.send(FIN | ACK)
    assert (fin.flags, fin.seq, fin.ack) == (FIN | ACK, ISS + 1 + len(answer), c.seq)
    c.ack += 1
    assert c.send(ACK) == []
    assert len(tcp) == 0
    assert tcp.counters["tcp_closed"] == 1
    assert tcp.next_deadline() is None


def test_query_and_fin_in_one_segment_still_get_the_answer_then_our_fin(
    tcp: TcpResponder,
) -> None:
    c = Client(tcp)
    c.connect()
    wire = query()
    (ack,) = c.send(ACK | PSH | FIN, wire)
    assert ack.ack == 1001 + len(wire) + 1  # data and FIN
    (q,) = c.queries
    data, fin = c.answer(q, answer_of(q))
    assert data.payload[2:]
    assert fin.flags == FIN | ACK
    assert fin.seq == data.seq + len(data.payload)
    c.ack = fin.seq + 1
    c.send(ACK)
    assert len(tcp) == 0


def test_pipelined_queries_in_one_segment_and_a_query_split_over_three(
    tcp: TcpResponder,
) -> None:
    c = Client(tcp)
    c.connect()
    one, two = query("b"), query("b.mesh.internal", "AAAA")
    c.send(ACK | PSH, one + two)
    assert [q.wire for q in c.queries] == [one, two]
    three = query("nope.mesh.internal")
    for part in (three[:1], three[1:9], three[9:]):
        c.send(ACK | PSH, part)
    assert [q.wire for q in c.queries][2:] == [three]
    for q in c.queries:
        c.answer(q, answer_of(q))
    assert tcp.counters["tcp_answers"] == 3


def test_at_most_max_pipelined_queries_are_answered_at_once() -> None:
    tcp = TcpResponder(TcpLimits(max_pipelined=2), randbytes=fixed_iss)
    c = Client(tcp)
    c.connect()
    c.send(ACK | PSH, query() * 3)
    assert len(c.queries) == 2
    c.answer(c.queries[0], answer_of(c.queries[0]))
    assert len(c.queries) == 3  # the third one once a slot is free


def test_an_answer_larger_than_the_mss_goes_in_segments(tcp: TcpResponder) -> None:
    c = Client(tcp, mss=500)
    syn_ack = c.connect()
    assert syn_ack.window == 500
    c.send(ACK | PSH, query())
    (q,) = c.queries
    big = framed(b"\x00" * 1300)
    segs = c.answer(q, big)
    assert [len(s.payload) for s in segs] == [500, 500, 302]
    assert b"".join(s.payload for s in segs) == big
    assert [s.seq for s in segs] == [ISS + 1, ISS + 501, ISS + 1001]


def test_no_mss_option_means_536(tcp: TcpResponder) -> None:
    c = Client(tcp, mss=None)
    assert c.connect().window == 536


# -- windows -------------------------------------------------------------------------------------


def test_data_beyond_our_window_is_not_taken(tcp: TcpResponder) -> None:
    c = Client(tcp, mss=1000)
    c.connect()  # we offer 1000 bytes
    wire = query()
    big = wire + b"\xff" * (1500 - len(wire))
    (ack,) = c.send(ACK | PSH, big)
    assert ack.ack == 1001 + 1000
    assert tcp.counters["drop_tcp_beyond_window"] == 1
    assert [q.wire for q in c.queries] == [wire]


def test_our_answer_respects_the_peers_window_and_probes_a_zero_window(
    tcp: TcpResponder,
) -> None:
    c = Client(tcp, window=30)
    c.connect()
    c.send(ACK | PSH, query())
    (q,) = c.queries
    answer = answer_of(q)
    assert len(answer) > 30
    (first,) = c.answer(q, answer)
    assert first.payload == answer[:30]
    c.ack += 30
    c.window = 0
    assert c.send(ACK) == []  # window closed: nothing more
    deadline = tcp.next_deadline()
    assert deadline is not None
    (probe,) = c.timer(deadline)
    assert (probe.flags, probe.seq, probe.payload) == (ACK, ISS + 30, b"")  # SND.UNA - 1
    c.window = 4096
    (rest,) = c.send(ACK)  # the window opens: the rest goes
    assert (rest.seq, rest.payload) == (ISS + 31, answer[30:])


def test_a_full_receive_buffer_closes_our_window_and_an_answer_reopens_it() -> None:
    tcp = TcpResponder(TcpLimits(max_message=600, max_pipelined=1), randbytes=fixed_iss)
    c = Client(tcp, mss=500)
    c.connect()
    q = framed(b"\x12\x34" + b"\x00" * 498)  # 502 bytes; the buffer holds 2 * 602
    chunks = (q[:500], q[500:] + q[:498], q[498:], q[:500])
    acks = [c.send(ACK | PSH, chunk)[0] for chunk in chunks]
    assert len(c.queries) == 1  # one being answered, the next waits whole in the buffer
    assert [a.window for a in acks] == [500, 500, 500, 0]  # then less than a segment is free
    assert c.send(ACK | PSH, q[500:])[0].ack == c.seq - 2  # a closed window takes nothing
    assert tcp.counters["drop_tcp_beyond_window"] == 1
    c.seq -= 2
    (data,) = c.answer(c.queries[0], framed(b"x" * 12))
    assert data.window == 500  # the waiting query was taken: the window is open again
    assert len(c.queries) == 2
    c.send(ACK | PSH, q[500:])
    assert len(c.queries) == 2  # a third query, waiting for the second's answer


# -- resets, FIN, order ------------------------------------------------------------------------


def test_rst_exactly_at_rcv_nxt_closes_and_elsewhere_gets_a_challenge_ack(
    tcp: TcpResponder,
) -> None:
    c = Client(tcp)
    c.connect()
    assert c.send(RST, seq=c.seq + 5000) == []  # outside the window: ignored
    (challenge,) = c.send(RST, seq=c.seq + 10)  # inside, not exact
    assert (challenge.flags, challenge.ack) == (ACK, c.seq)
    assert len(tcp) == 1
    assert c.send(RST) == []
    assert len(tcp) == 0
    assert tcp.counters["tcp_reset_by_peer"] == 1


def test_out_of_order_data_is_acknowledged_at_rcv_nxt_and_sent_again(tcp: TcpResponder) -> None:
    c = Client(tcp)
    c.connect()
    wire = query()
    (dup,) = c.send(ACK | PSH, wire[10:], seq=c.seq + 10)
    assert dup.ack == c.seq
    assert tcp.counters["drop_tcp_out_of_order"] == 1
    assert c.queries == []
    c.send(ACK | PSH, wire)
    assert [q.wire for q in c.queries] == [wire]


def test_a_retransmission_overlapping_what_we_have_adds_only_the_new_part(
    tcp: TcpResponder,
) -> None:
    c = Client(tcp)
    c.connect()
    wire = query()
    c.send(ACK | PSH, wire[:10])
    (ack,) = c.send(ACK | PSH, wire, seq=c.seq - 10)
    assert ack.ack == 1001 + len(wire)
    assert [q.wire for q in c.queries] == [wire]
    (again,) = c.send(ACK | PSH, wire, seq=1001)  # entirely old: acknowledged again
    assert again.ack == 1001 + len(wire)
    assert len(c.queries) == 1


def test_a_fin_before_a_whole_message_closes_without_a_query(tcp: TcpResponder) -> None:
    c = Client(tcp)
    c.connect()
    (fin,) = c.send(ACK | FIN, query()[:7])
    assert fin.flags == FIN | ACK
    assert fin.ack == c.seq
    assert c.queries == []


def test_an_oversized_length_prefix_resets_the_connection(tcp: TcpResponder) -> None:
    c = Client(tcp)
    c.connect()
    (rst,) = c.send(ACK | PSH, struct.pack("!H", 4097) + b"\x00" * 100)
    assert rst.flags & RST
    assert len(tcp) == 0
    assert tcp.counters["drop_tcp_oversized"] == 1


def test_a_query_that_gets_no_answer_closes_the_connection(tcp: TcpResponder) -> None:
    c = Client(tcp)
    c.connect()
    c.send(ACK | PSH, framed(b"\x00" * 5))
    (q,) = c.queries
    (fin,) = c.answer(q, None)
    assert fin.flags == FIN | ACK


# -- segments no connection takes ----------------------------------------------------------------


def test_everything_else_gets_rst(tcp: TcpResponder) -> None:
    c = Client(tcp, dport=80)
    (rst,) = c.send(SYN)
    assert (rst.flags, rst.seq, rst.ack) == (RST | ACK, 0, 1001)
    stray = Client(tcp, sport=41000)
    (rst,) = stray.send(ACK, ack=777)
    assert (rst.flags, rst.seq) == (RST, 777)
    assert stray.send(RST) == []  # never RST for RST
    assert len(tcp) == 0


def test_a_bad_ack_in_the_handshake_gets_rst(tcp: TcpResponder) -> None:
    c = Client(tcp)
    c.send(SYN)
    (rst,) = c.send(ACK, ack=12345)
    assert (rst.flags, rst.seq) == (RST, 12345)
    assert len(tcp) == 1  # the half-open connection waits for the right ACK or its timer


def test_bad_checksums_and_broken_packets_are_dropped_and_counted(tcp: TcpResponder) -> None:
    c = Client(tcp)
    syn = bytearray(c.packet(SYN, mss=1240))
    syn[-1] ^= 0x01  # inside the MSS option: the TCP checksum no longer holds
    assert c.feed(bytes(syn)) == []
    assert tcp.counters["drop_tcp_bad_checksum"] == 1
    assert c.feed(syn[:30]) == []  # IPv4 total length beyond the packet
    assert tcp.counters["drop_tcp_malformed"] == 1
    frag = bytearray(c.packet(SYN))
    frag[6] |= 0x20  # more fragments
    assert c.feed(bytes(frag)) == []
    assert tcp.counters["drop_tcp_fragment"] == 1
    assert len(tcp) == 0


def test_the_table_is_bounded() -> None:
    tcp = TcpResponder(TcpLimits(max_connections=3), randbytes=fixed_iss)
    for port in range(3):
        Client(tcp, sport=50000 + port).connect()
    (rst,) = Client(tcp, sport=50010).send(SYN)
    assert rst.flags == RST | ACK
    assert (len(tcp), tcp.counters["drop_tcp_full"]) == (3, 1)


# -- time ------------------------------------------------------------------------------------------


def test_a_lost_syn_ack_is_sent_again_on_the_timer_and_on_a_repeated_syn(
    tcp: TcpResponder,
) -> None:
    c = Client(tcp)
    (first,) = c.send(SYN)
    (again,) = c.send(SYN, seq=1000)
    assert (again.flags, again.seq) == (SYN | ACK, first.seq)
    deadline = tcp.next_deadline()
    assert deadline == pytest.approx(0.25)
    (timed,) = c.timer(deadline)
    assert (timed.flags, timed.seq, timed.mss) == (SYN | ACK, ISS, 1240)


def test_unacknowledged_answers_are_sent_again_then_the_connection_is_reset() -> None:
    tcp = TcpResponder(TcpLimits(idle=100.0), randbytes=fixed_iss)
    c = Client(tcp)
    c.connect()
    c.send(ACK | PSH, query())
    (q,) = c.queries
    (data,) = c.answer(q, answer_of(q))
    waits = []
    for _ in range(6):
        deadline = tcp.next_deadline()
        assert deadline is not None
        waits.append(deadline - c.now)
        (again,) = c.timer(deadline)
        assert (again.seq, again.payload) == (data.seq, data.payload)
    assert waits == pytest.approx([0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    deadline = tcp.next_deadline()
    assert deadline is not None
    (rst,) = c.timer(deadline)
    assert rst.flags & RST
    assert (len(tcp), tcp.counters["drop_tcp_retries"]) == (0, 1)


def test_an_idle_connection_is_reset(tcp: TcpResponder) -> None:
    c = Client(tcp)
    c.connect()
    assert tcp.next_deadline() == pytest.approx(10.0)
    assert c.timer(9.0) == []
    (rst,) = c.timer(10.0)
    assert rst.flags & RST
    assert tcp.counters["tcp_idle_closed"] == 1


def test_a_late_answer_for_a_gone_connection_is_counted(tcp: TcpResponder) -> None:
    c = Client(tcp)
    c.connect()
    c.send(ACK | PSH, query())
    (q,) = c.queries
    c.send(RST)
    again = Client(tcp)  # the same 4-tuple, a new connection
    again.connect()
    assert c.answer(q, answer_of(q)) == []
    assert tcp.counters["drop_tcp_late_answer"] == 1


def test_close_resets_every_connection(tcp: TcpResponder) -> None:
    for port in (50001, 50002):
        Client(tcp, sport=port).connect()
    packets = tcp.close()
    assert [parse_segment(p).flags & RST for p in packets] == [RST, RST]
    assert len(tcp) == 0


# -- the codec -----------------------------------------------------------------------------------


def test_is_service_tcp() -> None:
    c4, c6 = Client(TcpResponder(), CLIENT4), Client(TcpResponder(), CLIENT6)
    assert is_service_tcp(c4.packet(SYN))
    assert is_service_tcp(c6.packet(SYN))
    other = build_segment(CLIENT4, 1, CLIENT4, 53, seq=0, ack=0, flags=SYN, window=0)
    assert not is_service_tcp(other)
    assert not is_service_tcp(b"")
    assert not is_service_tcp(b"\x45" + b"\x00" * 10)


def test_parse_round_trips_and_refuses_other_protocols() -> None:
    packet = build_segment(
        CLIENT6, 5, SERVICE_V6, 53, seq=7, ack=9, flags=ACK | PSH, window=77, payload=b"hi"
    )
    seg = parse_segment(packet)
    assert (seg.seq, seg.ack, seg.flags, seg.window, seg.payload, seg.length) == (
        7, 9, ACK | PSH, 77, b"hi", 2,
    )  # fmt: skip
    udp = bytearray(packet)
    udp[6] = 17
    with pytest.raises(BadSegment) as e:
        parse_segment(bytes(udp))
    assert e.value.drop is TcpDrop.NOT_TCP


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 255), st.booleans())
def test_any_bytes_give_a_verdict_never_an_exception(
    tail: bytes, flags: int, valid_header: bool
) -> None:
    tcp = TcpResponder(randbytes=fixed_iss)
    c = Client(tcp)
    c.connect()
    packet = c.packet(flags | ACK, tail) if valid_header else tail
    for p in (packet, packet[:25], packet[:45]):
        out = tcp.receive(p, 1.0)
        for reply in out.packets:
            parse_segment(reply)
    assert len(tcp) <= 1


def test_sequence_numbers_wrap() -> None:
    tcp = TcpResponder(randbytes=lambda n: (0xFFFFFFF0).to_bytes(n, "big"))
    c = Client(tcp, isn=0xFFFFFFFA)
    c.connect()
    wire = query()
    (ack,) = c.send(ACK | PSH, wire)
    assert ack.ack == (0xFFFFFFFB + len(wire)) & 0xFFFFFFFF
    (q,) = c.queries
    segs = c.answer(q, framed(b"y" * 40))
    assert segs[0].seq == 0xFFFFFFF1
    c.ack = (0xFFFFFFF1 + 42) & 0xFFFFFFFF
    assert c.send(ACK) == []
    assert tcp.next_deadline() == pytest.approx(10.0)  # nothing in flight any more
