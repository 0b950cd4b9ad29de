"""The asyncio shell of the port-mapping client (agent.engine.portmap): sockets, HTTP, clock.

    PortMapper.run()       one task: flush() sends what the core produced, re-arms one timer,
                           then waits for a datagram, an HTTP answer, the timer or a re-check of
                           the default gateway (every `gateway_poll` seconds)
    datagram_received      -> core.receive_udp (garbage: one debug line, counted, dropped)
    one task per HTTP      connect, send, read at most the exchange's bound within its timeout
                           -> core.receive_http / core.http_failed
    PortMapper.close()     core.stop(): delete the mapping, wait for the answer (bounded)

One UDP socket bound to our LAN address (any port) carries NAT-PMP and PCP to gateway:5351 and
the SSDP M-SEARCH to 239.255.255.250:1900 (multicast TTL 2); the answers come back to it. The
default gateway comes from /proc/net/route; our address toward it from a connected UDP socket.
A second socket, bound to 224.0.0.1:5350 (SO_REUSEADDR: other clients on the host may listen
too) and a member of that group on our LAN address, hears the gateway's announcements
(NAT-PMP address changes, PCP unsolicited ANNOUNCE) -> core.receive_announcement; when it
cannot be bound the client still notices a restart at its next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog

from agent.engine.portmap import (
    HttpRequest,
    Mapping,
    MappingChanged,
    MappingLost,
    PortmapClient,
    PortmapConfig,
    PortmapEvent,
    ProbeDone,
    Protocol,
)
from agent.proto.errors import RemoteProtocolError
from agent.proto.portmap import announce

__all__ = ["PortMapper", "default_gateway", "local_address_toward"]

READ_CHUNK: Final = 4096
ROUTE_FILE: Final = Path("/proc/net/route")


def default_gateway(route_file: Path = ROUTE_FILE) -> str | None:
    """The IPv4 default gateway with the lowest metric, from /proc/net/route; None if none."""
    try:
        lines = route_file.read_text().splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        f = line.split()
        if len(f) < 8 or f[1] != "00000000" or f[7] != "00000000":  # default route only
            continue
        flags = int(f[3], 16)
        if not flags & 0x2:  # RTF_GATEWAY
            continue
        gw = socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
        metric = int(f[6])
        if best is None or metric < best[0]:
            best = (metric, gw)
    return best[1] if best else None


def local_address_toward(gateway: str) -> str | None:
    """Our source address for packets to `gateway` (a connected UDP socket sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((gateway, 5351))
            addr: str = s.getsockname()[0]
            return addr
    except OSError:
        return None


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: PortMapper, *, announcements: bool = False) -> None:
        self.owner = owner
        self.announcements = announcements

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.owner._on_datagram(data, (str(addr[0]), int(str(addr[1]))), self.announcements)

    def error_received(self, exc: Exception) -> None:
        self.owner._log.debug("portmap.udp_error", error=str(exc))


class PortMapper:
    """Keeps a mapping of `config.internal_port` on the default gateway while `run()` runs.

    Owned by the task running `run()`; `mapping`, `available` and `on_event` are read by the
    daemon (agent status / netcheck, DISCO candidates)."""

    def __init__(
        self,
        config: PortmapConfig,
        *,
        on_event: Callable[[PortmapEvent], None] | None = None,
        gateway: Callable[[], str | None] = default_gateway,
        local_address: Callable[[str], str | None] = local_address_toward,
        gateway_poll: float = 30.0,
        log: structlog.typing.FilteringBoundLogger | None = None,
        announcements: bool = True,
    ) -> None:
        self.core = PortmapClient(config)
        self._listen_announcements = announcements  # hear 224.0.0.1:5350
        self._on_event = on_event
        self._gateway = gateway
        self._local_address = local_address
        self._gateway_poll = gateway_poll
        self._log: structlog.typing.FilteringBoundLogger = log or structlog.get_logger("portmap")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._announce: asyncio.DatagramTransport | None = None
        self._bound: str | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.drops = 0

    @property
    def mapping(self) -> Mapping | None:
        """The external endpoint currently mapped to our port (a DISCO candidate), or None."""
        return self.core.mapping

    @property
    def available(self) -> frozenset[Protocol]:
        """What the last probe found (`agent netcheck`: "port mapping: upnp, pmp, pcp")."""
        return self.core.available

    async def run(self) -> None:
        """Map and keep the mapping until cancelled (then `close()` deletes it)."""
        self._loop = asyncio.get_running_loop()
        try:
            next_poll = 0.0
            while not self.core.stopped:
                now = self._loop.time()
                if now >= next_poll:
                    await self._poll_gateway(now)
                    next_poll = now + self._gateway_poll
                self._flush()
                deadline = self.core.next_deadline()
                wait = next_poll - now if deadline is None else min(deadline, next_poll) - now
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.0))
                self.core.on_timer(self._loop.time())
        finally:
            self._close_socket()

    async def close(self, within: float = 2.0) -> None:
        """Delete the mapping on the router (bounded by `within` seconds) and stop `run()`."""
        loop = self._loop or asyncio.get_running_loop()
        self.core.stop(loop.time())
        self._flush()
        end = loop.time() + within
        while not self.core.stopped and loop.time() < end:
            self._wake.clear()
            deadline = self.core.next_deadline() or end
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), timeout=max(min(deadline, end) - loop.time(), 0)
                )
            self.core.on_timer(loop.time())
            self._flush()
        for task in list(self._tasks):
            task.cancel()
        self._close_socket()
        self._wake.set()

    # --- internals -------------------------------------------------------------------------

    async def _poll_gateway(self, now: float) -> None:
        gw = self._gateway()
        local = self._local_address(gw) if gw else None
        if local != self._bound:
            self._close_socket()
            if local is not None:
                await self._open_socket(local)
        self.core.set_network(gw, local if self._transport else None, now)

    async def _open_socket(self, local: str) -> None:
        assert self._loop is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
            sock.bind((local, 0))
            sock.setblocking(False)
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _Datagrams(self), sock=sock
            )
        except OSError as e:
            sock.close()
            self._log.info("portmap.socket_failed", local=local, error=str(e))
            return
        self._transport = transport
        self._bound = local
        if self._listen_announcements:
            await self._open_announce_socket(local)

    async def _open_announce_socket(self, local: str) -> None:
        assert self._loop is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((announce.MULTICAST_ADDR, announce.PORT))
            group = socket.inet_aton(announce.MULTICAST_ADDR) + socket.inet_aton(local)
            with contextlib.suppress(OSError):  # the host is in the all-hosts group anyway
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
            sock.setblocking(False)
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _Datagrams(self, announcements=True), sock=sock
            )
        except OSError as e:
            sock.close()
            self._log.info("portmap.announce_socket_failed", error=str(e))
            return
        self._announce = transport

    def _close_socket(self) -> None:
        for transport in (self._transport, self._announce):
            if transport is not None:
                transport.close()
        self._transport, self._announce, self._bound = None, None, None

    def _on_datagram(self, data: bytes, src: tuple[str, int], announcement: bool = False) -> None:
        assert self._loop is not None
        try:
            if announcement:
                self.core.receive_announcement(data, src, self._loop.time())
                self._log.info("portmap.announcement", gateway=src[0])
            else:
                self.core.receive_udp(data, src, self._loop.time())
        except RemoteProtocolError as e:
            self.drops += 1
            self._log.debug("portmap.dropped", src=f"{src[0]}:{src[1]}", error=str(e))
        self._flush()
        self._wake.set()

    def _flush(self) -> None:
        """Send what the core produced, start its HTTP exchanges, hand out its events."""
        for data, dest in self.core.datagrams_to_send():
            if self._transport is not None:
                self._transport.sendto(data, dest)
        for req in self.core.http_requests():
            task = asyncio.get_running_loop().create_task(self._http(req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for event in self.core.events():
            self._report(event)

    def _report(self, event: PortmapEvent) -> None:
        match event:
            case ProbeDone(available=avail, gateway=gw):
                names = ", ".join(sorted(p.value for p in avail)) or "none"
                self._log.info("portmap.probe", gateway=gw, available=names)
            case MappingChanged(mapping=m):
                ext = f"{m.external[0]}:{m.external[1]}"
                self._log.info(
                    "portmap.mapped", protocol=m.protocol.value, external=ext,
                    internal_port=m.internal_port, lifetime=m.lifetime,
                )  # fmt: skip
            case MappingLost(protocol=p, external=ext, reason=why):
                self._log.info(
                    "portmap.lost", protocol=p.value, external=f"{ext[0]}:{ext[1]}", reason=why
                )
        if self._on_event is not None:
            self._on_event(event)

    async def _http(self, req: HttpRequest) -> None:
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(req.timeout):
                reader, writer = await asyncio.open_connection(
                    req.host, req.port, local_addr=(self._bound, 0) if self._bound else None
                )
                writer.write(req.exchange.request_bytes())
                await writer.drain()
                while True:
                    chunk = await reader.read(READ_CHUNK)
                    done = req.exchange.receive_eof() if not chunk else (
                        req.exchange.receive_data(chunk)
                    )  # fmt: skip
                    if done or not chunk:
                        break
            self.core.receive_http(req.id, req.exchange.response(), loop.time())
        except (OSError, TimeoutError, RemoteProtocolError) as e:
            self._log.debug("portmap.http_failed", host=req.host, port=req.port, error=str(e))
            self.core.http_failed(req.id, f"{type(e).__name__}: {e}", loop.time())
        finally:
            if writer is not None:
                writer.close()
        self._flush()
        self._wake.set()
