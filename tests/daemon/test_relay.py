"""The asyncio DERP relay on loopback: TLS upgrade, relaying between two clients, HTTP, STUN."""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from agent.daemon.relay import RelayServer, make_self_signed, serve_relay
from agent.proto import stun
from agent.proto.derp.client import Connected, PacketReceived
from agent.proto.derp.frames import FrameType
from agent.proto.derp.upgrade import (
    Response,
    client_request,
    parse_response,
)
from tests.derp_stream import DerpStreamClient

LOG = structlog.get_logger()
TIMEOUT = 5.0


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    cert, key = make_self_signed(tmp_path / "certs", "127.0.0.1")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return Tls(server, client)


@pytest_asyncio.fixture
async def relay(tls: Tls) -> AsyncIterator[RelayServer]:
    server = await serve_relay(
        "127.0.0.1",
        0,
        private_key=secrets.token_bytes(32),
        ssl_context=tls.server,
        stun_port=0,
        log=LOG,
    )
    try:
        yield server
    finally:
        await server.close()


def test_make_self_signed_reuses_files(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path, "derp.example/com")
    assert cert.name == "derp.examplecom.crt"
    assert key.name == "derp.examplecom.key"
    assert key.stat().st_mode & 0o077 == 0
    before = cert.read_bytes()
    assert make_self_signed(tmp_path, "derp.example/com") == (cert, key)
    assert cert.read_bytes() == before


async def _http(port: int, ctx: ssl.SSLContext, raw: bytes) -> tuple[Response, bytes]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    try:
        writer.write(raw)
        body = await asyncio.wait_for(reader.read(), TIMEOUT)  # the server closes after replying
    finally:
        writer.close()
        await writer.wait_closed()
    parsed = parse_response(body)
    assert parsed is not None
    return parsed


async def _connect(port: int, ctx: ssl.SSLContext) -> DerpStreamClient:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    client = await DerpStreamClient.upgrade(reader, writer, f"127.0.0.1:{port}")
    assert client.upgrade_headers["upgrade"] == "DERP"
    return client


@pytest.mark.asyncio
async def test_two_clients_relay_a_packet(relay: RelayServer, tls: Tls) -> None:
    a = await _connect(relay.port, tls.client)
    b = await _connect(relay.port, tls.client)
    try:
        connected_a = await a.wait_for(lambda e: isinstance(e, Connected))
        await b.wait_for(lambda e: isinstance(e, Connected))
        assert isinstance(connected_a, Connected)
        assert connected_a.server_key == relay.core.public_key
        assert set(relay.core.clients()) == {a.conn.public_key, b.conn.public_key}

        a.conn.send_packet(b.conn.public_key, b"hello over derp", asyncio.get_running_loop().time())
        a.flush()
        got = await b.wait_for(lambda e: isinstance(e, PacketReceived))
        assert got == PacketReceived(a.conn.public_key, b"hello over derp")
    finally:
        await a.close()
        await b.close()
    for _ in range(50):
        if not relay.conns:
            break
        await asyncio.sleep(0.01)
    assert relay.conns == {}
    assert relay.core.clients() == {}


@pytest.mark.asyncio
async def test_fast_start_client_info_in_first_write(relay: RelayServer, tls: Tls) -> None:
    """Fast start: no 101, the ServerKey frame comes first, and bytes after the head count."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.port, ssl=tls.client, server_hostname="127.0.0.1"
    )
    try:
        writer.write(client_request("127.0.0.1", fast_start=True))
        first = await asyncio.wait_for(reader.readexactly(5), TIMEOUT)
        assert first[0] == FrameType.SERVER_KEY
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_generate_204_echoes_challenge(relay: RelayServer, tls: Tls) -> None:
    raw = b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: ts_127.0.0.1\r\n\r\n"
    response, body = await _http(relay.port, tls.client, raw)
    assert response.status == 204
    assert response.headers["x-tailscale-response"] == "response ts_127.0.0.1"
    assert "no-store" in response.headers["cache-control"]
    assert body == b""
    bad = b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: no spaces allowed\r\n\r\n"
    response, _ = await _http(relay.port, tls.client, bad)
    assert response.status == 204
    assert "x-tailscale-response" not in response.headers


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /derp/probe HTTP/1.1\r\n\r\n", 200),
        (b"HEAD /derp/latency-check HTTP/1.1\r\n\r\n", 200),
        (b"POST /derp/probe HTTP/1.1\r\n\r\n", 405),
        (b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (b"GET /elsewhere HTTP/1.1\r\n\r\n", 404),
        (b"NOT HTTP AT ALL\r\n", 400),
    ],
)
async def test_other_endpoints(relay: RelayServer, tls: Tls, raw: bytes, status: int) -> None:
    response, _ = await _http(relay.port, tls.client, raw)
    assert response.status == status


@pytest.mark.asyncio
async def test_stun_binding(relay: RelayServer) -> None:
    assert relay.stun_port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind(("127.0.0.1", 0))
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(sock, b"not stun at all, ignored", ("127.0.0.1", relay.stun_port))
        txid = stun.new_txid()
        await loop.sock_sendto(sock, stun.binding_request(txid), ("127.0.0.1", relay.stun_port))
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), TIMEOUT)
        assert stun.parse_response(data) == (txid, ("127.0.0.1", sock.getsockname()[1]))
    finally:
        sock.close()
    assert relay.stats.not_stun == 1
    assert relay.stats.stun_answered == 1


@pytest.mark.asyncio
async def test_slow_reader_frames_are_dropped_not_stalled(relay: RelayServer, tls: Tls) -> None:
    """B never reads: once its transport holds over 1 MiB, frames for it are counted and dropped,
    and A keeps being served (its pings are answered)."""
    a = await _connect(relay.port, tls.client)
    b = await _connect(relay.port, tls.client)
    try:
        await a.wait_for(lambda e: isinstance(e, Connected))
        await b.wait_for(lambda e: isinstance(e, Connected))
        loop = asyncio.get_running_loop()
        packet = bytes(60000)
        for _ in range(200):  # ~12 MB, far more than socket buffers and the 1 MiB bound hold
            a.conn.send_packet(b.conn.public_key, packet, loop.time())
            a.flush()
            await a.writer.drain()
            if relay.dropped_frames:
                break
        for _ in range(100):
            if relay.dropped_frames:
                break
            await asyncio.sleep(0.01)
        assert relay.dropped_frames > 0
        a.conn.send_ping(b"12345678", loop.time())
        a.flush()
        await a.wait_for(lambda e: type(e).__name__ == "PongReceived")
    finally:
        await a.close()
        b.writer.transport.abort()


@pytest.mark.asyncio
async def test_close_leaves_no_tasks(tls: Tls) -> None:
    server = await serve_relay(
        "127.0.0.1",
        0,
        private_key=secrets.token_bytes(32),
        ssl_context=tls.server,
        stun_port=0,
        log=LOG,
    )
    client = await _connect(server.port, tls.client)
    await client.wait_for(lambda e: isinstance(e, Connected))
    await server.close()
    client.writer.transport.abort()
    await asyncio.sleep(0.05)
    assert server.conns == {}
    assert asyncio.all_tasks() == {asyncio.current_task()}
