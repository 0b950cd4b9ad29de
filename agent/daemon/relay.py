"""A DERP relay server (derper-like): TLS listener, HTTP upgrade, shared RelayCore, STUN on UDP.

Spec: shared/spec/derp-disco.md §1 (transport, upgrade, other endpoints), §4 (server behaviour),
§6.2-§6.3 (STUN server). Each accepted TCP (or TLS) stream is one `_RelayConn` protocol:

    READING_HEAD    bytes until the request's blank line (upgrade.parse_request, 16 KiB, 30 s)
      /derp + Upgrade: DERP (or websocket)   -> 101 (none on fast start), RelayCore takes the stream
      /derp/probe, /derp/latency-check       -> 200 (GET/HEAD) or 405, then close
      /generate_204                          -> 204, challenge echoed, then close
      anything else                          -> 404 (426 for /derp without an Upgrade), then close
    DERP            bytes -> RelayCore.receive_data; after every input each connection's
                    data_to_send is flushed and CloseConnection events close their streams

All connections share one RelayCore (ids are ints) and one asyncio timer armed at
`RelayCore.next_deadline()`. A client whose transport holds more than MAX_CLIENT_BUFFER unsent
bytes loses further frames (counted in `RelayServer.dropped_frames`) instead of stalling others.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

from structlog.typing import FilteringBoundLogger

from agent.proto import stun
from agent.proto.derp import upgrade
from agent.proto.derp.frames import FRAME_HEADER_LEN
from agent.proto.derp.server import ClientRegistered, CloseConnection, RelayCore
from agent.proto.errors import RemoteProtocolError

__all__ = [
    "MAX_CLIENT_BUFFER",
    "HEAD_TIMEOUT",
    "RelayServer",
    "RelayStats",
    "serve_relay",
    "make_self_signed",
]

MAX_CLIENT_BUFFER: Final = 1 << 20
HEAD_TIMEOUT: Final = 30.0  # derper's http.Server ReadTimeout before the hijack (§1.1)
_CHALLENGE: Final = re.compile(r"[A-Za-z0-9._:-]{0,64}")
_NO_CACHE: Final = "no-cache, no-store, must-revalidate, no-transform, max-age=0"


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
    by_status: dict[int, int] = field(default_factory=dict)


def _count_frames(data: bytes) -> int:
    """Frames in a chunk that holds only whole frames (what RelayCore.data_to_send returns)."""
    count, pos = 0, 0
    while pos + FRAME_HEADER_LEN <= len(data):
        pos += FRAME_HEADER_LEN + int.from_bytes(data[pos + 1 : pos + FRAME_HEADER_LEN], "big")
        count += 1
    return count


class _RelayConn(asyncio.Protocol):
    """One accepted stream: the HTTP head, then DERP bytes through the shared core."""

    def __init__(self, server: RelayServer, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.derp = False
        self.done = False  # an HTTP reply was sent; ignore anything else on this stream
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.stats.accepted += 1
        self.server.conns[self.conn_id] = self
        self.head_timer = self.server.loop.call_later(HEAD_TIMEOUT, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.derp:
            self.server.feed(self.conn_id, data)
            return
        if self.done:
            return
        self.head += data
        try:
            parsed = upgrade.parse_request(bytes(self.head))
        except RemoteProtocolError as exc:
            self.server.stats.bad_heads += 1
            self.server.log.debug("relay_bad_request", conn=self.conn_id, error=str(exc))
            self._reply(400, "Bad Request", {}, b"bad request\n")
            return
        if parsed is None:
            return
        request, leftover = parsed
        self.head.clear()
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self._dispatch(request, leftover)

    def _dispatch(self, request: upgrade.Request, leftover: bytes) -> None:
        path = request.path.partition("?")[0]
        method = request.method
        if path in ("/derp/probe", "/derp/latency-check"):
            if method in ("GET", "HEAD"):
                self._reply(200, "OK", {"Access-Control-Allow-Origin": "*"}, b"")
            else:
                self._reply(405, "Method Not Allowed", {}, b"bogus probe method\n")
        elif path == "/generate_204":
            headers = {"Cache-Control": _NO_CACHE}
            challenge = request.headers.get("x-tailscale-challenge")
            if challenge is not None and _CHALLENGE.fullmatch(challenge):
                headers["X-Tailscale-Response"] = f"response {challenge}"
            self._reply(204, "No Content", headers, b"")
        elif path == upgrade.DERP_PATH:
            if request.headers.get("upgrade", "").lower() not in ("derp", "websocket"):
                self._reply(426, "Upgrade Required", {}, b"DERP requires connection upgrade\n")
            elif "derp" in request.headers.get("sec-websocket-protocol", "").lower():
                self._reply(501, "Not Implemented", {}, b"DERP over WebSocket not supported\n")
            else:
                self._start_derp(request, leftover)
        else:
            self._reply(404, "Not Found", {}, b"not found\n")

    def _reply(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        stats = self.server.stats
        stats.http_requests += 1
        stats.by_status[status] = stats.by_status.get(status, 0) + 1
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
        self.server.core.connection_made(self.conn_id, self.server.loop.time())
        self.server.log.debug("relay_upgraded", conn=self.conn_id)
        if leftover:
            self.server.feed(self.conn_id, leftover)
        else:
            self.server.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.server.conns.pop(self.conn_id, None)
        if self.derp:
            self.server.core.connection_lost(self.conn_id)
            self.server.flush()
        self.transport = None


class _StunProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            txid = stun.parse_binding_request(data)
        except RemoteProtocolError:
            self.server.stats.not_stun += 1
            return
        host, port = str(addr[0]).partition("%")[0], int(addr[1])
        if self.transport is not None:
            self.transport.sendto(stun.binding_response(txid, (host, port)), addr)
            self.server.stats.stun_answered += 1

    def error_received(self, exc: Exception) -> None:
        self.server.log.debug("relay_stun_error", error=str(exc))


class RelayServer:
    """A running relay. `port`/`stun_port` are the bound ports; `close()` stops everything."""

    def __init__(
        self, core: RelayCore, loop: asyncio.AbstractEventLoop, log: FilteringBoundLogger
    ) -> None:
        self.core = core
        self.loop = loop
        self.log = log
        self.stats = RelayStats()
        self.conns: dict[int, _RelayConn] = {}
        self.port = 0
        self.stun_port: int | None = None
        self._next_id = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._server: asyncio.Server | None = None
        self._stun: asyncio.DatagramTransport | None = None

    @property
    def dropped_frames(self) -> int:
        return self.stats.dropped_frames

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
        """Write every connection's pending bytes, act on events, re-arm the timer."""
        for conn_id, conn in list(self.conns.items()):
            data = self.core.data_to_send(conn_id)
            transport = conn.transport
            if not data or transport is None or transport.is_closing():
                continue
            if transport.get_write_buffer_size() > MAX_CLIENT_BUFFER:
                self.stats.dropped_frames += _count_frames(data)
                continue
            transport.write(data)
        for event in self.core.events():
            if isinstance(event, CloseConnection):
                closing = self.conns.get(event.conn_id)
                self.log.debug("relay_close", conn=event.conn_id, reason=event.reason)
                if closing is not None and closing.transport is not None:
                    closing.transport.close()
            elif isinstance(event, ClientRegistered):
                self.log.debug("relay_client", conn=event.conn_id, key=event.key.hex())
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
        if self._server is not None:
            self._server.close()
        if self._stun is not None:
            self._stun.close()
            self._stun = None
        for conn in list(self.conns.values()):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
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
) -> RelayServer:
    """Listen for DERP on host:port (TLS when `ssl_context` is set) and STUN on UDP `stun_port`
    (None disables it; 0 picks a free port)."""
    loop = asyncio.get_running_loop()
    relay = RelayServer(RelayCore(private_key), loop, log)
    server = await loop.create_server(relay._new_conn, host or None, port, ssl=ssl_context)
    relay._server = server
    relay.port = server.sockets[0].getsockname()[1]
    if stun_port is not None:
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _StunProtocol(relay), local_addr=(host or "0.0.0.0", stun_port)
            )
        except OSError:
            await relay.close()
            raise
        relay._stun = transport
        relay.stun_port = transport.get_extra_info("sockname")[1]
    log.info("relay_listening", host=host, port=relay.port, stun_port=relay.stun_port)
    return relay


# --- certificates ---------------------------------------------------------------------------------


def make_self_signed(cert_dir: Path, hostname: str) -> tuple[Path, Path]:
    """(cert, key) paths `<cert_dir>/<hostname>.crt|.key`, generated once and reused after.

    The hostname keeps only [A-Za-z0-9.-] in file names, as derper's manual cert mode does (§1.1).
    The certificate is an ECDSA P-256 self-signed leaf for `hostname` (IP or DNS SAN), valid a year.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    safe = re.sub(r"[^A-Za-z0-9.-]", "", hostname) or "derper"
    cert_path, key_path = cert_dir / f"{safe}.crt", cert_dir / f"{safe}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    cert_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def parse_addr(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[V6]:PORT` as derper's --addr; ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--addr {text!r}: expected HOST:PORT, :PORT or [V6]:PORT")
    return host.strip("[]"), int(port)


def run_derper(
    *,
    addr: str,
    hostname: str,
    cert_mode: str,
    cert_dir: Path,
    stun_port: int,
    log: FilteringBoundLogger,
) -> int:
    """`agent derper`: serve until SIGTERM/SIGINT; returns the exit code."""
    host, port = parse_addr(addr)
    if cert_mode == "self-signed":
        cert, key = make_self_signed(cert_dir, hostname)
    else:
        cert, key = cert_dir / f"{hostname}.crt", cert_dir / f"{hostname}.key"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)

    async def main() -> None:
        from nacl.public import PrivateKey

        relay = await serve_relay(
            host,
            port,
            private_key=bytes(PrivateKey.generate()),
            ssl_context=ctx,
            stun_port=stun_port or None,
            log=log,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "derper up", addr=f"{host}:{relay.port}", stun_port=relay.stun_port, cert=str(cert)
        )
        try:
            await stop.wait()
        finally:
            log.info("derper stopping")
            await relay.close()

    asyncio.run(main())
    return 0
