"""tls_stream: the relay's own TCP/TLS streams on loopback (handshake, big writes against a slow
reader, close after flush with close_notify, abort, errors), against asyncio clients."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from agent.netio.tls_stream import StreamServer, serve_streams
from tests.tls_pair import Tls

TIMEOUT = 5.0


@dataclass
class Recorder(asyncio.Protocol):
    """Echoes every input (times `factor`); `close_after` bytes in, it closes (after flushing)."""

    factor: int = 1
    close_after: int | None = None
    transport: asyncio.Transport | None = None
    received: bytearray = field(default_factory=bytearray)
    lost: asyncio.Future[Exception | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.received += data
        assert self.transport is not None
        self.transport.write(data * self.factor)
        if self.close_after is not None and len(self.received) >= self.close_after:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost twice"
        self.lost.set_result(exc)


@dataclass
class Served:
    server: StreamServer
    port: int
    protocols: list[Recorder]


@pytest_asyncio.fixture(params=["tls", "tcp"])
async def served(request: pytest.FixtureRequest, tls: Tls) -> AsyncIterator[Served]:
    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder(**getattr(request, "param_kwargs", {})))
        return protocols[-1]

    ctx = tls.server if request.param == "tls" else None
    server = await serve_streams(factory, "127.0.0.1", 0, ssl_context=ctx)
    try:
        yield Served(server, server.sockets[0].getsockname()[1], protocols)
    finally:
        server.close()
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.abort()
        await asyncio.sleep(0)


async def _open(
    served: Served, tls: Tls
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Recorder]:
    tls_on = served.server._ssl is not None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1",
            served.port,
            ssl=tls.client if tls_on else None,
            server_hostname="127.0.0.1" if tls_on else None,
        ),
        TIMEOUT,
    )
    for _ in range(100):
        if served.protocols:
            break
        await asyncio.sleep(0.01)
    return reader, writer, served.protocols[-1]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_echo_and_peername(served: Served, tls: Tls) -> None:
    reader, writer, proto = await _open(served, tls)
    try:
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"hello"
        assert proto.transport is not None
        assert proto.transport.get_extra_info("peername") == writer.get_extra_info("sockname")
    finally:
        await _close(writer)
    assert await asyncio.wait_for(proto.lost, TIMEOUT) is None


@pytest.mark.asyncio
async def test_big_writes_to_a_slow_reader_arrive_whole_and_in_order(
    served: Served, tls: Tls
) -> None:
    """The server writes ~32 MiB while the client is not reading: the rest waits in the pending
    buffer (TLS: retried with the same bytes) and arrives intact once the client reads."""
    reader, writer, proto = await _open(served, tls)
    proto.factor = 4096
    try:
        chunk = bytes(range(256)) * 32  # 8 KiB in, 32 MiB echoed
        writer.write(chunk)
        await writer.drain()
        for _ in range(200):
            if proto.transport is not None and proto.transport.get_write_buffer_size() > 0:
                break
            await asyncio.sleep(0.01)
        assert proto.transport is not None
        assert proto.transport.get_write_buffer_size() > 0
        want = chunk * 4096
        got = await asyncio.wait_for(reader.readexactly(len(want)), 20.0)
        assert got == want
        assert proto.transport.get_write_buffer_size() == 0
    finally:
        await _close(writer)


@pytest.mark.asyncio
async def test_close_flushes_pending_output_then_eof(served: Served, tls: Tls) -> None:
    reader, writer, proto = await _open(served, tls)
    proto.factor, proto.close_after = 2048, 1
    try:
        writer.write(bytes(4096))
        data = await asyncio.wait_for(reader.read(), 20.0)  # up to EOF (close_notify for TLS)
        assert len(data) == 4096 * 2048
        assert proto.transport is not None
        assert proto.transport.is_closing()
    finally:
        await _close(writer)
    assert await asyncio.wait_for(proto.lost, TIMEOUT) is None


@pytest.mark.asyncio
async def test_abort_drops_output_and_reports_lost(served: Served, tls: Tls) -> None:
    reader, writer, proto = await _open(served, tls)
    try:
        writer.write(b"x")
        await asyncio.wait_for(reader.readexactly(1), TIMEOUT)
        assert proto.transport is not None
        proto.transport.abort()
        proto.transport.write(b"ignored after abort")
        assert proto.transport.is_closing()
        assert await asyncio.wait_for(proto.lost, TIMEOUT) is None
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        await _close(writer)


@pytest.mark.asyncio
async def test_garbage_instead_of_a_client_hello(tls: Tls) -> None:
    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder())
        return protocols[-1]

    server = await serve_streams(factory, "127.0.0.1", 0, ssl_context=tls.server)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionError):  # closed with our bytes unread: maybe a reset
            await asyncio.wait_for(reader.read(), TIMEOUT)
        await _close(writer)
        (proto,) = protocols
        exc = await asyncio.wait_for(proto.lost, TIMEOUT)
        assert isinstance(exc, ssl.SSLError)
        assert proto.received == b""
    finally:
        server.close()


@pytest.mark.asyncio
async def test_peer_reset_reports_lost(served: Served, tls: Tls) -> None:
    reader, writer, proto = await _open(served, tls)
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), TIMEOUT)
    writer.transport.abort()
    await asyncio.wait_for(proto.lost, TIMEOUT)
    assert proto.transport is not None
    assert proto.transport.is_closing()
