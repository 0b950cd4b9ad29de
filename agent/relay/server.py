"""A DERP relay server (derper-like): TLS listener, HTTP upgrade, shared RelayCore, STUN on UDP.

Upstream: tailscale cmd/derper/derper.go (endpoints), derp/derphttp/derphttp_server.go (upgrade,
WebSocket), derp/derpserver/derpserver.go (server behaviour, region mesh). Each accepted TCP (or
TLS) stream is one `_RelayConn` protocol:

    READING_HEAD    bytes until the request's blank line (upgrade.parse_request, 16 KiB, 30 s)
      /derp + Upgrade: DERP (or websocket)   -> 101 (none on fast start), RelayCore takes the stream
      /derp + websocket + protocol "derp"    -> RFC 6455 via wsproto; binary messages carry the
                                                DERP byte stream both ways (boundaries mean nothing)
      /derp/probe, /derp/latency-check       -> 200 (GET/HEAD) or 405, then close
      /generate_204                          -> 204, challenge echoed, then close
      /debug/metrics                         -> Prometheus text, loopback clients only (else 403)
      anything else                          -> 404 (426 for /derp without an Upgrade), then close
                    (the plain-HTTP answers are http_endpoints.http_reply)
    DERP            bytes -> RelayCore.receive_data; after every input each connection's
                    data_to_send is flushed, CloseConnection events close their streams and
                    ForwardToMesh events go out on the region's mesh links (mesh.py);
                    PauseReading / ResumeReading (the core's per-client receive rate limit,
                    §4.6) pause and resume reading that stream: TCP back-pressure, no drops

All connections share one RelayCore (ids are ints) and one asyncio timer armed at
`RelayCore.next_deadline()`. After each input the shell writes only the connections the core
marked as having output (`RelayCore.take_output`), so no read costs O(connections). A client whose
transport holds more than MAX_CLIENT_BUFFER unsent bytes loses further frames (counted in
`RelayServer.dropped_frames`) instead of stalling others. Streams are tls_stream.Stream (OpenSSL
on the socket, no per-connection read buffer), not asyncio's TLS transport: see tls_stream.py.
The program around it (main.py) reads the files: the server key (`--config`), the mesh key
(mesh.load_mesh_key), the allowed client keys (`--verify-clients-file`) and the receive rate
limit (`--rate-config`, read again on SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, cast

import wsproto.utilities
from structlog.typing import FilteringBoundLogger
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws_events

from agent.netio.tls_stream import StreamServer, serve_streams
from agent.proto.derp import upgrade
from agent.proto.derp.frames import FRAME_HEADER_LEN
from agent.proto.derp.server import (
    CLIENT_INFO_TIMEOUT,
    ClientRegistered,
    CloseConnection,
    ForwardToMesh,
    PauseReading,
    RelayCore,
    ResumeReading,
)
from agent.proto.errors import RemoteProtocolError
from agent.relay.http_endpoints import RelayStats, http_reply, is_derp_upgrade, metrics_text
from agent.relay.mesh import MESH_RETRY_BASE, MeshLink, MeshPeer
from agent.relay.stun_server import StunServer, serve_stun

__all__ = [
    "MAX_CLIENT_BUFFER",
    "HEAD_TIMEOUT",
    "RateLimit",
    "RelayServer",
    "RelayStats",
    "serve_relay",
]

MAX_CLIENT_BUFFER: Final = 1 << 20
HEAD_TIMEOUT: Final = 30.0  # derper's http.Server ReadTimeout before the hijack (§1.1)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Per-client receive limit (§4.6): bytes per second (0: off) and the bucket's depth (the
    core raises it to RATE_LIMIT_MIN_BURST)."""

    bytes_per_sec: int = 0
    burst_bytes: int = 0


def _count_frames(data: bytes | bytearray) -> int:
    """Frames in a chunk that holds only whole frames (what RelayCore.data_to_send returns)."""
    count, pos = 0, 0
    while pos + FRAME_HEADER_LEN <= len(data):
        pos += FRAME_HEADER_LEN + int.from_bytes(data[pos + 1 : pos + FRAME_HEADER_LEN], "big")
        count += 1
    return count


class _RelayConn(asyncio.Protocol):
    """One accepted stream: the HTTP head, then DERP bytes (raw or in WebSocket messages)."""

    __slots__ = ("conn_id", "derp", "done", "head", "head_timer", "server", "transport", "ws")

    def __init__(self, server: RelayServer, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        self.head = b""  # the request head so far (rarely more than one read)
        self.derp = False
        self.ws: WSConnection | None = None  # set for DERP over WebSocket
        self.done = False  # an HTTP reply was sent; ignore anything else on this stream
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.stats.accepted += 1
        self.server.conns[self.conn_id] = self
        self.head_timer = self.server.loop.call_later(
            self.server.head_timeout, self.transport.abort
        )

    def peer_addr(self) -> tuple[str, int] | None:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(peer[0]), int(peer[1])
        return None

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self._ws_received(data)
            return
        if self.derp:
            self.server.feed(self.conn_id, data)
            return
        if self.done:
            return
        self.head += data
        try:
            parsed = upgrade.parse_request(self.head)
        except RemoteProtocolError as exc:
            self.server.stats.bad_heads += 1
            self.server.log.debug("relay_bad_request", conn=self.conn_id, error=str(exc))
            self._reply(400, "Bad Request", {}, b"bad request\n")
            return
        if parsed is None:
            return
        request, leftover = parsed
        raw, self.head = self.head, b""
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self._dispatch(request, raw, leftover)

    def _dispatch(self, request: upgrade.Request, raw: bytes, leftover: bytes) -> None:
        if is_derp_upgrade(request):
            if "derp" in request.headers.get("sec-websocket-protocol", "").lower():
                self._start_websocket(raw)
            else:
                self._start_derp(request, leftover)
            return
        reply = http_reply(request, self.peer_addr(), self._metrics)
        self._reply(reply.status, reply.reason, reply.headers, reply.body, counted=reply.counted)

    def _metrics(self) -> str:
        self.server.count_status(200)  # counted before rendering: the reply is in it
        return self.server.metrics_text()

    def _reply(
        self,
        status: int,
        reason: str,
        headers: dict[str, str],
        body: bytes,
        *,
        counted: bool = False,
    ) -> None:
        if not counted:
            self.server.count_status(status)
        self.done = True
        if self.transport is None:
            return
        headers = {**headers, "Connection": "close"}
        self.transport.write(upgrade.simple_response(status, reason, headers, body))
        self.transport.close()

    def _start_derp(self, request: upgrade.Request, leftover: bytes) -> None:
        assert self.transport is not None
        self.derp = True
        self.server.stats.upgraded += 1
        if request.headers.get("derp-fast-start") != "1":
            # Buffered by the transport and flushed with the ServerKey frame below.
            self.transport.write(upgrade.server_response(self.server.core.public_key))
        self.server.core.connection_made(self.conn_id, self.server.loop.time(), self.peer_addr())
        self.server.log.debug("relay_upgraded", conn=self.conn_id)
        if leftover:
            self.server.feed(self.conn_id, leftover)
        else:
            self.server.flush()

    # --- DERP over WebSocket (§1.5) --------------------------------------------------------------

    def _start_websocket(self, raw: bytes) -> None:
        """Hand the head (and anything after it) to wsproto; it answers the handshake."""
        self.ws = WSConnection(ConnectionType.SERVER)
        self._ws_received(raw)

    def _ws_received(self, data: bytes) -> None:
        ws, transport = self.ws, self.transport
        if ws is None or transport is None:
            return
        stream = bytearray()
        try:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, ws_events.Request):
                    self._ws_accept(ws, event)
                elif isinstance(event, ws_events.BytesMessage):
                    stream += event.data
                elif isinstance(event, ws_events.TextMessage):
                    transport.write(ws.send(ws_events.CloseConnection(1003, "binary only")))
                    transport.close()
                    break
                elif isinstance(event, ws_events.Ping):
                    transport.write(ws.send(event.response()))
                elif isinstance(event, ws_events.CloseConnection):
                    with contextlib.suppress(wsproto.utilities.LocalProtocolError):
                        transport.write(ws.send(event.response()))
                    transport.close()
                    break
        except wsproto.utilities.RemoteProtocolError as exc:
            self.server.log.debug("relay_websocket_error", conn=self.conn_id, error=str(exc))
            if self.derp:
                transport.abort()
            else:
                self.ws = None
                self.server.stats.bad_heads += 1
                self._reply(400, "Bad Request", {}, b"bad websocket request\n")
            return
        if stream and self.derp:
            self.server.feed(self.conn_id, bytes(stream))

    def _ws_accept(self, ws: WSConnection, request: ws_events.Request) -> None:
        assert self.transport is not None
        if "derp" not in request.subprotocols:
            self.ws = None
            self._reply(400, "Bad Request", {}, b"websocket subprotocol must be derp\n")
            return
        self.transport.write(ws.send(ws_events.AcceptConnection(subprotocol="derp")))
        self.derp = True
        self.server.stats.upgraded += 1
        self.server.stats.websocket += 1
        self.server.core.connection_made(self.conn_id, self.server.loop.time(), self.peer_addr())
        self.server.log.debug("relay_upgraded", conn=self.conn_id, websocket=True)
        self.server.flush()

    def send(self, data: bytes | bytearray) -> None:
        """DERP bytes to this client: as they are, or as one binary WebSocket message."""
        if self.transport is None:
            return
        if self.ws is not None:
            self.transport.write(self.ws.send(ws_events.BytesMessage(bytes(data))))
        else:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.server.conns.pop(self.conn_id, None)
        if self.derp:
            self.server.core.connection_lost(self.conn_id)
            self.server.flush()
        self.transport = None


class RelayServer:
    """A running relay. `port`/`stun_port` are the bound ports; `close()` stops everything."""

    def __init__(
        self, core: RelayCore, loop: asyncio.AbstractEventLoop, log: FilteringBoundLogger
    ) -> None:
        self.core = core
        self.loop = loop
        self.log = log
        self.stats = RelayStats()
        self.head_timeout = HEAD_TIMEOUT  # TLS handshake plus HTTP request, from the accept
        self.conns: dict[int, _RelayConn] = {}
        self.port = 0
        self.stun_port: int | None = None
        self._next_id = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._server: StreamServer | None = None
        self._stun: StunServer | None = None
        self.mesh_links: dict[str, MeshLink] = {}  # by MeshPeer.name, the core's node id

    def metrics_text(self) -> str:
        """`GET /debug/metrics`: the relay's counters and gauges as Prometheus text."""
        return metrics_text(self.core, self.stats, self.mesh_links.values())

    def note_stun(self, answered: bool) -> None:
        if answered:
            self.stats.stun_answered += 1
        else:
            self.stats.not_stun += 1

    @property
    def dropped_frames(self) -> int:
        return self.stats.dropped_frames

    def count_status(self, status: int) -> None:
        self.stats.http_requests += 1
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1

    def start_mesh(
        self,
        peers: Sequence[MeshPeer],
        *,
        private_key: bytes,
        mesh_key: bytes,
        ssl_context: ssl.SSLContext | None,
        retry_base: float = MESH_RETRY_BASE,
    ) -> None:
        """Dial (and keep dialling) every other node of the region; see relay_mesh.py."""
        for peer in peers:
            if peer.name in self.mesh_links:
                continue
            link = MeshLink(
                peer,
                core=self.core,
                private_key=private_key,
                mesh_key=mesh_key,
                ssl_context=ssl_context,
                on_change=self.flush,
                log=self.log,
                retry_base=retry_base,
            )
            self.mesh_links[peer.name] = link
            link.start()

    def set_rate_limit(self, limit: RateLimit) -> None:
        """Apply a receive rate limit to every non-mesh client, connected ones included."""
        self.core.set_rate_limit(limit.bytes_per_sec, limit.burst_bytes, self.loop.time())
        self.flush()

    def _new_conn(self) -> _RelayConn:
        self._next_id += 1
        return _RelayConn(self, self._next_id)

    # --- the shared core ------------------------------------------------------------------------

    def feed(self, conn_id: int, data: bytes) -> None:
        try:
            self.core.receive_data(conn_id, data, self.loop.time())
        except RemoteProtocolError as exc:  # the core closed that connection (CloseConnection)
            self.stats.protocol_errors += 1
            self.log.debug("relay_protocol_error", conn=conn_id, error=str(exc))
        self.flush()

    def flush(self) -> None:
        """Write the pending bytes of the connections that have some, act on events, re-arm
        the timer. O(connections with output), never O(all connections)."""
        core = self.core
        if core.has_output():
            conns = self.conns
            for conn_id, data in core.take_output():
                conn = conns.get(conn_id)
                transport = conn.transport if conn is not None else None
                if conn is None or transport is None or transport.is_closing():
                    continue
                if transport.get_write_buffer_size() > MAX_CLIENT_BUFFER:
                    self.stats.dropped_frames += _count_frames(data)
                    continue
                conn.send(data)
        if not core.has_events():
            self._arm_timer()
            return
        forwards: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
        for event in core.events():
            if isinstance(event, ForwardToMesh):
                forwards.setdefault(event.node, []).append((event.src, event.dst, event.packet))
            elif isinstance(event, CloseConnection):
                closing = self.conns.get(event.conn_id)
                level = self.log.info if event.reason == "client not allowed" else self.log.debug
                level("relay_close", conn=event.conn_id, reason=event.reason)
                if closing is not None and closing.transport is not None:
                    closing.transport.close()
            elif isinstance(event, PauseReading):
                paused = self.conns.get(event.conn_id)
                if paused is not None and paused.transport is not None:
                    paused.transport.pause_reading()
            elif isinstance(event, ResumeReading):
                resumed = self.conns.get(event.conn_id)
                if resumed is not None and resumed.transport is not None:
                    resumed.transport.resume_reading()
            elif isinstance(event, ClientRegistered):
                self.log.debug(
                    "relay_client", conn=event.conn_id, key=event.key.hex(), mesh=event.mesh
                )
        for node, packets in forwards.items():  # one write per mesh link per input
            link = self.mesh_links.get(node)
            sent = link.forward_many(packets) if link is not None else 0
            self.stats.mesh_unavailable += len(packets) - sent
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._timer_at and (self._timer is not None or deadline is None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.on_timer(self.loop.time())
        self.flush()

    # --- lifecycle ------------------------------------------------------------------------------

    async def close(self) -> None:
        for link in list(self.mesh_links.values()):
            await link.stop()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._stun is not None:
            self._stun.close()
            self._stun = None
        for conn in list(self.conns.values()):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def serve_relay(
    host: str,
    port: int,
    *,
    private_key: bytes,
    ssl_context: ssl.SSLContext | None,
    stun_port: int | None,
    log: FilteringBoundLogger,
    verify_client: Callable[[bytes], bool] | None = None,
    mesh_key: bytes | None = None,
    mesh_peers: Sequence[MeshPeer] = (),
    mesh_ssl_context: ssl.SSLContext | None = None,
    mesh_retry: float = MESH_RETRY_BASE,
    rate_limit: RateLimit | None = None,
    head_timeout: float = HEAD_TIMEOUT,
    client_info_timeout: float = CLIENT_INFO_TIMEOUT,
) -> RelayServer:
    """Listen for DERP on host:port (TLS when `ssl_context` is set) and STUN on UDP `stun_port`
    (None disables it; 0 picks a free port). With `mesh_key`, connections presenting it are mesh
    peers, and each of `mesh_peers` is dialled (TLS checked with `mesh_ssl_context`).
    `rate_limit` limits what each non-mesh client may send (`RelayServer.set_rate_limit` changes
    it later). A stream must finish its TLS handshake and HTTP request within `head_timeout`,
    and its DERP login within `client_info_timeout` after the upgrade."""
    loop = asyncio.get_running_loop()
    core = RelayCore(
        private_key,
        verify_client=verify_client,
        mesh_key=mesh_key,
        client_info_timeout=client_info_timeout,
    )
    if rate_limit is not None:
        core.set_rate_limit(rate_limit.bytes_per_sec, rate_limit.burst_bytes, loop.time())
    relay = RelayServer(core, loop, log)
    relay.head_timeout = head_timeout
    server = await serve_streams(relay._new_conn, host or None, port, ssl_context=ssl_context)
    relay._server = server
    relay.port = server.sockets[0].getsockname()[1]
    if stun_port is not None:
        try:
            stun_server = serve_stun(host, stun_port, loop, relay.note_stun)
        except OSError:
            await relay.close()
            raise
        relay._stun = stun_server
        relay.stun_port = stun_server.port
    log.info("relay_listening", host=host, port=relay.port, stun_port=relay.stun_port)
    if mesh_key is not None and mesh_peers:
        relay.start_mesh(
            mesh_peers,
            private_key=private_key,
            mesh_key=mesh_key,
            ssl_context=mesh_ssl_context,
            retry_base=mesh_retry,
        )
    return relay
