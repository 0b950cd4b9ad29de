"""DnsTcp (node/dns_tcp.py): TCP packets from the TUN answered from the names, or forwarded to a
stub upstream on loopback and answered later (a large answer in several segments); the timer
retransmits; close resets what is open."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence

import dns.message
import pytest

from agent.engine.dns_tcp import TcpLimits
from agent.engine.tcp_segment import ACK, FIN, PSH, RST, SYN, Segment, build_segment, parse_segment
from agent.node.dns_server import DnsServer
from agent.node.dns_tcp import DnsTcp
from agent.proto.dns.names import SERVICE_V4

from .test_dns_server import CLIENT, TABLE, upstream  # noqa: F401 -- the fixture

_M = 0xFFFFFFFF


class Conn:
    """One client connection driven by hand through DnsTcp.handle_packet."""

    def __init__(self, tcp: DnsTcp, sport: int = 40001) -> None:
        self.tcp, self.sport = tcp, sport
        self.seq, self.ack = 5000, 0

    def send(self, flags: int, payload: bytes = b"") -> list[Segment]:
        packet = build_segment(
            CLIENT, self.sport, SERVICE_V4, 53,
            seq=self.seq, ack=self.ack, flags=flags, window=65535, payload=payload,
            mss=1240 if flags & SYN else None,
        )  # fmt: skip
        self.seq = (self.seq + len(payload) + (1 if flags & (SYN | FIN) else 0)) & _M
        return [parse_segment(p) for p in self.tcp.handle_packet(packet)]

    def connect(self) -> None:
        (syn_ack,) = self.send(SYN)
        self.ack = (syn_ack.seq + 1) & _M
        assert self.send(ACK) == []

    def ask(self, name: str) -> tuple[int, list[Segment]]:
        query = dns.message.make_query(name, "A")
        wire = query.to_wire()
        return query.id, self.send(ACK | PSH, struct.pack("!H", len(wire)) + wire)


def message(segments: Sequence[Segment]) -> dns.message.Message:
    data = b"".join(s.payload for s in segments)
    (size,) = struct.unpack("!H", data[:2])
    assert len(data) == 2 + size
    return dns.message.from_wire(data[2:])


@pytest.mark.asyncio
async def test_local_names_at_once_forwarded_names_later_in_segments(
    upstream: tuple[str, int],  # noqa: F811
) -> None:
    written: asyncio.Queue[bytes] = asyncio.Queue()

    def write(packets: Sequence[bytes]) -> None:
        for p in packets:
            written.put_nowait(p)

    async with DnsServer(TABLE, [upstream]) as server:
        tcp = DnsTcp(server, write, TcpLimits(mtu=1280))
        c = Conn(tcp)
        c.connect()
        qid, out = c.ask("laptop.mesh.internal")
        ack, data = out  # the ACK of the query, then the answer, in one batch
        assert (ack.flags, data.flags) == (ACK, ACK | PSH)
        answer = message([data])
        assert answer.id == qid
        assert answer.answer[0][0].to_text() == "100.64.0.7"
        c.ack = (c.ack + len(data.payload)) & _M
        assert c.send(ACK) == []

        # too big for UDP upstream: asked again over TCP there, delivered here in segments
        qid, out = c.ask("big.example")
        assert [s.flags for s in out] == [ACK]
        first = parse_segment(await asyncio.wait_for(written.get(), 5))
        segments = [first]
        while not written.empty():
            segments.append(parse_segment(written.get_nowait()))
        assert len(segments) >= 2
        assert all(len(s.payload) <= 1240 for s in segments)
        answer = message(segments)
        assert answer.id == qid
        assert len(answer.answer[0]) == 80
        c.ack = (segments[-1].seq + len(segments[-1].payload)) & _M
        (fin,) = c.send(FIN | ACK)
        assert fin.flags == FIN | ACK
        c.ack = (c.ack + 1) & _M
        assert c.send(ACK) == []
        stats = tcp.stats()
        assert (stats["tcp_queries"], stats["tcp_answers"], stats["tcp_connections"]) == (2, 2, 0)
        tcp.close()


@pytest.mark.asyncio
async def test_the_timer_retransmits_and_close_resets() -> None:
    written: list[bytes] = []
    async with DnsServer(TABLE, []) as server:
        tcp = DnsTcp(server, written.extend, TcpLimits(rto=0.01))
        c = Conn(tcp)
        c.connect()
        _, (_, data) = c.ask("laptop")
        await asyncio.sleep(0.05)  # the answer is never acknowledged
        again = [parse_segment(p) for p in written]
        assert again
        assert all(s.payload == data.payload for s in again)
        written.clear()
        tcp.close()
        (rst,) = [parse_segment(p) for p in written]
        assert rst.flags & RST
        assert tcp.core.next_deadline() is None
