"""Prometheus text exposition (format 0.0.4) of the daemon's counters, and a loopback HTTP server.

    agent_up                                   gauge    1 while the daemon runs
    agent_peers                                gauge    configured peers
    agent_peer_rx_bytes_total{peer,public_key} counter  WireGuard bytes received from the peer
    agent_peer_tx_bytes_total{...}             counter  ... sent to the peer
    agent_peer_handshakes_total{...}           counter  completed handshakes
    agent_peer_last_handshake_seconds{...}     gauge    Unix time of the latest handshake
    agent_peer_path{...,path}                  gauge    1 for the path in use (direct/derp/none)
    agent_peer_path_switches_total{...}        counter  changes between direct and relayed
    agent_drops_total{reason}                  counter  dropped packets by reason
    agent_dataplane_info{impl,reason}          gauge    1: which data plane runs, and why Python
    agent_dataplane_<name>_total               counter  data plane counters (packets, bytes, ...)
    agent_derp_connected{region}               gauge    1 while the region's link is up
    agent_derp_<name>_total                    counter  DERP link counters, all regions summed
    agent_disco_<name>_total                   counter  path engine: DISCO messages sent and
                                                        received by kind, drops by reason,
                                                        silence probes, relayed fallbacks
    agent_dns_answered_total                   counter  queries the name service answered itself
    agent_dns_forwarded_total                  counter  queries sent to an upstream resolver
    agent_dns_dropped_total{reason}            counter  queries and packets dropped, by reason

The server answers `GET /metrics` only; it listens on a loopback address (config enforces it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.log import get_logger
from agent.netio.prometheus import CONTENT_TYPE, Exposition
from agent.proto.derp.upgrade import parse_request, simple_response
from agent.proto.errors import RemoteProtocolError

__all__ = ["PeerMetrics", "Snapshot", "render", "serve_metrics"]

log = get_logger("agent.metrics")
READ_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class PeerMetrics:
    name: str
    public_key: str
    rx_bytes: int
    tx_bytes: int
    handshakes: int
    last_handshake: float | None
    path: str
    path_switches: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape shows, gathered by the daemon."""

    peers: tuple[PeerMetrics, ...] = ()
    drops: Mapping[str, int] = field(default_factory=dict)
    dataplane: Mapping[str, int] = field(default_factory=dict)
    derp_connected: Mapping[int, bool] = field(default_factory=dict)
    derp: Mapping[str, int] = field(default_factory=dict)
    disco: Mapping[str, int] = field(default_factory=dict)
    dns: Mapping[str, Any] = field(default_factory=dict)  # DnsService.status(); {} = no service
    impl: str = "python"  # which data plane runs (node/fastpath.py)
    impl_reason: str = ""  # why Python runs when "auto" asked for native; "" otherwise


def render(snap: Snapshot) -> str:
    out = Exposition()
    out.add("agent_up", "gauge", "1 while the agent runs.", 1)
    out.add("agent_peers", "gauge", "Configured peers.", len(snap.peers))
    for p in snap.peers:
        who = {"peer": p.name, "public_key": p.public_key}
        out.add(
            "agent_peer_rx_bytes_total", "counter", "Bytes received from the peer.", p.rx_bytes, who
        )
        out.add("agent_peer_tx_bytes_total", "counter", "Bytes sent to the peer.", p.tx_bytes, who)
        out.add(
            "agent_peer_handshakes_total", "counter", "Completed handshakes.", p.handshakes, who
        )
        if p.last_handshake is not None:
            out.add(
                "agent_peer_last_handshake_seconds",
                "gauge",
                "Unix time of the latest handshake.",
                p.last_handshake,
                who,
            )
        for path in ("direct", "derp", "none"):
            out.add(
                "agent_peer_path",
                "gauge",
                "1 for the path traffic to the peer takes.",
                int(p.path == path),
                {**who, "path": path},
            )
        out.add(
            "agent_peer_path_switches_total",
            "counter",
            "Switches between the direct path and the relay.",
            p.path_switches,
            who,
        )
    for reason, n in sorted(snap.drops.items()):
        out.add("agent_drops_total", "counter", "Dropped packets by reason.", n, {"reason": reason})
    out.add(
        "agent_dataplane_info",
        "gauge",
        "1, labelled with the data plane that runs (native or python) and why, if not native.",
        1,
        {"impl": snap.impl, "reason": snap.impl_reason},
    )
    for name, n in sorted(snap.dataplane.items()):
        out.add(f"agent_dataplane_{name}_total", "counter", f"Data plane {name}.", n)
    for region, up in sorted(snap.derp_connected.items()):
        out.add(
            "agent_derp_connected",
            "gauge",
            "1 while the DERP region's link is up.",
            int(up),
            {"region": str(region)},
        )
    for name, n in sorted(snap.derp.items()):
        out.add(f"agent_derp_{name}_total", "counter", f"DERP links {name}.", n)
    for name, n in sorted(snap.disco.items()):
        out.add(f"agent_disco_{name}_total", "counter", f"Path engine {name}.", n)
    if snap.dns.get("enabled"):
        dns = snap.dns
        out.add("agent_dns_answered_total", "counter", "DNS queries answered.", dns["answered"])
        out.add("agent_dns_forwarded_total", "counter", "DNS queries forwarded.", dns["forwarded"])
        for reason, n in sorted(dns.get("dropped", {}).items()):
            out.add("agent_dns_dropped_total", "counter", "DNS drops.", n, {"reason": reason})
    return out.text()


async def serve_metrics(host: str, port: int, scrape: Callable[[], str]) -> asyncio.Server:
    """HTTP/1.1 on host:port answering `GET /metrics` with `scrape()`; anything else 404/405."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            buf = b""
            parsed = None
            while parsed is None:
                chunk = await asyncio.wait_for(reader.read(4096), READ_TIMEOUT)
                if not chunk:
                    return
                buf += chunk
                parsed = parse_request(buf)
            request, _ = parsed
            path = request.path.partition("?")[0]
            if path != "/metrics":
                writer.write(simple_response(404, "Not Found", {}, b"try /metrics\n"))
            elif request.method != "GET":
                writer.write(simple_response(405, "Method Not Allowed", {"Allow": "GET"}, b""))
            else:
                headers = {"Content-Type": CONTENT_TYPE, "Connection": "close"}
                writer.write(simple_response(200, "OK", headers, scrape().encode()))
            await writer.drain()
        except (RemoteProtocolError, OSError, TimeoutError) as e:
            log.debug("metrics request failed", error=str(e))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)
