"""The agent's DERP client: a TLS connection per region carrying WireGuard datagrams.

    DerpClients                      one per daemon; the regions of the config's DERP map
      home region                    connected from the start, kept connected (NotePreferred)
      other regions                  connected on demand (a peer's region), closed when idle
      RegionLink (one per region)    agent.netio.derp_dial (TLS, `GET /derp`, 101) ->
                                     DerpClientConn (sans-I/O)
                                     reconnect with exponential backoff and jitter, trying
                                     the region's nodes in turn

Packets from peers are delivered in batches: everything one TLS read produced, grouped by the
sending key, in one `on_packets(region, src_key, packets)` call; the daemon hands each group to
the WireGuard core with the pseudo-endpoint `derp_endpoint(region)`. While a link is still
connecting, a bounded number of datagrams wait for it (oldest dropped first); a link whose
write buffer is over MAX_WRITE_BUFFER drops new datagrams (WireGuard and TCP inside recover):
every drop is counted, nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

from agent.config import DerpConfig, DerpNode, DerpRegion
from agent.keys import NodePrivate, NodePublic
from agent.log import get_logger
from agent.netio.derp_dial import UpgradeFailed, dial_derp, tls_client_context
from agent.proto.derp.client import (
    Closed,
    Connected,
    DerpClientConn,
    HealthChanged,
    PacketReceived,
    PeerGoneEvent,
    ServerRestarting,
)
from agent.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "BACKOFF_MAX",
    "IDLE_TIMEOUT",
    "DerpClients",
    "DerpLinkStats",
    "RegionLink",
    "backoff_delay",
    "ssl_context",
]

log = get_logger("agent.derp")

BACKOFF_BASE: Final = 0.25  # first retry delay, seconds
BACKOFF_MAX: Final = 3.0  # cap: a restarted relay is back in use within a few seconds
IDLE_TIMEOUT: Final = 60.0  # a non-home region with no traffic this long is closed
IDLE_CHECK: Final = 10.0
MAX_PENDING: Final = 256  # datagrams waiting for a link to come up
MAX_WRITE_BUFFER: Final = 512 * 1024  # shallow: deep queues here inflate TCP's RTT

PacketsHandler = Callable[[int, NodePublic, list[bytes]], None]


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Delay before reconnect attempt `attempt` (0-based): doubling from BACKOFF_BASE up to
    BACKOFF_MAX, times a jitter factor in [0.5, 1) so many clients do not reconnect in step."""
    base = min(BACKOFF_BASE * (2**attempt), BACKOFF_MAX)
    return float(base * (0.5 + rand() / 2))


@dataclass(slots=True)
class DerpLinkStats:
    connects: int = 0
    connect_failures: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    dropped_not_connected: int = 0
    dropped_congested: int = 0
    protocol_errors: int = 0


class _LinkProtocol(asyncio.Protocol):
    """Bytes of one upgraded connection (agent.netio.derp_dial) -> the link's DERP client."""

    def __init__(self, link: RegionLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.link.on_upgraded()

    def data_received(self, data: bytes) -> None:
        self.link.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)
        self.link.on_lost(str(exc) if exc else "connection closed")


class RegionLink:
    """The connection to one DERP region, reconnecting by itself until `close()`."""

    def __init__(
        self,
        region: DerpRegion,
        private_key: NodePrivate,
        on_packets: PacketsHandler,
        *,
        preferred: bool = False,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.region = region
        self.private_key = private_key
        self.on_packets = on_packets
        self.on_change = on_change
        self.preferred = preferred
        self.stats = DerpLinkStats()
        self.conn: DerpClientConn | None = None
        self.connected = False
        self.last_used = 0.0
        self.last_heard: float | None = None  # loop time of the latest frame from the relay
        self.server_key: bytes | None = None
        self._proto: _LinkProtocol | None = None
        self._pending: deque[tuple[NodePublic, bytes]] = deque(maxlen=MAX_PENDING)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._node_index = 0
        self._attempt = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._loop = asyncio.get_running_loop()
            self.last_used = self._loop.time()
            self._task = self._loop.create_task(self._run(), name=f"derp-{self.region.id}")

    async def close(self) -> None:
        self._closed = True
        self._drop_transport("closed locally")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._closed:
            node = self.region.nodes[self._node_index % len(self.region.nodes)]
            self._node_index += 1
            try:
                await self._connect(node)
            except UpgradeFailed as exc:
                log.warning("derp upgrade failed", region=self.region.id, reason=str(exc))
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self.stats.connect_failures += 1
                log.info(
                    "derp connect failed",
                    region=self.region.id,
                    node=f"{node.host}:{node.port}",
                    error=str(exc) or type(exc).__name__,
                )
            else:
                proto = self._proto
                assert proto is not None
                await proto.lost
            self._set_disconnected()
            if self.closed:
                return
            delay = backoff_delay(self._attempt)
            self._attempt += 1
            await asyncio.sleep(delay)

    async def _connect(self, node: DerpNode) -> None:
        upgraded = await dial_derp(node.host, node.port, ssl_context=ssl_context(node))
        proto = _LinkProtocol(self)
        self._proto = proto
        upgraded.attach(proto)

    # --- from the protocol ----------------------------------------------------------------------

    def on_upgraded(self) -> None:
        loop = self._loop
        assert loop is not None
        conn = DerpClientConn(self.private_key.raw)
        self.conn = conn
        conn.connection_made(loop.time())
        self._arm_timer()

    def on_data(self, data: bytes) -> None:
        conn, loop = self.conn, self._loop
        if conn is None or loop is None:
            return
        self.last_heard = loop.time()
        try:
            conn.receive_data(data, loop.time())
        except RemoteProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("derp protocol error", region=self.region.id, error=str(exc))
        self._after_conn_activity()

    def _after_conn_activity(self) -> None:
        conn = self.conn
        if conn is None:
            return
        groups: dict[bytes, list[bytes]] = {}
        for event in conn.events():
            if isinstance(event, PacketReceived):
                groups.setdefault(event.src, []).append(event.packet)
            elif isinstance(event, Connected):
                self._on_connected(event.server_key)
            elif isinstance(event, Closed):
                log.info("derp connection closed", region=self.region.id, reason=event.reason)
                self._drop_transport(event.reason)
            elif isinstance(event, PeerGoneEvent):
                log.debug("derp peer gone", region=self.region.id, reason=event.reason)
            elif isinstance(event, HealthChanged):
                log.info("derp health", region=self.region.id, text=event.text or "ok")
            elif isinstance(event, ServerRestarting):
                log.info("derp relay restarting", region=self.region.id)
        self._write_out()
        if groups:
            if self._loop is not None:
                self.last_used = self._loop.time()
            stats = self.stats
            for src, packets in groups.items():
                stats.rx_packets += len(packets)
                stats.rx_bytes += sum(map(len, packets))
                self.on_packets(self.region.id, NodePublic(src), packets)
        self._arm_timer()

    def _on_connected(self, server_key: bytes) -> None:
        conn, loop = self.conn, self._loop
        assert conn is not None
        assert loop is not None
        self.connected = True
        self.server_key = server_key
        self._attempt = 0
        self.stats.connects += 1
        if self.preferred:
            conn.note_preferred(True)
        log.info("derp connected", region=self.region.id, code=self.region.code)
        pending, self._pending = self._pending, deque(maxlen=MAX_PENDING)
        now = loop.time()
        for key, data in pending:
            self._send_one(conn, key, data, now)
        self.on_change()

    def on_lost(self, reason: str) -> None:
        if self.connected:
            log.info("derp disconnected", region=self.region.id, reason=reason)
        self._set_disconnected()

    # --- sending --------------------------------------------------------------------------------

    def send(self, dst: NodePublic, datagrams: Sequence[bytes | bytearray]) -> int:
        """Queue datagrams for `dst`; returns how many were dropped."""
        loop = self._loop
        if loop is not None:
            self.last_used = loop.time()
        conn = self.conn
        if not self.connected or conn is None or loop is None:
            if self._closed:
                self.stats.dropped_not_connected += len(datagrams)
                return len(datagrams)
            overflow = max(0, len(self._pending) + len(datagrams) - MAX_PENDING)
            self.stats.dropped_not_connected += overflow
            self._pending.extend((dst, bytes(d)) for d in datagrams)
            return overflow
        proto = self._proto
        transport = proto.transport if proto is not None else None
        if transport is None or transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.stats.dropped_congested += len(datagrams)
            return len(datagrams)
        now = loop.time()
        for d in datagrams:
            self._send_one(conn, dst, d, now)
        self._write_out()
        return 0

    def set_preferred(self, preferred: bool) -> None:
        """Tell the relay whether this is our home region (NotePreferred), now or on connect."""
        if preferred == self.preferred:
            return
        self.preferred = preferred
        conn = self.conn
        if self.connected and conn is not None:
            conn.note_preferred(preferred)
            self._write_out()

    def _send_one(
        self, conn: DerpClientConn, dst: NodePublic, data: bytes | bytearray, now: float
    ) -> None:
        try:
            conn.send_packet(dst.raw, bytes(data), now)
        except LocalProtocolError:
            self.stats.dropped_not_connected += 1
            return
        self.stats.tx_packets += 1
        self.stats.tx_bytes += len(data)

    def _write_out(self) -> None:
        conn, proto = self.conn, self._proto
        if conn is None:
            return
        out = conn.data_to_send()
        if out and proto is not None and proto.transport is not None:
            proto.transport.write(out)

    # --- internals ------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        conn, loop = self.conn, self._loop
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if conn is None or loop is None:
            return
        deadline = conn.next_deadline()
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        conn, loop = self.conn, self._loop
        if conn is None or loop is None:
            return
        conn.on_timer(loop.time())
        self._after_conn_activity()

    def _drop_transport(self, reason: str) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.abort()
        self._set_disconnected()

    def _set_disconnected(self) -> None:
        was = self.connected
        self.connected = False
        self.conn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if was:
            self.on_change()


def ssl_context(node: DerpNode) -> ssl.SSLContext:
    """The TLS client context for a DERP node: its CA file or the system store; no
    verification at all only with `insecure_skip_verify` (labs)."""
    return tls_client_context(node.ca_file, insecure=node.insecure_skip_verify)


class DerpClients:
    """The links to every region we use: the home region always, others while in use."""

    def __init__(
        self,
        derp: DerpConfig,
        private_key: NodePrivate,
        on_packets: PacketsHandler,
        *,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.regions = {r.id: r for r in derp.regions}
        self.private_key = private_key
        self.on_packets = on_packets
        self.on_change = on_change
        # Until latency-based choice exists, the pinned home region or the first one listed.
        self.home_region: int | None = derp.home_region
        if self.home_region is None and derp.regions:
            self.home_region = derp.regions[0].id
        self.links: dict[int, RegionLink] = {}
        self._idle_task: asyncio.Task[None] | None = None
        self._closing: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for region in self.regions.values():
            if any(n.insecure_skip_verify for n in region.nodes):
                log.warning(
                    "derp TLS verification is OFF for this region (labs only)", region=region.id
                )
        if self.home_region is not None:
            self._link(self.home_region)
        self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop())

    async def close(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        for link in list(self.links.values()):
            await link.close()
        self.links.clear()
        for task in self._closing:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _link(self, region_id: int) -> RegionLink | None:
        link = self.links.get(region_id)
        if link is None:
            region = self.regions.get(region_id)
            if region is None or not region.nodes:
                return None
            link = RegionLink(
                region,
                self.private_key,
                self.on_packets,
                preferred=region_id == self.home_region,
                on_change=self.on_change,
            )
            self.links[region_id] = link
            link.start()
        return link

    def send(self, region_id: int, dst: NodePublic, datagrams: Sequence[bytes | bytearray]) -> int:
        """Send through `region_id` (connecting to it on demand); returns how many dropped."""
        link = self._link(region_id)
        if link is None:
            return len(datagrams)
        return link.send(dst, datagrams)

    def set_home(self, region_id: int) -> None:
        """Move the home region (netcheck chose another): connect to it and mark it preferred;
        the old home becomes an ordinary region, closed once idle."""
        if region_id == self.home_region or region_id not in self.regions:
            return
        old = self.links.get(self.home_region) if self.home_region is not None else None
        self.home_region = region_id
        if old is not None:
            old.set_preferred(False)
        link = self._link(region_id)
        if link is not None:
            link.set_preferred(True)
        log.info("derp home region", region=region_id)
        self.on_change()

    def last_heard(self) -> dict[int, float]:
        """Per connected region, the loop time a frame last came from its relay."""
        return {
            rid: link.last_heard
            for rid, link in self.links.items()
            if link.connected and link.last_heard is not None
        }

    def connected_regions(self) -> tuple[int, ...]:
        return tuple(sorted(rid for rid, link in self.links.items() if link.connected))

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for link in self.links.values():
            for name in DerpLinkStats.__slots__:
                total[name] = total.get(name, 0) + getattr(link.stats, name)
        return total

    async def _idle_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(IDLE_CHECK)
            now = loop.time()
            for rid, link in list(self.links.items()):
                if rid != self.home_region and now - link.last_used > IDLE_TIMEOUT:
                    log.info("derp region idle, closing", region=rid)
                    del self.links[rid]
                    self._closing.append(loop.create_task(link.close()))
                    self.on_change()
            self._closing = [t for t in self._closing if not t.done()]
