"""The node's name service: 100.100.100.100 and fd7a:115c:a1e0::53 answered from the TUN.

    open_interface: routes() ──► the two service addresses routed into our TUN
    start(dataplane, tun):
      DnsServer (node/dns_server.py), upstreams from [dns] or the system's resolvers
      dataplane.on_local = on_local ── route miss, UDP to the service :53, or TCP to it?
          │ yes: queued (bounded: QUEUE_MAX, beyond it counted and dropped); True
          ▼
      _drain, once per loop iteration: at most BATCH packets handled, and no more than
          RATE per second (a token bucket of BURST), replies written to the TUN in one go
          (UDP: DnsServer.handle_tun_packet; TCP: DnsTcp, node/dns_tcp.py, whose connections
          are answered by a small TCP endpoint in userspace, engine/dns_tcp.py);
          the rest waits, and the data plane's readers get their turn in between. One
          answer costs ~0.35 ms of dnspython work, so a flood takes at most ~35% of the
          loop and a few ms per iteration: it cannot starve the tunnel
      systemd-resolved: SetLinkDNS + SetLinkDomains(~domain) on our link, or, without it,
          nothing touched and a hint for `agent status`
    on_netmap(netmap | None): self + peers (+ static peers) -> a new NameTable, swapped at once
    close(): RevertLink, sockets closed

Owned by the daemon's event loop, like everything it touches.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Final, Protocol

from agent.config import Config
from agent.engine.dns_names import Host, NameBook, netmap_hosts, static_hosts
from agent.engine.dns_packets import is_service_packet
from agent.engine.dns_tcp import TcpLimits, is_service_tcp
from agent.log import get_logger
from agent.node.dataplane import LocalHandler
from agent.node.dns_server import DnsServer, system_upstreams
from agent.node.dns_tcp import DnsTcp
from agent.node.resolved import ResolvedError, ResolvedLink, ResolvedUnavailable, manual_hint
from agent.proto.coordinator_messages import NetMap
from agent.proto.dns.names import DEFAULT_DOMAIN, SERVICE_V4, SERVICE_V6
from agent.proto.endpoint import format_endpoint
from agent.proto.errors import LocalProtocolError
from agent.proto.offload import Buffer

__all__ = ["DnsService", "QUEUE_MAX", "BATCH", "RATE", "BURST"]

log = get_logger("agent.dns")

QUEUE_MAX: Final = 128  # service packets waiting for an answer; more are dropped and counted
BATCH: Final = 8  # queries answered per event-loop iteration (~3 ms of dnspython work)
RATE: Final = 1000.0  # queries answered per second at most (token bucket)
BURST: Final = 64.0
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class HasLocalHook(Protocol):
    """The data plane, as far as the service uses it (node/dataplane.py)."""

    on_local: LocalHandler | None


class TunWriter(Protocol):
    """The TUN, as far as the service uses it (node/tun.py)."""

    @property
    def name(self) -> str: ...

    def write_packets(self, packets: Sequence[Buffer]) -> int: ...


class DnsService:
    """The DNS responder of one node and what it needs: routes, a queue, resolved."""

    def __init__(
        self, config: Config, hostname: str | None = None, *, use_resolved: bool = True
    ) -> None:
        self.config = config
        self.use_resolved = use_resolved  # False: never talk to systemd-resolved (tests)
        self.enabled = config.dns.enable
        own = config.interface.private_key.public()
        name = (config.control.hostname if config.control else "") or hostname
        self._self = Host(
            own,
            name or socket.gethostname(),
            tuple(a.ip for a in config.interface.addresses),
        )
        self._static = static_hosts((p.public_key, p.name, p.allowed_ips) for p in config.peers)
        self.book = NameBook()
        self.domain = DEFAULT_DOMAIN
        self.server: DnsServer | None = None
        self.tcp: DnsTcp | None = None
        self.counters: Counter[str] = Counter()  # the service's own drops (queue, TUN writes)
        self._queue: deque[bytes] = deque()
        self._scheduled = False
        self._tokens = BURST
        self._refilled = 0.0  # loop time of the last refill
        self._tun: TunWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: ResolvedLink | None = None
        self._ifindex: int | None = None
        self.resolved = "off"  # off | applied | unavailable | failed
        self.hint: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._rebuild(None)

    # -- lifecycle ---------------------------------------------------------------------------
    def routes(self) -> list[IPNetwork]:
        """What the TUN must route to us: the two service addresses (none when disabled)."""
        if not self.enabled:
            return []
        return [ipaddress.ip_network(SERVICE_V4), ipaddress.ip_network(SERVICE_V6)]

    async def start(self, dataplane: HasLocalHook, tun: TunWriter) -> None:
        """Answer service packets the data plane hands over; tell resolved about our link."""
        if not self.enabled:
            return
        self._loop = asyncio.get_running_loop()
        self._tun = tun
        conf = self.config.dns.upstreams
        upstreams = list(conf) if conf is not None else list(system_upstreams())
        self.server = DnsServer(self.book.table, upstreams, write_tun=self._write_one)
        await self.server.start()
        limits = TcpLimits(
            mtu=self.config.interface.mtu,
            max_message=self.server.responder.config.max_query_size,
        )
        self.tcp = DnsTcp(self.server, self._write, limits)
        dataplane.on_local = self.on_local
        if self.use_resolved:
            await self._connect_resolved(tun.name)
        log.info(
            "dns",
            domain=self.domain,
            names=len(self.book.table),
            upstreams=[format_endpoint(u) for u in self.server.upstreams] or "none",
            resolved=self.resolved,
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._link is not None:
            try:
                await self._link.revert()
            except (ResolvedError, OSError, EOFError) as e:
                log.warning("dns: systemd-resolved revert failed", error=str(e))
            with contextlib.suppress(OSError, EOFError):
                await self._link.close()
            self._link = None
        if self.tcp is not None:
            self.tcp.close()
        if self.server is not None:
            await self.server.close()

    # -- names -------------------------------------------------------------------------------
    def on_netmap(self, netmap: NetMap | None) -> None:
        """A new netmap (None: out of the network): the names follow at once."""
        if not self.enabled:
            return
        old_domain, old_labels = self.domain, set(self.book.labels.values())
        self._rebuild(netmap)
        if self._link is not None and self._ifindex is not None:
            if self.domain != old_domain:
                self._spawn(self._apply_resolved())
            elif old_labels - set(self.book.labels.values()):
                self._spawn(self._flush_resolved())  # removed names leave resolved's cache

    def _rebuild(self, netmap: NetMap | None) -> None:
        static_keys = {h.key for h in self._static}
        if netmap is None:
            hosts = [self._self, *self._static]
        else:
            from_map = netmap_hosts(netmap, skip=static_keys)
            hosts = [*from_map[:1], *self._static, *from_map[1:]]
        domain = netmap.dns_domain if netmap is not None else DEFAULT_DOMAIN
        try:
            table = self.book.build(hosts, domain)
        except LocalProtocolError as e:
            log.warning("dns: unusable domain, using the default", domain=domain, error=str(e))
            table = self.book.build(hosts, DEFAULT_DOMAIN)
        self.domain = table.domain
        if self.server is not None:
            self.server.table = table

    # -- the packet path ---------------------------------------------------------------------
    def on_local(self, packet: bytes) -> bool:
        """The data plane's route-miss hook: take UDP and TCP packets to the service, queued."""
        if not is_service_packet(packet) and not is_service_tcp(packet):
            return False
        if len(self._queue) >= QUEUE_MAX:
            self.counters["drop_queue_full"] += 1
            return True
        self._queue.append(packet)
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._drain)
        return True

    def _take_tokens(self, wanted: int, now: float) -> int:
        self._tokens = min(BURST, self._tokens + (now - self._refilled) * RATE)
        self._refilled = now
        n = min(wanted, int(self._tokens))
        self._tokens -= n
        return n

    def _drain(self) -> None:
        """Answer up to BATCH queued queries; come back next iteration for the rest."""
        self._scheduled = False
        server, queue, loop = self.server, self._queue, self._loop
        if server is None or loop is None:
            queue.clear()
            return
        replies: list[bytes] = []
        for _ in range(self._take_tokens(min(BATCH, len(queue)), loop.time())):
            packet = queue.popleft()
            if self.tcp is not None and is_service_tcp(packet):
                replies += self.tcp.handle_packet(packet)
            elif (reply := server.handle_tun_packet(packet)) is not None:
                replies.append(reply)
        self._write(replies)
        if queue:
            self._scheduled = True
            if replies or self._tokens >= 1:
                loop.call_soon(self._drain)
            else:  # out of tokens: back when one has come
                loop.call_later(1 / RATE, self._drain)

    def _write_one(self, packet: bytes) -> None:
        self._write([packet])

    def _write(self, packets: Sequence[bytes]) -> None:
        if packets and self._tun is not None:
            failed = self._tun.write_packets(packets)
            if failed:
                self.counters["drop_tun_write"] += failed

    # -- systemd-resolved --------------------------------------------------------------------
    async def _connect_resolved(self, ifname: str) -> None:
        hint = manual_hint(self.domain)
        if _other_netns():
            self.resolved, self.hint = "unavailable", hint
            log.info("dns: not in systemd-resolved's network namespace; nothing changed")
            return
        link = await ResolvedLink.connect(domain=self.domain)
        if isinstance(link, ResolvedUnavailable):
            self.resolved, self.hint = "unavailable", link.hint
            log.info("dns: systemd-resolved unavailable, nothing changed", reason=link.reason)
            return
        self._link = link
        try:
            self._ifindex = socket.if_nametoindex(ifname)
        except OSError as e:
            self.resolved, self.hint = "failed", f"{e}; {hint}"
            return
        await self._apply_resolved()

    async def _apply_resolved(self) -> None:
        if self._link is None or self._ifindex is None:
            return
        try:
            await self._link.apply(self._ifindex, self.domain)
        except (ResolvedError, OSError, EOFError) as e:
            self.resolved = "failed"
            self.hint = f"{getattr(e, 'hint', e)}; {manual_hint(self.domain)}"
            log.warning("dns: systemd-resolved refused the link settings", error=str(e))
            return
        self.resolved, self.hint = "applied", None

    async def _flush_resolved(self) -> None:
        if self._link is not None:
            with contextlib.suppress(ResolvedError, OSError, EOFError):
                await self._link.flush()

    def _spawn(self, coro: Any) -> None:
        if self._loop is None:
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For `agent status`: what is served where, resolved's state, the counters."""
        if not self.enabled:
            return {"enabled": False}
        stats = Counter(self.server.stats() if self.server is not None else {})
        stats.update(self.tcp.stats() if self.tcp is not None else {})
        stats.update(self.counters)
        dropped: dict[str, int] = {}
        for name, n in stats.items():
            for prefix in ("drop_", "forward_drop_"):
                if name.startswith(prefix) and n:
                    reason = name.removeprefix(prefix)
                    dropped[reason] = dropped.get(reason, 0) + n
        return {
            "enabled": True,
            "domain": self.domain,
            "names": len(self.book.table),
            "service": [str(SERVICE_V4), str(SERVICE_V6)],
            "upstreams": [format_endpoint(u) for u in self.server.upstreams] if self.server else [],
            "resolved": self.resolved,
            "hint": self.hint,
            "answered": sum(n for k, n in stats.items() if k.startswith("rcode_")),
            "forwarded": stats["forwarded"],
            "tcp": {"connections": stats["tcp_connections"], "queries": stats["tcp_queries"]},
            "dropped": dict(sorted(dropped.items())),
        }


def _other_netns() -> bool:
    """Whether we run in another network namespace than PID 1 (and so than resolved, whose
    link indexes would not be ours); False when that cannot be read (not root)."""
    try:
        return os.readlink("/proc/self/ns/net") != os.readlink("/proc/1/ns/net")
    except OSError:
        return False
