"""DNS over TCP from the TUN: the TCP responder (engine/dns_tcp.py) on the event loop.

    DnsService._drain ── TCP packet to a service address ──► DnsTcp.handle_packet
        TcpResponder.receive ──► packets (ACK, SYN-ACK, RST) + whole queries
        each query ──► DnsServer.handle_query(Transport.TCP)
            answered now ──► TcpResponder.answer ──► data segments, in the same batch
            forwarded ──► the answer (or SERVFAIL at the forwarding deadline) comes later
                          through the client callback ──► TcpResponder.answer ──► `write`
    one loop timer at TcpResponder.next_deadline() ──► on_timer: retransmissions, probes, RST

Everything runs on the event loop that owns the DNS service; packets go back into the TUN
through the service's writer, in the order the core produced them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

from agent.engine.dns_tcp import ConnId, Output, Query, TcpLimits, TcpResponder
from agent.node.dns_server import DnsServer, Later
from agent.proto.dns.responder import Transport

__all__ = ["DnsTcp"]


class DnsTcp:
    """The TCP side of one node's DNS service."""

    def __init__(
        self,
        server: DnsServer,
        write: Callable[[Sequence[bytes]], None],
        limits: TcpLimits | None = None,
    ) -> None:
        self.server = server
        self.write = write
        self.core = TcpResponder(limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    def handle_packet(self, packet: bytes) -> list[bytes]:
        """Packets to write back for one TCP packet from the TUN (answers made now included)."""
        now = self._now()
        out = self.core.receive(packet, now)
        packets = out.packets + self._serve(out.queries, now)
        self._rearm()
        return packets

    def _serve(self, queries: list[Query], now: float) -> list[bytes]:
        packets: list[bytes] = []
        todo = deque(queries)
        while todo:
            query = todo.popleft()
            wire = self.server.handle_query(
                query.wire, Transport.TCP, partial(self._answered_later, query.conn)
            )
            if isinstance(wire, Later):
                continue
            out: Output = self.core.answer(query.conn, wire, now)
            packets += out.packets
            todo.extend(out.queries)  # the answer freed a slot: queries that waited for it
        return packets

    def _answered_later(self, conn: ConnId, wire: bytes) -> None:
        now = self._now()
        out = self.core.answer(conn, wire, now)
        packets = out.packets + self._serve(out.queries, now)
        if packets:
            self.write(packets)
        self._rearm()

    def _rearm(self) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        packets = self.core.on_timer(self._now())
        if packets:
            self.write(packets)
        self._rearm()

    def stats(self) -> dict[str, int]:
        return {**self.core.counters, "tcp_connections": len(self.core)}

    def close(self) -> None:
        """Reset every connection; no timer left behind."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        packets = self.core.close()
        if packets:
            self.write(packets)
