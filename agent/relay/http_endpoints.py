"""The relay's plain-HTTP side: Prometheus metrics text and the small helpers the request
dispatch in server.py uses (tailscale cmd/derper/derper.go).

`http_reply` answers every request that does not open a DERP stream:

    /derp/probe, /derp/latency-check       200 (GET/HEAD) or 405
    /generate_204                          204, the X-Tailscale-Challenge echoed
    /debug/metrics                         Prometheus text, loopback clients only (else 403)
    /derp without an Upgrade               426
    anything else                          404

`metrics_text` renders the relay's counters and gauges in the Prometheus text format 0.0.4 for
`GET /debug/metrics` (loopback clients only: `is_loopback`). No gauge walks the connections:
a scrape costs O(mesh connections + drop reasons + HTTP statuses).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from agent.netio.prometheus import CONTENT_TYPE, Exposition
from agent.proto.derp import upgrade
from agent.proto.derp.server import RelayCore
from agent.relay.mesh import MeshLink

__all__ = [
    "CHALLENGE",
    "METRICS_TYPE",
    "NO_CACHE",
    "Reply",
    "RelayStats",
    "http_reply",
    "is_derp_upgrade",
    "is_loopback",
    "metrics_text",
]

CHALLENGE: Final = re.compile(r"[A-Za-z0-9._:-]{0,64}")  # X-Tailscale-Challenge we echo
NO_CACHE: Final = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
METRICS_TYPE: Final = CONTENT_TYPE


@dataclass(slots=True)
class RelayStats:
    accepted: int = 0
    upgraded: int = 0
    http_requests: int = 0
    bad_heads: int = 0
    protocol_errors: int = 0
    dropped_frames: int = 0
    stun_answered: int = 0
    not_stun: int = 0
    websocket: int = 0
    mesh_unavailable: int = 0  # ForwardToMesh with the link down or its buffer full
    by_status: dict[int, int] = field(default_factory=dict)


def is_loopback(addr: tuple[str, int] | None) -> bool:
    """The (IP, port) is a loopback address (IPv4-mapped IPv6 included)."""
    if addr is None:
        return False
    try:
        ip = ipaddress.ip_address(addr[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete answer; `counted` when its status was already counted (metrics)."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes = b""
    counted: bool = False


def is_derp_upgrade(request: upgrade.Request) -> bool:
    """`/derp` asking to switch to DERP (or to a WebSocket carrying it)."""
    return request.path.partition("?")[0] == upgrade.DERP_PATH and request.headers.get(
        "upgrade", ""
    ).lower() in ("derp", "websocket")


def http_reply(
    request: upgrade.Request, peer: tuple[str, int] | None, metrics: Callable[[], str]
) -> Reply:
    """The answer to a request that is not a DERP upgrade; `metrics` renders (and counts) the
    metrics page."""
    path = request.path.partition("?")[0]
    method = request.method
    if path in ("/derp/probe", "/derp/latency-check"):
        if method in ("GET", "HEAD"):
            return Reply(200, "OK", {"Access-Control-Allow-Origin": "*"})
        return Reply(405, "Method Not Allowed", {}, b"bogus probe method\n")
    if path == "/generate_204":
        headers = {"Cache-Control": NO_CACHE}
        challenge = request.headers.get("x-tailscale-challenge")
        if challenge is not None and CHALLENGE.fullmatch(challenge):
            headers["X-Tailscale-Response"] = f"response {challenge}"
        return Reply(204, "No Content", headers)
    if path == upgrade.DERP_PATH:
        return Reply(426, "Upgrade Required", {}, b"DERP requires connection upgrade\n")
    if path == "/debug/metrics":
        if not is_loopback(peer):
            return Reply(403, "Forbidden", {}, b"debug endpoints are loopback only\n")
        if method not in ("GET", "HEAD"):
            return Reply(405, "Method Not Allowed", {}, b"GET only\n")
        body = metrics().encode()
        return Reply(200, "OK", {"Content-Type": METRICS_TYPE}, body, counted=True)
    return Reply(404, "Not Found", {}, b"not found\n")


# --- metrics --------------------------------------------------------------------------------------


def metrics_text(core: RelayCore, stats: RelayStats, mesh_links: Iterable[MeshLink]) -> str:
    """Prometheus text exposition (format 0.0.4) of the relay's counters and gauges."""
    counters = core.counters
    registered, keys = core.client_counts()
    drops = dict(core.drops)
    drops["write_buffer_full"] = stats.dropped_frames
    drops["mesh_unavailable"] = stats.mesh_unavailable
    links = list(mesh_links)
    rate, burst = core.rate_limit()
    rows: list[tuple[str, str, str, list[tuple[dict[str, str], int | float]]]] = [
        ("derp_clients", "gauge", "Registered DERP connections.",
         [({}, registered)]),
        ("derp_client_keys", "gauge", "Distinct registered client keys.", [({}, keys)]),
        ("derp_clients_total", "counter", "DERP registrations since start.",
         [({}, counters.clients_total)]),
        ("derp_connections_accepted_total", "counter", "TCP/TLS connections accepted.",
         [({}, stats.accepted)]),
        ("derp_websocket_connections_total", "counter", "DERP connections over WebSocket.",
         [({}, stats.websocket)]),
        ("derp_mesh_peers", "gauge", "Mesh peer connections, by direction.",
         [({"direction": "inbound"}, len(core.mesh_conns())),
          ({"direction": "outbound"}, sum(link.connected for link in links))]),
        ("derp_mesh_remote_keys", "gauge", "Client keys known through mesh peers.",
         [({}, core.remote_count())]),
        ("derp_packets_relayed_total", "counter", "Packets delivered to local clients.",
         [({}, counters.packets_relayed)]),
        ("derp_bytes_relayed_total", "counter", "Packet bytes delivered to local clients.",
         [({}, counters.bytes_relayed)]),
        ("derp_packets_forwarded_total", "counter", "Packets forwarded over the mesh.",
         [({"direction": "out"}, counters.packets_forwarded_out),
          ({"direction": "in"}, counters.packets_forwarded_in)]),
        ("derp_bytes_forwarded_out_total", "counter", "Packet bytes forwarded to mesh peers.",
         [({}, counters.bytes_forwarded_out)]),
        ("derp_packets_dropped_total", "counter", "Packets dropped, by reason.",
         [({"reason": reason}, n) for reason, n in sorted(drops.items())]),
        ("derp_peer_gone_frames_total", "counter", "PeerGone frames sent, by reason.",
         [({"reason": "disconnected"}, counters.peer_gone_disconnected),
          ({"reason": "not_here"}, counters.peer_gone_not_here)]),
        ("derp_rate_limit_bytes_per_second", "gauge",
         "Per-client receive rate limit (0: off).", [({}, int(rate))]),
        ("derp_rate_limit_burst_bytes", "gauge", "Per-client receive burst.",
         [({}, int(burst))]),
        ("derp_rate_limited_clients", "gauge", "Clients not read now: out of receive tokens.",
         [({}, core.paused_count())]),
        ("derp_rate_limited_total", "counter", "Times a client was paused by the rate limit.",
         [({}, counters.throttle_pauses)]),
        ("derp_rate_limited_seconds_total", "counter",
         "Time clients spent paused by the rate limit, summed.",
         [({}, round(counters.throttled_seconds, 3))]),
        ("derp_protocol_errors_total", "counter", "Connections closed for a protocol error.",
         [({}, stats.protocol_errors)]),
        ("derp_stun_answered_total", "counter", "STUN binding requests answered.",
         [({}, stats.stun_answered)]),
        ("derp_stun_ignored_total", "counter", "UDP datagrams that were not STUN requests.",
         [({}, stats.not_stun)]),
        ("derp_http_requests_total", "counter", "Plain HTTP replies, by status.",
         [({"status": str(code)}, n) for code, n in sorted(stats.by_status.items())]),
    ]  # fmt: skip
    out = Exposition()
    for name, kind, help_text, samples in rows:
        out.family(name, kind, help_text)  # HELP and TYPE even with no sample yet
        for labels, value in samples:
            out.add(name, kind, help_text, value, labels)
    return out.text()
