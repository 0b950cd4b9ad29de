"""The DNS service's asyncio shell: TUN packets in, answers out, other names sent upstream.

    data plane: packet from TUN to 100.100.100.100:53 / [fd7a:115c:a1e0::53]:53
        │ DnsServer.handle_tun_packet(packet) ──► reply packet (write it to the TUN)
        │                                    └─► None: dropped, or forwarded upstream
        ▼
    Responder (proto.dns) ── Forward ──► ForwardTable.start ──► UDP to the upstream
                                                  ▲                 │ TC: same query over TCP
    upstream answers ─────────────────────────────┘ ◄───────────────┘
        └─► the answer packet goes to `write_tun` (callback given by the data plane)

Everything runs on the event loop; `handle_tun_packet` never blocks and never raises for
hostile input. Forwarding is bounded by the `ForwardTable` (concurrent queries, one timeout,
SERVFAIL on expiry) and one `loop.call_at` timer re-armed after every change. Upstreams are
the resolvers the system had before us (`system_upstreams`); when one times out the next one
is used for later queries.

DNS over TCP from the TUN is node/dns_tcp.py: its queries come to `handle_query` too.
`serve_sockets` answers on ordinary UDP and TCP sockets with the same responder, for a setup
where the service address is assigned to a local interface; the daemon does not use it (why:
engine/dns_tcp.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Final, Literal, cast

import structlog

from agent.engine.dns_packets import BadServicePacket, UdpDatagram, parse_udp, reply_packet
from agent.proto.dns.forwarding import ForwardLimits, ForwardTable, RetryOverTcp, Sent, ToClient
from agent.proto.dns.names import SERVICE_V4, SERVICE_V6, IPAddress
from agent.proto.dns.responder import (
    DNS_PORT,
    Dropped,
    Forward,
    NameTable,
    Reply,
    Responder,
    ResponderConfig,
    Transport,
)

__all__ = [
    "Upstream",
    "Client",
    "DnsServer",
    "Later",
    "LATER",
    "parse_resolv_conf",
    "system_upstreams",
    "RESOLV_CONF",
    "RESOLVED_UPSTREAM_CONF",
]

RESOLV_CONF: Final = Path("/etc/resolv.conf")
# resolved's list of the real upstreams, kept up to date next to its 127.0.0.53 stub file.
RESOLVED_UPSTREAM_CONF: Final = Path("/run/systemd/resolve/resolv.conf")
_STUBS: Final = frozenset(
    ipaddress.ip_address(a) for a in ("127.0.0.53", "127.0.0.54", str(SERVICE_V4), str(SERVICE_V6))
)
MAX_TCP_CLIENTS: Final = 64
TCP_IDLE: Final = 10.0  # seconds a TCP client may stay silent (RFC 7766 suggests ~10 s)

Upstream = tuple[str, int]  # (address, port) as the sockets use it
Client = Callable[[bytes], object]  # sends one answer to the client that asked

log = structlog.get_logger("agent.dns")


class Later(Enum):
    """`handle_query`'s answer is not ready: it went upstream and reaches the client later."""

    LATER = "later"


LATER: Final = Later.LATER


def parse_resolv_conf(text: str) -> list[IPAddress]:
    """The `nameserver` addresses of a resolv.conf, in order (scope ids dropped)."""
    out: list[IPAddress] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_address(fields[1].split("%", 1)[0]))
    return out


def system_upstreams(
    resolv_conf: Path = RESOLV_CONF, resolved_conf: Path = RESOLVED_UPSTREAM_CONF
) -> list[IPAddress]:
    """The resolvers the system had before us: resolv.conf's, or resolved's when that is the
    127.0.0.53 stub; never the stub or our own service addresses (a loop)."""

    def read(path: Path) -> list[IPAddress]:
        try:
            return parse_resolv_conf(path.read_text())
        except OSError:
            return []

    servers = read(resolv_conf)
    if not servers or all(s in _STUBS for s in servers):
        servers = read(resolved_conf)
    return [s for s in dict.fromkeys(servers) if s not in _STUBS]


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.server.on_upstream_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.server.counters["upstream_send_error"] += 1


class DnsServer:
    """The responder, the forwarding table and the upstream sockets of one agent.

    Owned by the daemon's event loop; `table` may be replaced between calls (netmap update).
    """

    def __init__(
        self,
        table: NameTable | None = None,
        upstreams: Iterable[IPAddress | Upstream] = (),
        *,
        write_tun: Callable[[bytes], object] | None = None,
        config: ResponderConfig | None = None,
        limits: ForwardLimits | None = None,
    ) -> None:
        self.responder = Responder(table, config)
        self.forwards: ForwardTable[Client] = ForwardTable(
            limits, udp_payload=self.responder.config.udp_payload
        )
        self.upstreams: list[Upstream] = [
            u if isinstance(u, tuple) else (str(u), DNS_PORT) for u in upstreams
        ]
        self.write_tun = write_tun
        self.counters: Counter[str] = Counter()
        self._current = 0  # index of the upstream new queries go to
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tcp_slots = asyncio.Semaphore(MAX_TCP_CLIENTS)
        self._listeners: list[asyncio.BaseTransport | asyncio.AbstractServer] = []

    # ------------------------------------------------------------------------------ state

    @property
    def table(self) -> NameTable:
        return self.responder.table

    @table.setter
    def table(self, table: NameTable) -> None:
        self.responder.table = table

    def stats(self) -> dict[str, int]:
        """Every counter: answers by rcode, drops by DnsDrop, forwarding, upstream errors."""
        merged = Counter(self.counters)
        merged.update(self.responder.counters)
        merged.update({f"forward_{k}": v for k, v in self.forwards.counters.items()})
        return dict(sorted(merged.items()))

    async def start(self) -> None:
        """Open the upstream sockets (one per address family in use)."""
        self._loop = asyncio.get_running_loop()
        for family in {6 if ":" in host else 4 for host, _ in self.upstreams}:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self),
                local_addr=("::" if family == 6 else "0.0.0.0", 0),
            )
            self._transports[family] = transport

    async def close(self) -> None:
        """SERVFAIL whatever is outstanding, stop the timer, close sockets and TCP tasks."""
        self._deliver(self.forwards.clear())
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------ inputs

    def handle_tun_packet(self, packet: bytes | bytearray | memoryview) -> bytes | None:
        """The reply packet for a query packet read from the TUN; None when there is none now
        (dropped and counted, or forwarded: that answer goes to `write_tun` later)."""
        try:
            datagram = parse_udp(packet)
        except BadServicePacket as e:
            self.counters[f"drop_{e.drop}"] += 1
            return None
        wire = self.handle_query(datagram.payload, Transport.UDP, self._tun_client(datagram))
        return reply_packet(datagram, wire) if isinstance(wire, bytes) else None

    def _tun_client(self, datagram: UdpDatagram) -> Client:
        def send(wire: bytes) -> None:
            if self.write_tun is None:
                self.counters["drop_no_tun_writer"] += 1
                return
            self.write_tun(reply_packet(datagram, wire))

        return send

    def handle_query(
        self, data: bytes, transport: Transport, client: Client
    ) -> bytes | Literal[Later.LATER] | None:
        """The answer to send now; None when dropped; LATER when forwarded (`client` gets the
        answer, or SERVFAIL at the deadline)."""
        verdict = self.responder.respond(data, transport)
        if isinstance(verdict, Reply):
            return verdict.wire
        if isinstance(verdict, Dropped):
            return None
        return self._forward(verdict, client)

    def _forward(self, forward: Forward, client: Client) -> bytes | Literal[Later.LATER]:
        upstream = self.upstreams[self._current] if self.upstreams else None
        if upstream is not None and self._transports.get(_family(upstream)) is None:
            upstream = None  # not started, or no socket for that family
        started = self.forwards.start(forward, client, upstream, self._now())
        if isinstance(started, ToClient):
            return started.wire
        assert upstream is not None
        self._send_upstream(started, upstream)
        self._rearm()
        return LATER

    def _send_upstream(self, sent: Sent, upstream: Upstream) -> None:
        self._transports[_family(upstream)].sendto(sent.wire, upstream)

    def on_upstream_datagram(self, data: bytes, source: Upstream) -> None:
        """An upstream's UDP answer: to its client, or over TCP again when truncated."""
        self._on_answer(data, source, via_tcp=False)

    def _on_answer(self, data: bytes, source: Upstream, *, via_tcp: bool) -> None:
        result = self.forwards.receive(data, source, self._now(), via_tcp=via_tcp)
        if isinstance(result, ToClient):
            self._deliver([result])
        elif isinstance(result, RetryOverTcp):
            task = asyncio.get_running_loop().create_task(self._retry_tcp(result, source))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._rearm()

    async def _retry_tcp(self, retry: RetryOverTcp, upstream: Upstream) -> None:
        """Ask `upstream` again over TCP; the table's deadline bounds it (expiry: SERVFAIL)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout_at(retry.deadline):
                reader, writer = await asyncio.open_connection(*upstream)
                writer.write(struct.pack("!H", len(retry.wire)) + retry.wire)
                await writer.drain()
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                answer = await reader.readexactly(size)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            self.counters["upstream_tcp_error"] += 1
            return  # the entry stays until its deadline: the client gets SERVFAIL then
        finally:
            if writer is not None:
                writer.close()
        self._on_answer(answer, upstream, via_tcp=True)

    # ------------------------------------------------------------------------------ timer

    def _now(self) -> float:
        return (self._loop or asyncio.get_running_loop()).time()

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.forwards.next_deadline()
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        expired = self.forwards.on_timer(self._now())
        if expired and len(self.upstreams) > 1:
            self._current = (self._current + 1) % len(self.upstreams)
            log.info("dns_upstream_failover", upstream=self.upstreams[self._current][0])
        self._deliver(expired)
        self._rearm()

    def _deliver(self, answers: Sequence[ToClient[Client]]) -> None:
        for answer in answers:
            answer.client(answer.wire)

    # ------------------------------------------------------------------------------ sockets

    async def serve_sockets(self, host: str, port: int = DNS_PORT) -> None:
        """Answer on UDP and TCP sockets bound to `host`:`port`, until `close`."""
        loop = asyncio.get_running_loop()
        server = self

        class _Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                def send(wire: bytes) -> None:
                    self.transport.sendto(wire, addr)

                wire = server.handle_query(data, Transport.UDP, send)
                if isinstance(wire, bytes):
                    send(wire)

        udp, _ = await loop.create_datagram_endpoint(_Udp, local_addr=(host, port))
        self._listeners.append(udp)
        self._listeners.append(await asyncio.start_server(self._tcp_client, host, port))

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_slots.locked():
            self.counters["drop_tcp_clients"] += 1
            writer.close()
            return
        async with self._tcp_slots:
            try:
                while True:
                    async with asyncio.timeout(TCP_IDLE):
                        head = await reader.readexactly(2)
                        body = await reader.readexactly(struct.unpack("!H", head)[0])
                    answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

                    def send(wire: bytes, fut: asyncio.Future[bytes] = answered) -> None:
                        if not fut.done():
                            fut.set_result(wire)

                    wire = self.handle_query(head + body, Transport.TCP, send)
                    if wire is LATER:
                        wire = await answered  # the table answers or SERVFAILs by its deadline
                    if wire is None:
                        break
                    writer.write(wire)
                    await writer.drain()
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()


def _family(upstream: Upstream) -> int:
    return 6 if ":" in upstream[0] else 4
