"""`agent up`: the daemon. One asyncio loop owns the WireGuard core, the TUN, the UDP socket.

run_daemon(config)
  Device (sans-I/O core) <- peers from the config
  TUN  (offloads when the kernel has them) + addresses, MTU, a route per allowed-IPs prefix
  UDP  (GSO/GRO, large buffers) on listen_port
  DERP links to the regions of the config's DERP map (node/derp_client.py)
  PeerTransport: per peer, the path policy (engine/paths.py) picks UDP, DERP or both
  DataPlane: add_reader on both fds, DERP batches; batches in, batches out (node/dataplane.py)
  PathWire: the path engine's DISCO and STUN I/O and events (node/pathwire.py), its STUN going
    out through the one StunSender that netcheck reports use too (node/stun_sender.py)
  one timer: re-armed after every batch to the core's next deadline (flush)
  PortmapLink: our port mapped on the home router, a candidate of its own (node/portmapping.py)
  ExtraSockets: birthday rounds' sockets, and the UDP sender that picks the socket per endpoint
    (node/birthday_io.py); netcheck's MappingVariesByDestIP says whether our NAT is hard
  control socket (agent status), UAPI socket (wg show), names at 100.100.100.100 (dns_service)
  SIGTERM/SIGINT -> remove the interface and sockets, exit 0
  Progress (node/progress.py): what it waits for and what it got, for a person at a terminal
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import time

from agent.config import Config
from agent.engine.birthday import BirthdayLimits
from agent.engine.discokeys import static_disco_private, static_disco_public
from agent.engine.engine import PathEngine
from agent.engine.events import PongReceived
from agent.engine.netcheck import Report
from agent.engine.stun_probe import StunProber
from agent.keys import NodePublic
from agent.log import get_logger
from agent.netio.systemd import sd_notify
from agent.node import coordinator_link, device_io, fastpath, metrics, portmapping, uapi
from agent.node.access import Access
from agent.node.birthday_io import ExtraSockets
from agent.node.coordinator_client import CoordinatorClient, CoordinatorError
from agent.node.dataplane import DataPlane
from agent.node.derp_client import DerpClients
from agent.node.dns_service import DnsService
from agent.node.lanes import lanes_for
from agent.node.local_api import LocalApi, NodeParts, serve_local_api
from agent.node.netcheck_cmd import NetcheckDriver, run_reports
from agent.node.netinfo import local_addresses
from agent.node.netmap_peers import NetmapPeers
from agent.node.pathwire import PathWire
from agent.node.progress import Progress, names_line, peers_line
from agent.node.randpool import RandomPool
from agent.node.stun_sender import StunSender, stun_servers
from agent.node.transport import PeerTransport
from agent.node.tun import Tun, open_tun
from agent.node.udp import UdpSocket, open_udp
from agent.proto.coordinator_messages import NetMap
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.transport import PYTHON as PYTHON_TRANSPORT

__all__ = ["run_daemon", "Daemon"]

log = get_logger("agent.daemon")
SO_MARK = 36  # socket.SO_MARK is missing on some builds
SWITCH_INTERVAL = 0.001  # seconds; see run()


class Daemon:
    """Everything `agent up` owns. Fields are owned by the event loop's thread."""

    def __init__(
        self,
        config: Config,
        *,
        coordinator: CoordinatorClient | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.coordinator = coordinator
        self.progress = progress or Progress()
        self.control: coordinator_link.CoordinatorLink | None = None
        self.names = {p.public_key: p.name for p in config.peers}
        self.access = Access()  # the packet filter: the static policy_file, or the netmap's
        self.access.set_rules(config.interface.policy, config.interface.addresses)
        self.netmap_peers = NetmapPeers(
            config.interface.private_key.public(),
            {p.public_key for p in config.peers},
            self.names,
            self.access,
        )
        self.device: Device | None = None
        self.tun: Tun | None = None
        self.udp: UdpSocket | None = None
        self.dataplane: DataPlane | None = None
        self.impl = fastpath.DataPlaneImpl("python", PYTHON_TRANSPORT, "")  # set by open_interface
        key = config.interface.private_key
        self.paths = PathEngine(
            static_disco_private(key),
            key.public(),
            config.derp.home_region,
            birthday=BirthdayLimits(enabled=config.interface.nat_birthday),
        )
        self.stun_prober = StunProber(stun_servers(config.derp))
        self.derp: DerpClients | None = None
        self.transport: PeerTransport | None = None
        self.wire: PathWire | None = None
        self.extra: ExtraSockets | None = None
        self.portmap: portmapping.PortmapLink | None = None
        self.handshakes: dict[NodePublic, int] = {}
        self.local_ips: list[str] = []
        self._regions_up: set[int] = set()
        self.netcheck: NetcheckDriver | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        self._uapi_served = False
        self.api: LocalApi | None = None
        self.dns = DnsService(config)
        self._relay_wait: tuple[str, float] | None = None  # (region code, when DERP started)
        self._mapped = False  # the first netmap came

    # -- lifecycle ---------------------------------------------------------------------------
    def open_interface(self) -> None:
        """Create and configure the TUN and the UDP socket (before the event loop runs:
        pyroute2's synchronous API cannot be used inside a running loop)."""
        cfg = self.config.interface
        self.impl = fastpath.select(cfg.dataplane)  # "native" and no module: refuse, touch nothing
        self.tun = open_tun(cfg.name)
        routes = [net for p in self.config.peers for net in p.allowed_ips] + self.dns.routes()
        self.tun.configure(list(cfg.addresses), cfg.mtu, routes, txqueuelen=cfg.txqueuelen)
        self.udp = open_udp(cfg.listen_port)
        if self.impl.module is not None:
            self.udp.use_native(self.impl.module)
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
            cfg.private_key,
            wall_offset=time.time() - loop.time(),
            randbytes=RandomPool(),
            transport=self.impl.transport,
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
        self.extra = extra = ExtraSockets(self.udp, self.paths, fwmark=cfg.fwmark)
        self.transport = PeerTransport(extra, self.derp, self.paths)
        self.dataplane = DataPlane(
            self.tun, self.udp, device, loop.time, self.flush, sender=self.transport,
            access=self.access, tun_io=self.impl.tun_io(self.tun),
            lanes=lanes_for(self.impl, self.tun, self.udp), pump=True,
        )  # fmt: skip
        stun = StunSender(self.udp.send_batch, self.stun_prober)
        self.wire = wire = PathWire(
            self.paths,
            stun,
            self.transport,
            device,
            names=self.names,
            local_ips=self.local_ips,
            listen_port=self.udp.port,
            drops=self.dataplane.stats.drops,
            on_endpoints=self._report_control,
        )
        self.dataplane.on_foreign = wire.on_foreign
        extra.dataplane, extra.on_activity, wire.extra = self.dataplane, self.flush, extra
        extra.attach(loop)
        if cfg.portmap and self.derp is not None:  # DISCO peers learn the mapped endpoint
            self.portmap = portmapping.PortmapLink(self.udp.port, wire, self.flush)
            self._tasks.append(self.portmap.start())  # cancelled: deletes the mapping
        self.api = LocalApi(
            NodeParts(
                config=self.config,
                device=device,
                paths=self.paths,
                derp=self.derp,
                dataplane_stats=self.dataplane.stats,
                stun=self.stun_prober,
                listen_port=self.udp.port,
                offload=self.tun.offload,
                udp_gso=self.udp.gso,
                impl=self.impl,
                names=self.names,
                owners=self.netmap_peers.owner,
                own_name=self.netmap_peers.own_name,
                handshakes=self.handshakes,
                path_switches=wire.path_switches,
                now=loop.time,
                ping=self.ping,
                dns=self.dns.status,
                portmap=self.portmap.status if self.portmap else lambda: None,
                birthday=lambda: {**self.paths.birthday_status(), **extra.status()},
            )
        )
        self.dataplane.attach(loop)
        if self.dataplane.threaded:
            # The lanes' thread waits for the GIL while this thread runs Python (a netmap, the
            # Python path): at most 1 ms instead of the default 5 before asking for it
            sys.setswitchinterval(SWITCH_INTERVAL)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            self._servers.append(await serve_local_api(cfg.control_socket, self.api))
            await self._start_uapi()
            await self.dns.start(self.dataplane, self.tun)
            if cfg.metrics_listen is not None:
                host, port = cfg.metrics_listen
                self._servers.append(await metrics.serve_metrics(host, port, self.api.metrics_text))
            if self.derp is not None:
                self.derp.start()
                self.netcheck = stun.netcheck = NetcheckDriver(
                    self.config.derp,
                    stun.send_request,
                    have_v6=any(":" in ip for ip in self.local_ips),
                )
                reports = run_reports(
                    self.netcheck,
                    derp_heard=self.derp.last_heard,
                    home=lambda: self.derp.home_region if self.derp is not None else None,
                    set_home=self._set_home,
                    on_report=self._on_report,
                )
                self._tasks.append(loop.create_task(reports, name="netcheck"))
            if self.coordinator is not None:
                self.control = coordinator_link.CoordinatorLink(
                    self.coordinator, self.config, self._apply_netmap, self._control_lost
                )
                self._tasks.append(loop.create_task(self.control.run(), name="control"))
            now = loop.time()
            wire.update_local_endpoints(now)
            stun.start(now)
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
                dataplane=self.impl.describe(),
                udp_gso=self.udp.gso,
                udp_gro=self.udp.gro,
                derp_home=self.paths.home_region,
            )
            self._tell_up(loop.time())
            gc.freeze()  # startup objects never need collecting: shorter pauses on the packet path
            sd_notify(f"READY=1\nSTATUS=up: {cfg.name}, {len(device.peers)} peers")
            await self._stop.wait()
        finally:
            sd_notify("STOPPING=1")
            log.info("stopping", interface=cfg.name)
            self.progress.done(None, f"stopping: removing {cfg.name}")
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._close_servers()
            self._detach()
            extra.close()
            for task in self._tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self.derp is not None:
                await self.derp.close()
            await self.dns.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _tell_up(self, now: float) -> None:
        """Progress: names, static peers, the node up; then wait for the relay and the map."""
        progress, cfg, derp = self.progress, self.config.interface, self.derp
        static = [p.name for p in self.config.peers]
        names = names_line(self.dns.status())
        for line in (names, peers_line("configured", static) if static else None):
            if line is not None:
                progress.done(None, line)
        own = {"interface": cfg.name, "name": self.netmap_peers.own_name()}
        progress.ready({**own, "addresses": [str(a) for a in cfg.addresses]})
        if derp is not None and derp.home_region is not None:
            region = derp.regions[derp.home_region]
            self._relay_wait = (region.code or str(region.id), now)
            progress.wait("relay", f"relay {self._relay_wait[0]}")
        if self.coordinator is not None:
            progress.wait("netmap", "the network map")

    def _detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.dataplane is not None:
            self.dataplane.detach()

    def close(self) -> None:
        """Remove the interface and close the socket (after the event loop ended)."""
        for part in (self.udp, self.tun):
            if part is not None:
                part.close()

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.interface.control_socket)
        if self._uapi_served:
            uapi.remove_uapi(uapi.uapi_path(self.config.interface.name))

    # -- DERP --------------------------------------------------------------------------------
    def _on_relayed(self, region: int, src: NodePublic, datagrams: list[bytes]) -> None:
        if self.dataplane is not None:
            self.dataplane.on_relayed(region, src, datagrams)

    def _derp_changed(self) -> None:
        derp, loop, wire = self.derp, self._loop, self.wire
        if derp is None:
            return
        regions = derp.connected_regions()
        sd_notify(f"STATUS=up: {self.config.interface.name}, DERP regions {list(regions)}")
        newly = set(regions) - self._regions_up
        self._regions_up = set(regions)
        if self._relay_wait is not None and derp.home_region in regions and loop is not None:
            code, since = self._relay_wait
            self._relay_wait = None
            took = (loop.time() - since) * 1000
            self.progress.done("relay", f"connected to relay {code} in {took:.0f} ms")
        if newly and loop is not None and wire is not None:
            wire.announce(loop.time())
            self.flush()

    def _on_report(self, report: Report) -> None:
        """A netcheck report: whether our NAT maps per destination (birthday rounds)."""
        if self.wire is not None and self._loop is not None:
            self.wire.set_mapping_varies(report.mapping_varies_by_dest_ip, self._loop.time())
            self.flush()

    def _set_home(self, region: int) -> None:
        """Netcheck prefers another home region."""
        assert self.derp is not None
        log.info("home region", old=self.derp.home_region, new=region)
        self.derp.set_home(region)
        self.paths.home_region = region
        self._report_control()

    # -- coordinator ---------------------------------------------------------------------------
    def _report_control(self) -> None:
        if self.control is not None:
            self.control.report(self.paths.local_endpoints, self.paths.home_region)

    def _control_lost(self, why: str) -> None:
        """Out of the network: drop every peer the coordinator gave us (static ones stay)."""
        log.error("coordinator link stopped", reason=why)
        self.netmap_peers.drop_all(self.device, self.paths)
        self.dns.on_netmap(None)
        sd_notify(f"STATUS=up: {self.config.interface.name}, removed from the coordinator")

    def _apply_netmap(self, netmap: NetMap) -> None:
        """Peers from the coordinator, applied live (node/netmap_peers.py)."""
        device, loop = self.device, self._loop
        if device is None or loop is None:
            return
        change = self.netmap_peers.apply(netmap, device, self.paths, loop.time())
        self.dns.on_netmap(netmap)
        if not self._mapped:
            self._mapped = True
            self.progress.done(
                "netmap", peers_line("in the network map", [p.name for p in netmap.peers])
            )
        log.info(
            "netmap",
            version=netmap.version,
            peers=change.peers,
            added=change.added,
            changed=change.changed,
            removed=change.removed,
        )
        self.flush()

    async def ping(self, key: NodePublic, wait: float = 5.0) -> PongReceived | None:
        """One DISCO ping to `key` over its current path(s); the pong, or None on timeout."""
        assert self.wire is not None
        return await self.wire.ping(key, self.flush, wait)

    # -- the one timer -----------------------------------------------------------------------
    def flush(self) -> None:
        """After any activity: log core events; arm the single timer if the next deadline is
        earlier than the armed one."""
        device, loop, wire = self.device, self._loop, self.wire
        if device is None or loop is None or wire is None:
            return
        device_io.log_events(device.events(), self.names, self.handshakes)
        wire.drain(loop.time())
        if self.dataplane is not None:
            self.dataplane.revalidate_lanes(loop.time())
        deadlines = [d for d in (device.next_deadline(), wire.next_deadline()) if d is not None]
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
        device, loop, transport, dataplane = self.device, self._loop, self.transport, self.dataplane
        if device is None or loop is None or transport is None or dataplane is None:
            return
        now = loop.time()
        device_io.send_timer_output(device, transport, dataplane.stats.drops, now)
        if self.wire is not None:
            self.wire.on_timer(now)
        self.flush()

    # -- WireGuard UAPI ----------------------------------------------------------------------
    async def _start_uapi(self) -> None:
        cfg, device, udp, transport = self.config.interface, self.device, self.udp, self.transport
        if not cfg.uapi or device is None or udp is None or transport is None:
            return
        server = await uapi.serve_interface_uapi(
            cfg,
            device,
            listen_port=udp.port,
            send=lambda data, ep: transport.send_to_endpoint([data], ep, None),
            log=log,
            on_set=self.flush,  # a removed peer's lane goes before its next packet
        )
        if server is not None:
            self._servers.append(server)
            self._uapi_served = True


def run_daemon(config: Config, progress: Progress | None = None) -> int:
    """Run `agent up` in the foreground until SIGTERM/SIGINT; returns the exit code.
    `progress` hears what it waits for and what it got (node/progress.py)."""
    progress = progress or Progress()
    client: CoordinatorClient | None = None
    name: str | None = None
    if config.control is not None:
        url = config.control.url
        progress.wait("control", f"the coordinator at {url}")

        def retrying(error: str, delay: float) -> None:
            progress.detail("control", f"unreachable ({error.removeprefix(url + ': ')}), retrying")

        try:
            config, client, reg = asyncio.run(coordinator_link.join(config, retrying))
        except (CoordinatorError, ValueError) as e:
            progress.drop("control")
            log.error("cannot join the coordinator", url=url, error=str(e))
            progress.close()
            return 1
        name = reg.node.name
        got = ", ".join(str(a.ip) for a in config.interface.addresses)
        progress.done("control", f"registered as {name}, {got}")
    daemon = Daemon(config, coordinator=client, progress=progress)
    daemon.netmap_peers.self_name = name  # known before the first netmap arrives
    iface = config.interface
    try:
        try:
            daemon.open_interface()
        except OSError as e:
            progress.close()
            log.error("interface setup failed", interface=iface.name, error=str(e))
            return 1
        except fastpath.NativeUnavailable as e:
            progress.close()
            log.error("no compiled data plane", interface=iface.name, error=str(e))
            return 1
        got = "" if name else "".join(f", {a}" for a in iface.addresses)
        progress.done(None, f"interface {iface.name} up{got}, mtu {iface.mtu}")
        return asyncio.run(daemon.run())
    finally:
        daemon.close()
        progress.close()
