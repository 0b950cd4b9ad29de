"""DNS over TCP from the TUN (agent/engine/dns_tcp.py, agent/engine/tcp_segment.py): the segment
parser and the connection state machine, driven by sequences of packets, answers and timers.

Input: chunks (fuzz.common.Data.chunks), each one event chosen by its first byte:
    0  raw packet bytes, straight into `receive` (the parser)
    1  a well-formed segment with valid checksums from one of four clients (family, port),
       fields read from the chunk: client, flags, seq and ack as signed 16-bit offsets from
       what the client and the responder would expect, window, a port byte (>= 250: port
       80), the MSS option (on SYN; 0 = none), then the payload; so inputs reach the state
       machine
    2  answer the oldest outstanding query (with bytes from the chunk, or None)
    3  let time pass (up to ~65 s) and run the timer

Contract: nothing may raise. Invariants: every packet out is a well-formed segment from a
service address and port 53 to the client it answers; queries carry a whole message within
`max_message`; the table stays within `max_connections`; the window we offer never exceeds
one segment; receive buffers stay within their capacity; with a connection open there is
always a deadline.
"""

from __future__ import annotations

from ipaddress import ip_address

from agent.engine.dns_tcp import Query, TcpLimits, TcpResponder
from agent.engine.tcp_segment import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    BadSegment,
    IPAddress,
    build_segment,
    parse_segment,
)
from agent.proto.dns.names import SERVICE_V4, SERVICE_V6
from fuzz.common import Data, Seed, check

LIMITS = TcpLimits(max_connections=3, max_message=300, max_pipelined=2, mtu=600, idle=10.0)
CLIENTS: tuple[tuple[IPAddress, int], ...] = (
    (ip_address("100.64.0.7"), 40000),
    (ip_address("100.64.0.7"), 40001),
    (ip_address("fd7a:115c:a1e0::7"), 40000),
    (ip_address("100.64.0.8"), 53),
)
ISN = 1000


def _iss(n: int) -> bytes:
    return (0xFFFFFF00).to_bytes(n, "big")  # near the wrap: sequence arithmetic is exercised


def _signed(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


class Harness:
    name = "dns_tcp"
    contract = "nothing"
    dictionary = (b"\x01\x02", b"\x01\x10", b"\x01\x18", b"\x01\x11", b"\x01\x04", b"\x01\x12",
                  b"\x00\x00", b"\xff\xff", b"\x00\x1d", b"\x02", b"\x03\x01\x00",
                  b"\x45\x00", b"\x60\x00\x00\x00", b"\x00\x35", b"\x02\x04\x04\xd8")  # fmt: skip

    def run(self, data: bytes) -> str:
        d = Data(data)
        tcp = TcpResponder(LIMITS, randbytes=_iss)
        now = 0.0
        client_seq = [ISN] * len(CLIENTS)
        server_seq = [0] * len(CLIENTS)
        pending: list[Query] = []
        outcomes: set[str] = set()
        for chunk in d.chunks(48):
            c = Data(chunk)
            op = c.byte() % 4
            packets: list[bytes] = []
            if op == 0:
                out = tcp.receive(c.rest(), now)
                packets, queries = out.packets, out.queries
            elif op == 1:
                who = c.byte() % len(CLIENTS)
                src, sport = CLIENTS[who]
                flags = c.byte()
                seq = (client_seq[who] + _signed(c.uint(2))) & 0xFFFFFFFF
                ack = (server_seq[who] + _signed(c.uint(2))) & 0xFFFFFFFF
                window = c.uint(2)
                dport = 53 if c.byte() < 250 else 80
                mss = c.uint(2)
                payload = c.rest()
                dst = SERVICE_V4 if src.version == 4 else SERVICE_V6
                packet = build_segment(
                    src, sport, dst, dport, seq=seq, ack=ack, flags=flags, window=window,
                    payload=payload, mss=mss if flags & SYN and mss else None,
                )  # fmt: skip
                out = tcp.receive(packet, now)
                packets, queries = out.packets, out.queries
                used = len(payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
                client_seq[who] = (seq + used) & 0xFFFFFFFF
            elif op == 2:
                queries = []
                if pending:
                    query = pending.pop(0)
                    body = c.rest()
                    wire = None if body[:1] == b"\x00" else len(body).to_bytes(2, "big") + body
                    out = tcp.answer(query.conn, wire, now)
                    packets, queries = out.packets, out.queries
            else:
                now += c.uint(2) / 1000
                packets, queries = tcp.on_timer(now), []
            for query in queries:
                size = int.from_bytes(query.wire[:2], "big")
                check(len(query.wire) == 2 + size, "a query is not one whole message")
                check(size <= LIMITS.max_message, "a query over max_message")
            pending += queries
            for packet in packets:
                outcomes.add(self._check_out(packet, server_seq))
            check(len(tcp) <= LIMITS.max_connections, "connection table over its limit")
            check(not len(tcp) or tcp.next_deadline() is not None, "an open connection, no timer")
            for conn in tcp._conns.values():
                check(len(conn.rbuf) <= 2 * (2 + LIMITS.max_message), "receive buffer overflow")
            outcomes.add(f"op{op}")
        return ",".join(sorted(outcomes))[:60]

    def _check_out(self, packet: bytes, server_seq: list[int]) -> str:
        try:
            seg = parse_segment(packet)
        except BadSegment as e:
            raise AssertionError(f"we sent a bad segment: {e}") from e
        check(seg.src in (SERVICE_V4, SERVICE_V6), "a segment from elsewhere")
        check(seg.sport in (53, 80), "a segment from another port")
        if seg.sport == 53 and not seg.flags & RST:
            check(seg.window <= LIMITS.mtu - 40, "a window wider than one segment")
        for i, (src, sport) in enumerate(CLIENTS):
            if (seg.dst, seg.dport) == (src, sport):
                end = seg.seq + len(seg.payload) + (1 if seg.flags & (SYN | FIN) else 0)
                server_seq[i] = end & 0xFFFFFFFF
        names = {SYN | ACK: "synack", ACK: "ack", ACK | PSH: "data", FIN | ACK: "fin"}
        return names.get(seg.flags, "rst" if seg.flags & RST else f"f{seg.flags}")

    def seeds(self) -> list[bytes]:
        query = bytes.fromhex("00 1d 1234 0100 0001 0000 0000 0000 01 62 04 6d657368 00 0001 0001")
        query = len(query[2:]).to_bytes(2, "big") + query[2:]

        def seg(who: int, flags: int, payload: bytes = b"", mss: int = 1200) -> bytes:
            fields = Seed().byte(1).byte(who).byte(flags).uint(0, 2).uint(0, 2).uint(65535, 2)
            return fields.byte(0).uint(mss, 2).raw(payload).build()

        exchange = [
            seg(0, SYN),
            seg(0, ACK),
            seg(0, ACK | PSH, query),
            Seed().byte(2).raw(b"\x12\x34\x81\x80" + b"\x00" * 8).build(),
            seg(0, ACK | FIN),
            seg(0, ACK),
        ]
        timers = [seg(2, SYN), Seed().byte(3).uint(300, 2).build(), seg(2, ACK),
                  seg(2, ACK | PSH, query[:5]), Seed().byte(3).uint(20000, 2).build()]  # fmt: skip
        oversized = [seg(1, SYN), seg(1, ACK), seg(1, ACK | PSH, b"\xff\xff" + b"\x00" * 40)]
        raw = [Seed().byte(0).raw(bytes.fromhex("4500002800000000400600000a000001")).build()]
        return [Seed().chunks(chunks).build() for chunks in (exchange, timers, oversized, raw)]
