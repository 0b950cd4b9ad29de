"""The asyncio DERP relay on loopback: TLS upgrade, relaying between two clients, HTTP, STUN."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws_events

from agent.netio.certs import make_self_signed
from agent.proto import stun
from agent.proto.derp.client import Connected, DerpClientConn, PacketReceived
from agent.proto.derp.frames import FrameType
from agent.proto.derp.upgrade import (
    Response,
    client_request,
    parse_response,
)
from agent.relay.main import load_or_create_server_key
from agent.relay.server import RelayServer, serve_relay
from tests.derp_stream import DerpStreamClient
from tests.tls_pair import Tls

LOG = structlog.get_logger()
TIMEOUT = 5.0


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


# --- DERP over WebSocket ----------------------------------------------------------------------


class WsDerpClient:
    """A wsproto client over TLS carrying our DerpClientConn in binary messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.conn = DerpClientConn(secrets.token_bytes(32))
        self.events: list[object] = []
        self.ws_events: list[ws_events.Event] = []

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(self.ws.send(ws_events.BytesMessage(out)))

    async def wait_for(self, want: Callable[[object], bool]) -> object:
        while True:
            for event in [*self.events, *self.ws_events]:
                if want(event):
                    return event
            chunk = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            assert chunk, f"EOF; events {self.events} {self.ws_events}"
            self.ws.receive_data(chunk)
            for ev in self.ws.events():
                if isinstance(ev, ws_events.BytesMessage):
                    self.conn.receive_data(bytes(ev.data), asyncio.get_running_loop().time())
                    self.events += self.conn.events()
                else:
                    self.ws_events.append(ev)
                    if isinstance(ev, ws_events.AcceptConnection):
                        self.conn.connection_made(asyncio.get_running_loop().time())
            self.flush()


@pytest.mark.asyncio
async def test_derp_over_websocket(relay: RelayServer, tls: Tls) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.port, ssl=tls.client, server_hostname="127.0.0.1"
    )
    ws = WsDerpClient(reader, writer)
    request = ws_events.Request(host="127.0.0.1", target="/derp", subprotocols=["derp"])
    writer.write(ws.ws.send(request))
    b = await _connect(relay.port, tls.client)
    try:
        accepted = await ws.wait_for(lambda e: isinstance(e, ws_events.AcceptConnection))
        assert isinstance(accepted, ws_events.AcceptConnection)
        assert accepted.subprotocol == "derp"
        assert accepted.extensions == []  # no compression
        connected = await ws.wait_for(lambda e: isinstance(e, Connected))
        assert connected == Connected(relay.core.public_key)
        await b.wait_for(lambda e: isinstance(e, Connected))

        ws.conn.send_packet(b.conn.public_key, b"from a websocket", relay.loop.time())
        ws.flush()
        got = await b.wait_for(lambda e: isinstance(e, PacketReceived))
        assert got == PacketReceived(ws.conn.public_key, b"from a websocket")
        b.conn.send_packet(ws.conn.public_key, b"to a websocket", relay.loop.time())
        b.flush()
        back = await ws.wait_for(lambda e: isinstance(e, PacketReceived))
        assert back == PacketReceived(b.conn.public_key, b"to a websocket")
        assert relay.stats.websocket == 1

        writer.write(ws.ws.send(ws_events.TextMessage("text is not DERP")))
        closed = await ws.wait_for(lambda e: isinstance(e, ws_events.CloseConnection))
        assert isinstance(closed, ws_events.CloseConnection)
        assert closed.code == 1003
    finally:
        await b.close()
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_websocket_handshake_without_key_is_400(relay: RelayServer, tls: Tls) -> None:
    raw = (
        b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n\r\n"
    )
    response, _ = await _http(relay.port, tls.client, raw)
    assert response.status == 400


# --- metrics ------------------------------------------------------------------------------------


def _parse_metrics(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge")
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            series, value = line.rsplit(" ", 1)
            assert series.partition("{")[0] in typed, line
            samples[series] = float(value)
    return samples


@pytest.mark.asyncio
async def test_metrics_parse_and_count(relay: RelayServer, tls: Tls) -> None:
    a = await _connect(relay.port, tls.client)
    b = await _connect(relay.port, tls.client)
    try:
        await a.wait_for(lambda e: isinstance(e, Connected))
        await b.wait_for(lambda e: isinstance(e, Connected))
        a.conn.send_packet(b.conn.public_key, b"12345", relay.loop.time())
        a.conn.send_packet(secrets.token_bytes(32), b"nobody", relay.loop.time())
        a.flush()
        await b.wait_for(lambda e: isinstance(e, PacketReceived))
        await _http(relay.port, tls.client, b"GET /nothing HTTP/1.1\r\n\r\n")
        response, body = await _http(
            relay.port, tls.client, b"GET /debug/metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    finally:
        await a.close()
        await b.close()
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = _parse_metrics(body.decode())
    assert m["derp_clients"] == 2
    assert m["derp_client_keys"] == 2
    assert m["derp_clients_total"] == 2
    assert m["derp_packets_relayed_total"] == 1
    assert m["derp_bytes_relayed_total"] == 5
    assert m['derp_packets_dropped_total{reason="unknown_dest"}'] == 1
    assert m['derp_packets_forwarded_total{direction="out"}'] == 0
    assert m['derp_mesh_peers{direction="inbound"}'] == 0
    assert m['derp_http_requests_total{status="404"}'] == 1
    assert m['derp_http_requests_total{status="200"}'] == 1  # this very request
    assert m["derp_stun_answered_total"] == 0
    assert m["derp_connections_accepted_total"] == 4


class _FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("peer", "status"),
    [
        (("198.18.0.5", 5555), 403),
        (("::ffff:198.18.0.5", 5555), 403),
        (("127.0.0.1", 5555), 200),
        (("::1", 5555), 200),
        (("::ffff:127.0.0.1", 5555), 200),
    ],
)
async def test_metrics_only_for_loopback(
    relay: RelayServer, peer: tuple[str, int], status: int
) -> None:
    transport = _FakeTransport(peer)
    conn = relay._new_conn()
    conn.connection_made(transport)
    try:
        conn.data_received(b"GET /debug/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        conn.connection_lost(None)
    parsed = parse_response(bytes(transport.written))
    assert parsed is not None
    assert parsed[0].status == status
    assert transport.closed


# --- the server key file ------------------------------------------------------------------------


def test_server_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "derper.key"
    key = load_or_create_server_key(path)
    assert len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == {"PrivateKey": f"privkey:{key.hex()}"}
    assert load_or_create_server_key(path) == key


@pytest.mark.parametrize(
    "text", ["", "{}", '{"PrivateKey": "nodekey:00"}', '{"PrivateKey": "privkey:zz"}', "[1]"]
)
def test_server_key_file_bad_content(tmp_path: Path, text: str) -> None:
    path = tmp_path / "derper.key"
    path.write_text(text)
    with pytest.raises(ValueError, match="PrivateKey"):
        load_or_create_server_key(path)
