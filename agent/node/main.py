"""`agent up`: the daemon. One asyncio loop owns the WireGuard core, the TUN, the UDP socket.

run_daemon(config)
  Device (sans-I/O core) <- peers from the config
  TUN  (offloads when the kernel has them) + addresses, MTU, a route per allowed-IPs prefix
  UDP  (GSO/GRO, large buffers) on listen_port
  DERP links to the regions of the config's DERP map (node/derp_client.py)
  PeerTransport: per peer, the path policy (engine/paths.py) picks UDP, DERP or both
  DataPlane: add_reader on both fds, DERP batches; batches in, batches out (node/dataplane.py)
  one timer: re-armed after every batch to the core's next deadline (flush)
  control socket (agent status) and WireGuard UAPI socket (wg show / wg set)
  SIGTERM/SIGINT -> remove the interface and sockets, exit 0
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import socket
import time
from collections.abc import Sequence

from agent.config import Config
from agent.engine.discokeys import static_disco_private, static_disco_public
from agent.engine.engine import PathEngine
from agent.engine.events import PathChanged, PongReceived
from agent.engine.stun_probe import StunProber, StunServer
from agent.keys import NodePublic
from agent.log import get_logger
from agent.netio.systemd import sd_notify
from agent.node import coordinator_link, metrics, uapi
from agent.node.coordinator_client import CoordinatorClient, CoordinatorError
from agent.node.dataplane import DataPlane
from agent.node.derp_client import DerpClients
from agent.node.local_api import LocalApi, serve_local_api
from agent.node.netcheck_cmd import NetcheckDriver
from agent.node.netinfo import local_addresses
from agent.node.netmap_peers import NetmapPeers
from agent.node.randpool import RandomPool
from agent.node.transport import PeerTransport
from agent.node.tun import Tun, open_tun
from agent.node.udp import UdpSocket, open_udp
from agent.proto import disco
from agent.proto.coordinator_messages import NetMap
from agent.proto.endpoint import format_endpoint
from agent.proto.errors import DropReason, RemoteProtocolError
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.peer import (
    EndpointChanged,
    HandshakeCompleted,
    HandshakeGivenUp,
    KeysZeroed,
)

__all__ = ["run_daemon", "Daemon"]

log = get_logger("agent.daemon")
SO_MARK = 36  # socket.SO_MARK is missing on some builds


class Daemon:
    """Everything `agent up` owns. Fields are owned by the event loop's thread."""

    def __init__(self, config: Config, *, coordinator: CoordinatorClient | None = None) -> None:
        self.config = config
        self.coordinator = coordinator
        self.control: coordinator_link.CoordinatorLink | None = None
        self.names = {p.public_key: p.name for p in config.peers}
        self.netmap_peers = NetmapPeers(
            config.interface.private_key.public(), {p.public_key for p in config.peers}, self.names
        )
        self.device: Device | None = None
        self.tun: Tun | None = None
        self.udp: UdpSocket | None = None
        self.dataplane: DataPlane | None = None
        key = config.interface.private_key
        self.paths = PathEngine(static_disco_private(key), key.public(), config.derp.home_region)
        self.stun = StunProber(_stun_servers(config))
        self.derp: DerpClients | None = None
        self.transport: PeerTransport | None = None
        self.handshakes: dict[NodePublic, int] = {}
        self.path_switches: dict[NodePublic, int] = {}
        self.local_ips: list[str] = []
        self._pong_waiters: dict[bytes, asyncio.Future[PongReceived]] = {}
        self._regions_up: set[int] = set()
        self.netcheck: NetcheckDriver | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        self._uapi_served = False
        self.api = LocalApi(self)

    def now(self) -> float:
        """The event loop's clock; the daemon is running."""
        assert self._loop is not None
        return self._loop.time()

    # -- lifecycle ---------------------------------------------------------------------------
    def open_interface(self) -> None:
        """Create and configure the TUN and the UDP socket (before the event loop runs:
        pyroute2's synchronous API cannot be used inside a running loop)."""
        cfg = self.config.interface
        self.tun = open_tun(cfg.name)
        routes = [net for p in self.config.peers for net in p.allowed_ips]
        self.tun.configure(list(cfg.addresses), cfg.mtu, routes, txqueuelen=cfg.txqueuelen)
        self.udp = open_udp(cfg.listen_port)
        if cfg.fwmark:
            self.udp.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, cfg.fwmark)
        if self.config.derp.regions:
            try:
                self.local_ips = local_addresses(exclude_ifnames=(cfg.name,))
            except OSError as e:
                log.warning("cannot list local addresses", error=str(e))

    async def run(self) -> int:
        cfg = self.config.interface
        loop = asyncio.get_running_loop()
        self._loop = loop
        device = Device(
            cfg.private_key, wall_offset=time.time() - loop.time(), randbytes=RandomPool()
        )
        self.device = device
        for p in self.config.peers:
            device.add_peer(
                p.public_key,
                preshared_key=p.preshared_key,
                endpoint=p.endpoint,
                allowed_ips=p.allowed_ips,
                persistent_keepalive=p.persistent_keepalive,
            )
            # Peers with a DERP region speak DISCO (static mode: their node key is their disco
            # key, engine/engine.py); peers with only an endpoint are plain WireGuard peers.
            self.paths.add_peer(
                p.public_key,
                endpoint=p.endpoint,
                derp_region=p.derp_region,
                disco_key=static_disco_public(p.public_key) if p.derp_region else None,
            )
        if self.tun is None or self.udp is None:
            raise RuntimeError("open_interface() must run before run()")
        if self.config.derp.regions:
            self.derp = DerpClients(
                self.config.derp, cfg.private_key, self._on_relayed, on_change=self._derp_changed
            )
            self.paths.home_region = self.derp.home_region
        self.transport = PeerTransport(self.udp, self.derp, self.paths)
        self.dataplane = DataPlane(
            self.tun,
            self.udp,
            device,
            loop.time,
            self.flush,
            sender=self.transport,
            on_foreign=self._on_foreign,
        )
        self.dataplane.attach(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self._start_control_socket(cfg.control_socket)
            await self._start_uapi()
            if cfg.metrics_listen is not None:
                host, port = cfg.metrics_listen
                self._servers.append(await metrics.serve_metrics(host, port, self.api.metrics_text))
            if self.derp is not None:
                self.derp.start()
                self.netcheck = NetcheckDriver(
                    self.config.derp,
                    lambda data, ep: self._send_stun([(data, ep)]),
                    have_v6=any(":" in ip for ip in self.local_ips),
                )
                self._tasks.append(loop.create_task(self._netcheck_loop(), name="netcheck"))
            if self.coordinator is not None:
                self.control = coordinator_link.CoordinatorLink(
                    self.coordinator, self.config, self._apply_netmap, self._control_lost
                )
                self._tasks.append(loop.create_task(self.control.run(), name="control"))
            now = loop.time()
            self._update_local_endpoints(now)
            self._send_stun(self.stun.start(now))
            for peer in device.peers.values():
                if peer.persistent_keepalive and self.transport.has_path(peer, now):
                    self.transport.send_to_peer(peer, peer.keepalive(now), now)
            self.flush()
            log.info(
                "up",
                interface=cfg.name,
                public_key=device.public_key.to_b64(),
                listen_port=self.udp.port,
                peers=len(device.peers),
                offload=self.tun.offload,
                udp_gso=self.udp.gso,
                udp_gro=self.udp.gro,
                derp_home=self.paths.home_region,
            )
            gc.freeze()  # startup objects never need collecting: shorter pauses on the packet path
            sd_notify(f"READY=1\nSTATUS=up: {cfg.name}, {len(device.peers)} peers")
            await self._stop.wait()
        finally:
            sd_notify("STOPPING=1")
            log.info("stopping", interface=cfg.name)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._close_servers()
            self._detach()
            for task in self._tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.derp is not None:
                await self.derp.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.dataplane is not None:
            self.dataplane.detach()

    def close(self) -> None:
        """Remove the interface and close the socket (after the event loop ended)."""
        if self.udp is not None:
            self.udp.close()
        if self.tun is not None:
            self.tun.close()

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.interface.control_socket)
        if self._uapi_served:
            uapi.remove_uapi(self._uapi_path())

    # -- DERP --------------------------------------------------------------------------------
    def _on_relayed(self, region: int, src: NodePublic, datagrams: list[bytes]) -> None:
        if self.dataplane is not None:
            self.dataplane.on_relayed(region, src, datagrams)

    def _derp_changed(self) -> None:
        derp, loop, device = self.derp, self._loop, self.device
        if derp is None:
            return
        regions = derp.connected_regions()
        sd_notify(f"STATUS=up: {self.config.interface.name}, DERP regions {list(regions)}")
        newly = set(regions) - self._regions_up
        self._regions_up = set(regions)
        if newly and loop is not None and device is not None:
            # Just joined a region: tell the DISCO peers we are here (a CallMeMaybe each), so a
            # peer whose packets to us were lost before we joined retries its handshake now.
            now = loop.time()
            for key in device.peers:
                if self.paths.has_disco(key):
                    self.paths.announce(key, now)
            self.flush()

    # -- DISCO and STUN ----------------------------------------------------------------------
    def _on_foreign(
        self,
        datagrams: Sequence[bytes | bytearray | memoryview],
        src: tuple[str, int],
        key: NodePublic | None,
        now: float,
    ) -> None:
        """Non-WireGuard datagrams: STUN answers (UDP only) and DISCO (UDP or DERP)."""
        for d in datagrams:
            data = bytes(d)
            if key is None and (
                (self.netcheck is not None and self.netcheck.receive(data, src, now))
                or self.stun.receive(data, src, now)
            ):
                continue
            if disco.looks_like_disco(data):
                before = self.paths.stats.received.total()
                self.paths.receive_disco(data, src, now, derp_src=key)
                if self.paths.stats.received.total() > before:  # authenticated
                    self._peer_heard(NodePublic(disco.sender_key(data)), now)
            elif self.dataplane is not None:
                self.dataplane.stats.drops[DropReason.MALFORMED] += 1
        if self.stun.changed:
            self.stun.changed = False
            self._update_local_endpoints(now)

    def _peer_heard(self, key: NodePublic, now: float) -> None:
        """An authenticated DISCO message from `key` (static mode: disco key = node key): if our
        handshake to it waits without a session, the peer is reachable now, so retry at once
        (its first initiation may have been lost, e.g. before it had joined the relay); with no
        session and no handshake at all (we restarted while the peer kept its old session),
        start one, so the peer does not wait out WireGuard's 15 s "no reply" timer."""
        device, transport = self.device, self.transport
        peer = device.peers.get(key) if device is not None else None
        if peer is None or transport is None:
            return
        datagrams = peer.retry_handshake(now)
        if not datagrams and peer.keypairs.current is None:
            # No session at all (we restarted, or never talked): a peer that speaks DISCO to us
            # is sending or about to, so start the handshake now (one per REKEY_TIMEOUT).
            datagrams = peer.keepalive(now)
        if datagrams:
            transport.send_to_peer(peer, datagrams, now)

    async def _netcheck_loop(self) -> None:
        """A netcheck report every 20-26 s from the WireGuard socket; the home region follows
        the preferred one (with hysteresis in the engine; a pinned home_region always wins)."""
        driver, derp = self.netcheck, self.derp
        assert driver is not None
        assert derp is not None
        loop = asyncio.get_running_loop()
        full = True
        while True:
            try:
                report = await driver.run(full=full, derp_heard=derp.last_heard)
            except (OSError, ValueError, RemoteProtocolError) as e:
                log.warning("netcheck failed", error=str(e))
            else:
                full = False
                preferred = report.preferred_region
                if preferred is not None and preferred != derp.home_region:
                    log.info("home region", old=derp.home_region, new=preferred)
                    derp.set_home(preferred)
                    self.paths.home_region = preferred
                    self._report_control()
            await asyncio.sleep(max(0.0, driver.netchecker.next_run_at(loop.time()) - loop.time()))

    def _update_local_endpoints(self, now: float) -> None:
        if self.udp is None:
            return
        port = self.udp.port
        endpoints = [*self.stun.public_endpoints()]
        endpoints += [(ip, port) for ip in self.local_ips if (ip, port) not in endpoints]
        self.paths.set_local_endpoints(endpoints, now)
        log.info("endpoints", endpoints=[format_endpoint(ep) for ep in endpoints])
        self._report_control()

    # -- coordinator ---------------------------------------------------------------------------
    def _report_control(self) -> None:
        if self.control is not None:
            self.control.report(self.paths.local_endpoints, self.paths.home_region)

    def _control_lost(self, why: str) -> None:
        """Out of the network: drop every peer the coordinator gave us (static ones stay)."""
        log.error("coordinator link stopped", reason=why)
        self.netmap_peers.drop_all(self.device, self.paths)
        sd_notify(f"STATUS=up: {self.config.interface.name}, removed from the coordinator")

    def _apply_netmap(self, netmap: NetMap) -> None:
        """Peers from the coordinator, applied live (node/netmap_peers.py)."""
        device, loop = self.device, self._loop
        if device is None or loop is None:
            return
        change = self.netmap_peers.apply(netmap, device, self.paths, loop.time())
        log.info(
            "netmap",
            version=netmap.version,
            peers=change.peers,
            added=change.added,
            changed=change.changed,
            removed=change.removed,
        )
        self.flush()

    def _send_stun(self, requests: list[tuple[bytes, tuple[str, int]]]) -> None:
        if self.udp is None:
            return
        for data, ep in requests:
            self.udp.send_batch([data], ep)

    def _drain_engine(self) -> None:
        """Send the engine's DISCO datagrams, act on its events."""
        paths, transport = self.paths, self.transport
        if transport is not None:
            for out in paths.outgoing():
                transport.send_to_endpoint([out.payload], out.endpoint, out.key)
        for ev in paths.events():
            if isinstance(ev, PathChanged):
                self.path_switches[ev.key] = self.path_switches.get(ev.key, 0) + 1
                log.info(
                    "path",
                    peer=self.names.get(ev.key, str(ev.key)),
                    old=ev.old,
                    new=ev.new,
                    endpoint=format_endpoint(ev.endpoint) if ev.endpoint else None,
                    derp_region=ev.derp_region,
                )
            elif isinstance(ev, PongReceived):
                waiter = self._pong_waiters.pop(ev.tx_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev)

    async def ping(self, key: NodePublic, wait: float = 5.0) -> PongReceived | None:
        """One DISCO ping to `key` over its current path(s); the pong, or None on timeout."""
        loop = asyncio.get_running_loop()
        tx = self.paths.ping(key, loop.time())
        waiter: asyncio.Future[PongReceived] = loop.create_future()
        self._pong_waiters[tx] = waiter
        self.flush()
        try:
            return await asyncio.wait_for(waiter, wait)
        except TimeoutError:
            return None
        finally:
            self._pong_waiters.pop(tx, None)

    # -- the one timer -----------------------------------------------------------------------
    def send(self, datagrams: list[bytes], endpoint: tuple[str, int]) -> None:
        if datagrams and self.transport is not None:
            self.transport.send_to_endpoint(datagrams, endpoint, None)

    def flush(self) -> None:
        """After any activity: log core events; arm the single timer if the next deadline is
        earlier than the armed one."""
        device, loop = self.device, self._loop
        if device is None or loop is None:
            return
        for ev in device.events():
            name = self.names.get(ev.peer, str(ev.peer))
            if isinstance(ev, HandshakeCompleted):
                self.handshakes[ev.peer] = self.handshakes.get(ev.peer, 0) + 1
                log.info("handshake complete", peer=name, initiator=ev.initiator)
            elif isinstance(ev, EndpointChanged):
                log.debug("peer endpoint", peer=name, endpoint=f"{ev.endpoint[0]}:{ev.endpoint[1]}")
            elif isinstance(ev, HandshakeGivenUp):
                log.warning("handshake gave up", peer=name, attempts=ev.attempts)
            elif isinstance(ev, KeysZeroed):
                log.info("session keys zeroed", peer=name)
        self._drain_engine()
        deadlines = [
            d
            for d in (device.next_deadline(), self.paths.next_deadline(), self.stun.next_deadline())
            if d is not None
        ]
        if not deadlines:
            return  # a timer still armed fires, finds nothing due, and is not re-armed
        deadline = min(deadlines)
        if self._timer_at is not None and self._timer_at <= deadline:
            return  # the armed timer comes first; when it fires, flush re-arms to what is due
        # Only an earlier deadline re-arms: WireGuard's keepalive and new-handshake timers
        # move with every packet, and re-arming for each of them costs more than one early
        # wakeup now and then.
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        device, loop = self.device, self._loop
        if device is None or loop is None:
            return
        now = loop.time()
        transport, dataplane = self.transport, self.dataplane
        for peer, datagrams in device.on_timer_by_peer(now):
            if transport is None or not transport.has_path(peer, now):
                if dataplane is not None:
                    dataplane.stats.drops[DropReason.NO_ENDPOINT] += len(datagrams)
                continue
            dropped = transport.send_to_peer(peer, datagrams, now)
            if dropped and dataplane is not None:
                dataplane.stats.drops[DropReason.SEND_FAILED] += dropped
        self.paths.on_timer(now)
        self._send_stun(self.stun.on_timer(now))
        self.flush()

    # -- control socket ----------------------------------------------------------------------
    async def _start_control_socket(self, path: str) -> None:
        self._servers.append(await serve_local_api(path, self.api))

    # -- WireGuard UAPI ----------------------------------------------------------------------
    def _uapi_path(self) -> str:
        return f"/var/run/wireguard/{self.config.interface.name}.sock"

    async def _start_uapi(self) -> None:
        if not self.config.interface.uapi:
            return
        assert self.device is not None
        assert self.udp is not None
        assert self._loop is not None
        try:
            server = await uapi.serve_uapi(
                self._uapi_path(),
                self.device,
                listen_port=self.udp.port,
                clock=self._loop.time,
                send=lambda data, ep: self.send([data], ep),
                log=log,
                fwmark=self.config.interface.fwmark,
            )
        except OSError as e:
            log.warning("UAPI socket unavailable", path=self._uapi_path(), error=str(e))
            return
        self._servers.append(server)
        self._uapi_served = True


def _stun_servers(config: Config) -> list[StunServer]:
    """The DERP map's STUN servers given by IP address (names would need a resolver here)."""
    servers = []
    for region in config.derp.regions:
        for node in region.nodes:
            if not node.stun_port:
                continue
            try:
                ipaddress.ip_address(node.host)
            except ValueError:
                log.info("STUN server skipped: not an IP address", host=node.host)
                continue
            servers.append(StunServer(region.id, (node.host, node.stun_port)))
    return servers


def run_daemon(config: Config) -> int:
    """Run `agent up` in the foreground until SIGTERM/SIGINT; returns the exit code."""
    client: CoordinatorClient | None = None
    if config.control is not None:
        url = config.control.url
        try:
            config, client, _reg = asyncio.run(coordinator_link.join(config))
        except (CoordinatorError, ValueError) as e:
            log.error("cannot join the coordinator", url=url, error=str(e))
            return 1
    daemon = Daemon(config, coordinator=client)
    try:
        try:
            daemon.open_interface()
        except OSError as e:
            log.error("interface setup failed", interface=config.interface.name, error=str(e))
            return 1
        return asyncio.run(daemon.run())
    finally:
        daemon.close()
