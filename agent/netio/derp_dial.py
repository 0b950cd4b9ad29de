"""Opening a DERP connection: TCP, TLS, `GET /derp` with `Upgrade: DERP`, the 101.

The node's region links (agent/node/derp_client.py) and the relay's mesh links
(agent/relay/mesh.py) both dial here, as tailscale's derp/derphttp/derphttp_client.go `connect`
does for its region and URL clients:

    dial_derp(host, port, ssl_context)         one `dial_timeout` bounds it all (10 s, as upstream)
      TCP connect, TLS handshake               server_hostname = host; the context decides the
                                               trust (tls_client_context: a CA file, the system
                                               store, or no verification for labs)
      -> GET /derp, Host: host[:port]          upgrade.client_request(host_header(host, port))
      -> the response head                     upgrade.parse_response: at most MAX_HEAD_SIZE
      -> 101 Switching Protocols               anything else: UpgradeFailed
      -> Upgraded(transport, response, leftover), reading paused

The Host value carries the port when it is not 443 (RFC 9110 §7.2; Go's net/http writes the
URL's host, so upstream's mesh client sends "host:port" the same way). The caller then takes the
connection over: `attach(protocol)` for a protocol on the packet path (the node), or `streams()`
for an asyncio reader and writer (the mesh). Bytes that came after the head reach the new owner
first, before anything read later.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final, cast

from agent.proto.derp.upgrade import Response, client_request, parse_response
from agent.proto.endpoint import host_header
from agent.proto.errors import RemoteProtocolError

__all__ = ["DIAL_TIMEOUT", "UpgradeFailed", "Upgraded", "dial_derp", "tls_client_context"]

DIAL_TIMEOUT: Final = 10.0  # DNS + TCP + TLS + HTTP upgrade (derphttp_client.go `connect`)
_STREAM_LIMIT: Final = 1 << 16  # asyncio.StreamReader's default


class UpgradeFailed(ConnectionError):
    """The relay did not switch to DERP: another status, a bad or oversized head, or EOF."""


def tls_client_context(ca_file: str | None = None, *, insecure: bool = False) -> ssl.SSLContext:
    """The TLS client context for a relay: certificates checked against `ca_file`, or the
    system store when None; `insecure` checks nothing at all (labs only)."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=ca_file)


class _UpgradeProtocol(asyncio.Protocol):
    """Reads the response head; once it is a 101, pauses reading and keeps what follows."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.done: asyncio.Future[tuple[Response, bytes]] = loop.create_future()
        self.after = bytearray()  # bytes read after the head and before the hand-over
        self.lost = False
        self.lost_exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            self.after += data
            return
        self.head += data
        try:
            parsed = parse_response(bytes(self.head))
        except RemoteProtocolError as exc:
            self.done.set_exception(UpgradeFailed(f"bad HTTP response: {exc}"))
            return
        if parsed is None:
            return
        response, leftover = parsed
        self.head.clear()
        if response.status != 101:
            self.done.set_exception(
                UpgradeFailed(f"relay answered HTTP {response.status} to the upgrade")
            )
            return
        assert self.transport is not None
        self.transport.pause_reading()
        self.done.set_result((response, leftover))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.lost_exc = True, exc
        if not self.done.done():
            why = f": {exc}" if exc is not None else ""
            self.done.set_exception(UpgradeFailed(f"closed before the upgrade response{why}"))


class Upgraded:
    """A connection that has switched to DERP framing, waiting for its owner."""

    def __init__(
        self,
        transport: asyncio.Transport,
        response: Response,
        leftover: bytes,
        reader: _UpgradeProtocol,
    ) -> None:
        self.transport = transport
        self.response = response  # the 101's headers (Derp-Version, Derp-Public-Key)
        self.leftover = leftover  # DERP bytes that came with the head
        self._reader = reader

    def attach(self, protocol: asyncio.Protocol) -> None:
        """Hand the connection to `protocol`: connection_made, then (at once) the bytes already
        read, then reading resumes; connection_lost instead if it ended meanwhile."""
        reader = self._reader
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if not reader.lost:
            self.transport.resume_reading()
        data = self.leftover + bytes(reader.after)
        reader.after.clear()
        if data:
            protocol.data_received(data)
        if reader.lost:
            protocol.connection_lost(reader.lost_exc)

    def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The connection as an asyncio reader and writer (what `open_connection` returns)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        self.attach(protocol)
        return reader, asyncio.StreamWriter(self.transport, protocol, reader, loop)


async def dial_derp(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    dial_timeout: float = DIAL_TIMEOUT,
) -> Upgraded:
    """Connect to the relay at host:port (plain TCP when `ssl_context` is None) and upgrade.

    Raises OSError (UpgradeFailed when the relay answered but did not switch), ssl.SSLError
    (a certificate that does not verify) or TimeoutError; the connection is closed then."""
    loop = asyncio.get_running_loop()
    proto = _UpgradeProtocol(loop)
    try:
        async with asyncio.timeout(dial_timeout):
            transport, _ = await loop.create_connection(
                lambda: proto,
                host,
                port,
                ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None,
            )
            transport.write(client_request(host_header(host, port)))
            response, leftover = await proto.done
    except BaseException:
        if proto.transport is not None:
            proto.transport.abort()
        raise
    return Upgraded(transport, response, leftover, proto)
