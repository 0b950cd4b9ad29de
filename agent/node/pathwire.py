"""The path engine's I/O: DISCO and STUN datagrams in and out, and the engine's events acted on.

    on_foreign(datagrams, src, key, now)   what the WireGuard core did not claim (the data
                                           plane's ForeignHandler): STUN answers (UDP only) to
                                           the STUN sender, DISCO (UDP or DERP) to the engine,
                                           anything else a counted malformed drop
    drain(now)                             after any activity: the extra sockets matched to
                                           the engine's (`extra`, node/birthday_io), the
                                           engine's DISCO datagrams sent; its events acted on
                                           (PathChanged logged and
                                           counted, PongReceived to the `ping` waiting for it,
                                           DiscoAuthenticated to engine/handshake_wake, whose
                                           datagrams go to the peer)
    on_timer(now) / next_deadline()        the engine's and the STUN prober's timers
    update_local_endpoints(now)            the port-mapped endpoint, STUN-learned endpoints, then
                                           local addresses with the WireGuard port
                                           (engine/local_endpoints), to the engine (for
                                           CallMeMaybe) and to `on_endpoints` (the coordinator
                                           report)
    set_mapped(endpoint, now)              the router mapped our port (or the mapping is gone)
    set_mapping_varies(varies, now)        netcheck's MappingVariesByDestIP: our NAT is hard
                                           (True) or easy; a port mapping makes it easy; to the
                                           engine (birthday rounds, engine/birthday.py)
    announce(now)                          just joined a DERP region: a paced CallMeMaybe to
                                           every DISCO peer
    ping(key)                              `agent ping`: one DISCO ping, its pong or None

Owned by the daemon's event loop; the decisions are the engine's.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from agent.engine.engine import PathEngine
from agent.engine.events import DiscoAuthenticated, PathChanged, PongReceived
from agent.engine.handshake_wake import wake_handshake
from agent.engine.local_endpoints import EndpointSource, gather
from agent.keys import NodePublic
from agent.log import get_logger
from agent.node.birthday_io import ExtraSockets
from agent.node.stun_sender import StunSender
from agent.node.transport import PeerTransport
from agent.proto import disco
from agent.proto.endpoint import format_endpoint
from agent.proto.errors import DropReason
from agent.proto.wireguard.device import Device

__all__ = ["PathWire"]

log = get_logger("agent.daemon")

Endpoint = tuple[str, int]
Buffer = bytes | bytearray | memoryview


class PathWire:
    """Connects the path engine and the STUN sender to the sockets the daemon owns."""

    def __init__(
        self,
        paths: PathEngine,
        stun: StunSender,
        transport: PeerTransport,
        device: Device,
        *,
        names: Mapping[NodePublic, str],
        local_ips: Sequence[str],
        listen_port: int,
        drops: Counter[DropReason],
        on_endpoints: Callable[[], None],
    ) -> None:
        # Static after construction.
        self.paths = paths
        self.stun = stun
        self.transport = transport
        self.device = device
        self.names = names  # shared with the daemon, which updates it
        self.local_ips = list(local_ips)
        self.listen_port = listen_port
        self.drops = drops  # the data plane's drop counters
        self.on_endpoints = on_endpoints
        # Owned by the event loop.
        self.mapped: Endpoint | None = None  # the router's mapping of our port (portmap)
        self.mapping_varies: bool | None = None  # netcheck's MappingVariesByDestIP
        self.extra: ExtraSockets | None = None  # birthday rounds' sockets, set by the daemon
        self.path_switches: dict[NodePublic, int] = {}
        self._pong_waiters: dict[bytes, asyncio.Future[PongReceived]] = {}

    def on_foreign(
        self, datagrams: Sequence[Buffer], src: Endpoint, key: NodePublic | None, now: float
    ) -> None:
        """Non-WireGuard datagrams: STUN answers (UDP only) and DISCO (UDP or DERP)."""
        for d in datagrams:
            data = bytes(d)
            if key is None and self.stun.receive(data, src, now):
                continue
            if disco.looks_like_disco(data):
                self.paths.receive_disco(data, src, now, derp_src=key)
            else:
                self.drops[DropReason.MALFORMED] += 1
        if self.stun.endpoints_changed():
            self.update_local_endpoints(now)

    def update_local_endpoints(self, now: float) -> None:
        found = gather(
            {
                EndpointSource.PORTMAP: [self.mapped] if self.mapped else [],
                EndpointSource.STUN: self.stun.prober.public_endpoints(),
                EndpointSource.LOCAL: [(ip, self.listen_port) for ip in self.local_ips],
            }
        )
        self.paths.set_local_endpoints([ep for ep, _ in found], now)
        log.info("endpoints", endpoints=[f"{format_endpoint(ep)} ({src})" for ep, src in found])
        self.on_endpoints()

    def set_mapped(self, endpoint: Endpoint | None, now: float) -> None:
        """The router mapped our WireGuard port to `endpoint` (None: the mapping is gone): a
        candidate of its own, sent to peers in CallMeMaybe and to the coordinator."""
        if endpoint != self.mapped:
            self.mapped = endpoint
            self.update_local_endpoints(now)
            self.set_mapping_varies(self.mapping_varies, now)

    def set_mapping_varies(self, varies: bool | None, now: float) -> None:
        """Netcheck's MappingVariesByDestIP (a report that could not tell, None, keeps the last
        answer: one lost STUN reply must not end a birthday round). Our NAT counts as hard
        only without a mapping: a mapped port takes anyone's packets."""
        if varies is not None:
            self.mapping_varies = varies
        varies = self.mapping_varies
        self.paths.set_nat(False if self.mapped is not None and varies else varies, now)

    def announce(self, now: float) -> None:
        """Just joined a DERP region: tell the DISCO peers we are here (a CallMeMaybe each), so a
        peer whose packets to us were lost before we joined retries its handshake now."""
        for key in self.device.peers:
            if self.paths.has_disco(key):
                self.paths.announce(key, now)

    def on_timer(self, now: float) -> None:
        self.paths.on_timer(now)
        self.stun.on_timer(now)

    def next_deadline(self) -> float | None:
        times = [
            t for t in (self.paths.next_deadline(), self.stun.next_deadline()) if t is not None
        ]
        return min(times) if times else None

    def drain(self, now: float) -> None:
        """Send the engine's DISCO datagrams, act on its events."""
        paths, transport, extra = self.paths, self.transport, self.extra
        if extra is not None:
            extra.reconcile()
        for out in paths.outgoing():
            if out.via and extra is not None:
                extra.send_via(out)
            else:
                transport.send_to_endpoint([out.payload], out.endpoint, out.key)
        for ev in paths.events():
            if isinstance(ev, DiscoAuthenticated):
                self._peer_heard(ev, now)
            elif isinstance(ev, PathChanged):
                self.path_switches[ev.key] = self.path_switches.get(ev.key, 0) + 1
                log.info(
                    "path",
                    peer=self.names.get(ev.key, str(ev.key)),
                    old=ev.old,
                    new=ev.new,
                    endpoint=format_endpoint(ev.endpoint) if ev.endpoint else None,
                    derp_region=ev.derp_region,
                )
            else:
                waiter = self._pong_waiters.pop(ev.tx_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev)

    def _peer_heard(self, event: DiscoAuthenticated, now: float) -> None:
        peer = self.device.peers.get(event.key)
        if peer is None:
            return
        datagrams = wake_handshake(event, peer, now)
        if datagrams:
            self.transport.send_to_peer(peer, datagrams, now)

    async def ping(
        self, key: NodePublic, flush: Callable[[], None], wait: float = 5.0
    ) -> PongReceived | None:
        """One DISCO ping to `key` over its current path(s); the pong, or None on timeout.
        `flush` sends it (the daemon's flush, which drains this component)."""
        loop = asyncio.get_running_loop()
        tx = self.paths.ping(key, loop.time())
        waiter: asyncio.Future[PongReceived] = loop.create_future()
        self._pong_waiters[tx] = waiter
        flush()
        try:
            return await asyncio.wait_for(waiter, wait)
        except TimeoutError:
            return None
        finally:
            self._pong_waiters.pop(tx, None)
