"""The control socket: what `agent status`, `agent ping` and `agent metrics` ask the daemon.

One JSON line in, one JSON line out (agent/api.py), on a Unix socket only root can open (0600).
`LocalApi` sees the running node through `DaemonView` (the parts it reads, never the daemon
itself; `NodeParts` is the daemon's). A status or metrics query changes nothing; `ping` sends
one DISCO ping through the path engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent import api
from agent.config import Config
from agent.engine.engine import PathEngine
from agent.engine.events import PongReceived
from agent.engine.paths import derp_region_of
from agent.engine.stun_probe import StunProber
from agent.keys import NodePublic
from agent.log import get_logger
from agent.node import metrics
from agent.node.dataplane import DataPlaneStats
from agent.node.derp_client import DerpClients
from agent.node.fastpath import DataPlaneImpl
from agent.proto.endpoint import format_endpoint
from agent.proto.wireguard.device import Device

__all__ = ["DaemonView", "LocalApi", "NodeParts", "serve_local_api"]

log = get_logger("agent.daemon")


async def serve_local_api(path: str, handler: LocalApi) -> asyncio.AbstractServer:
    """Listen on the Unix socket `path` (replacing a stale one), mode 0600."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(handler.serve, path=path)
    os.chmod(path, 0o600)
    return server


class DaemonView(Protocol):
    """What the local API reads of the running node."""

    @property
    def config(self) -> Config: ...
    @property
    def device(self) -> Device: ...
    @property
    def paths(self) -> PathEngine: ...
    @property
    def derp(self) -> DerpClients | None: ...
    @property
    def dataplane_stats(self) -> DataPlaneStats: ...
    @property
    def stun(self) -> StunProber: ...
    @property
    def listen_port(self) -> int: ...
    @property
    def offload(self) -> str: ...
    @property
    def udp_gso(self) -> bool: ...
    @property
    def impl(self) -> DataPlaneImpl: ...
    @property
    def names(self) -> Mapping[NodePublic, str]: ...
    def owners(self, key: NodePublic) -> tuple[str | None, tuple[str, ...]]:
        """(user, tags) of a peer, as its coordinator said."""
        ...

    def own_name(self) -> str | None:
        """This node's name on its coordinator."""
        ...

    @property
    def handshakes(self) -> Mapping[NodePublic, int]: ...
    @property
    def path_switches(self) -> Mapping[NodePublic, int]: ...

    def now(self) -> float:
        """The event loop's clock."""
        ...

    def ping(self, key: NodePublic) -> Awaitable[PongReceived | None]:
        """One DISCO ping to `key`: its pong, or None on timeout."""
        ...

    def dns(self) -> Mapping[str, Any] | None:
        """The name service's state and counters (node/dns_service.py); None without one."""
        ...

    def portmap(self) -> dict[str, Any] | None:
        """The router's mapping of our port (node/portmapping), or None."""
        ...

    def birthday(self) -> Mapping[str, Any]:
        """Our NAT as netcheck saw it, the birthday round and its sockets."""
        ...


@dataclass(frozen=True, slots=True)
class NodeParts:
    """The daemon's `DaemonView`: the parts of the running node, gathered once it runs."""

    config: Config
    device: Device
    paths: PathEngine
    derp: DerpClients | None
    dataplane_stats: DataPlaneStats
    stun: StunProber
    listen_port: int
    offload: str
    udp_gso: bool
    impl: DataPlaneImpl
    names: Mapping[NodePublic, str]
    owners: Callable[[NodePublic], tuple[str | None, tuple[str, ...]]]
    own_name: Callable[[], str | None]
    handshakes: Mapping[NodePublic, int]
    path_switches: Mapping[NodePublic, int]
    now: Callable[[], float]
    ping: Callable[[NodePublic], Awaitable[PongReceived | None]]
    dns: Callable[[], Mapping[str, Any] | None] = lambda: None
    portmap: Callable[[], dict[str, Any] | None] = lambda: None
    birthday: Callable[[], Mapping[str, Any]] = dict  # engine/birthday + node/birthday_io


class LocalApi:
    """Answers control requests from the running daemon's state."""

    def __init__(self, daemon: DaemonView) -> None:
        self.d = daemon

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            try:
                req = api.Request.parse(line)
                if req.op == "status":
                    reply = api.Response.success(self.status().to_dict())
                elif req.op == "metrics":
                    reply = api.Response.success({"text": self.metrics_text()})
                elif req.op == "ping":
                    reply = await self.ping(req.args)
                else:
                    reply = api.Response.failure(f"operation {req.op!r} is not supported yet")
            except api.ApiError as e:
                reply = api.Response.failure(str(e))
            writer.write(reply.encode())
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            log.debug("control connection failed", error=str(e))
        finally:
            writer.close()

    def status(self) -> api.Status:
        device, paths = self.d.device, self.d.paths
        now = self.d.now()
        cfg = self.d.config.interface
        peers = []
        for pk, peer in device.peers.items():
            if paths.has_peer(pk):
                path = paths.status(pk, now)
            else:  # added by `wg set`, not used yet: the path its first use gives it
                path = paths.status_if_added(peer.endpoint, now)
            ep = path.endpoint
            endpoint = None if ep is None else format_endpoint(ep)
            live = peer.keypairs.current is not None
            user, tags = self.d.owners(pk)
            peers.append(
                api.PeerStatus(
                    name=self.d.names.get(pk, pk.to_b64()[:8]),
                    public_key=pk.to_b64(),
                    allowed_ips=tuple(str(n) for n in device.allowed_ips.networks_of(peer)),
                    path=path.path if live else "none",
                    endpoint=endpoint,
                    derp_region=path.derp_region,
                    latency_ms=None if path.latency is None else round(path.latency * 1000, 3),
                    latest_handshake=int(peer.last_handshake) if peer.last_handshake else None,
                    rx_bytes=peer.rx_bytes,
                    tx_bytes=peer.tx_bytes,
                    persistent_keepalive=peer.persistent_keepalive,
                    user=user,
                    tags=tags,
                )
            )
        drops: dict[str, int] = {str(k): v for k, v in device.drops.items() if v}
        impl = self.d.impl
        dp: dict[str, Any] = {
            "impl": impl.name,
            "impl_reason": impl.reason,
            "offload": self.d.offload,
            "udp_gso": self.d.udp_gso,
        }
        es = self.d.paths.stats
        dp["disco"] = {
            **{f"sent_{k}": v for k, v in es.sent.items()},
            **{f"received_{k}": v for k, v in es.received.items()},
            **{f"dropped_{k}": v for k, v in es.drops.items()},
            "stun_sent": self.d.stun.sent,
            "stun_answered": self.d.stun.answered,
        }
        dp["birthday"] = dict(self.d.birthday())
        for k, v in self.d.dataplane_stats.as_dict().items():
            if k == "drops" and isinstance(v, dict):
                for reason, n in v.items():
                    drops[reason] = drops.get(reason, 0) + n
            else:
                dp[k] = v
        derp = api.DerpStatus(
            home_region=self.d.paths.home_region,
            connected_regions=self.d.derp.connected_regions() if self.d.derp is not None else (),
            stats=self.d.derp.stats() if self.d.derp is not None else {},
        )
        return api.Status(
            interface=cfg.name,
            derp=derp,
            public_key=device.public_key.to_b64(),
            listen_port=self.d.listen_port,
            addresses=tuple(str(a) for a in cfg.addresses),
            peers=tuple(peers),
            drops=drops,
            dataplane=dp,
            dns=self.d.dns(),
            portmap=self.d.portmap(),
            name=self.d.own_name(),
        )

    def find_peer(self, text: str) -> NodePublic | None:
        """A peer by name, public key (base64) or an overlay address inside its allowed IPs."""
        device = self.d.device
        for key, name in self.d.names.items():
            if name == text and key in device.peers:
                return key
        for key in device.peers:
            if key.to_b64() == text:
                return key
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return None
        peer = device.route(addr.packed)
        return peer.public_key if peer is not None else None

    async def ping(self, args: Mapping[str, Any]) -> api.Response:
        text = args.get("peer")
        if not isinstance(text, str):
            return api.Response.failure("ping needs a peer (name, overlay address or key)")
        key = self.find_peer(text)
        if key is None:
            return api.Response.failure(f"no peer {text!r}")
        if not self.d.paths.has_disco(key):
            return api.Response.failure(
                f"peer {text!r} is a plain WireGuard peer (no DERP region, no DISCO): "
                "use ping on its overlay address"
            )
        pong = await self.d.ping(key)
        name = self.d.names.get(key, key.to_b64()[:8])
        peer = self.d.device.peers.get(key)
        nets = self.d.device.allowed_ips.networks_of(peer) if peer is not None else []
        who = {"peer": name, "address": str(nets[0].network_address) if nets else None}
        if pong is None:
            return api.Response.success({**who, "pong": False})
        region = derp_region_of(pong.via)
        codes = {r.id: r.code for r in self.d.config.derp.regions}
        return api.Response.success(
            {
                **who,
                "pong": True,
                "via": "derp" if region is not None else "direct",
                "derp_region": region,
                "derp_code": codes.get(region) if region is not None else None,
                "endpoint": None if region is not None else format_endpoint(pong.via),
                "latency_ms": round(pong.latency * 1000, 3),
            }
        )

    def metrics_text(self) -> str:
        st = self.status()
        peers = tuple(
            metrics.PeerMetrics(
                name=p.name,
                public_key=p.public_key,
                rx_bytes=p.rx_bytes,
                tx_bytes=p.tx_bytes,
                handshakes=self.d.handshakes.get(NodePublic.from_b64(p.public_key), 0),
                last_handshake=p.latest_handshake,
                path=p.path,
                path_switches=self.d.path_switches.get(NodePublic.from_b64(p.public_key), 0),
            )
            for p in st.peers
        )
        counters = {k: v for k, v in st.dataplane.items() if isinstance(v, int) and k != "udp_gso"}
        derp = self.d.derp
        return metrics.render(
            metrics.Snapshot(
                peers=peers,
                drops=st.drops,
                dataplane=counters,
                derp_connected=(
                    {rid: link.connected for rid, link in derp.links.items()} if derp else {}
                ),
                derp=dict(st.derp.stats),
                disco=self.d.paths.stats.counters(),
                dns=st.dns or {},
                impl=self.d.impl.name,
                impl_reason=self.d.impl.reason,
            )
        )
