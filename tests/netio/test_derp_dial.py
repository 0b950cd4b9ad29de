"""agent.netio.derp_dial against real TLS on loopback: our relay, and small servers that answer
the upgrade badly (another status, an endless or stalled head, a certificate we do not trust)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from agent.netio.derp_dial import UpgradeFailed, dial_derp, tls_client_context
from agent.proto.derp.client import Connected, DerpClientConn
from agent.proto.derp.upgrade import parse_request
from agent.relay.server import RelayServer, serve_relay
from tests.tls_pair import Tls, make_tls

LOG = structlog.get_logger()
TIMEOUT = 5.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest_asyncio.fixture
async def relay(tls: Tls) -> AsyncIterator[RelayServer]:
    server = await serve_relay(
        "127.0.0.1",
        0,
        private_key=secrets.token_bytes(32),
        ssl_context=tls.server,
        stun_port=None,
        log=LOG,
    )
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def _server(tls: Tls, handler: Handler) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 running `handler` per connection; yields its port."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls.server)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> dict[str, str]:
    head = await reader.readuntil(b"\r\n\r\n")
    parsed = parse_request(head)
    assert parsed is not None
    return parsed[0].headers


@pytest.mark.asyncio
async def test_upgrade_to_our_relay_then_login_over_streams(relay: RelayServer, tls: Tls) -> None:
    upgraded = await dial_derp("127.0.0.1", relay.port, ssl_context=tls.client)
    assert upgraded.response.status == 101
    assert upgraded.response.headers["derp-public-key"] == relay.core.public_key.hex()
    reader, writer = upgraded.streams()
    conn = DerpClientConn(secrets.token_bytes(32))
    loop = asyncio.get_running_loop()
    conn.connection_made(loop.time())
    events: list[object] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            while not any(isinstance(e, Connected) for e in events):
                writer.write(conn.data_to_send())
                data = await reader.read(65536)
                assert data, "EOF before the login finished"
                conn.receive_data(data, loop.time())
                events += conn.events()
        connected = next(e for e in events if isinstance(e, Connected))
        assert connected.server_key == relay.core.public_key
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.made = False
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        assert self.made
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.mark.asyncio
async def test_bytes_after_the_101_reach_the_attached_protocol_in_order(tls: Tls) -> None:
    seen: list[dict[str, str]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\nfirst|")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"second")
        await writer.drain()

    async with _server(tls, answer) as port:
        upgraded = await dial_derp("127.0.0.1", port, ssl_context=tls.client)
        await asyncio.sleep(0.02)  # let more arrive before the hand-over: none may be lost
        proto = _Collect()
        upgraded.attach(proto)
        async with asyncio.timeout(TIMEOUT):
            await proto.lost
    assert bytes(proto.data) == b"first|second"
    # The Host value carries the port when it is not 443 (as Go's net/http writes a URL's host).
    assert seen[0]["host"] == f"127.0.0.1:{port}"
    assert seen[0]["upgrade"] == "DERP"
    assert seen[0]["connection"] == "Upgrade"


_OVERSIZED = b"HTTP/1.1 101 Switching Protocols\r\n" + (b"X-Padding: " + b"a" * 19 + b"\r\n") * 1000


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "hang_up", "error"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", False, "HTTP 403"),
        (b"", True, "closed before the upgrade response"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", False, "bad HTTP response"),
        (_OVERSIZED, False, "head over"),  # 32 KiB of headers and never the blank line
    ],
    ids=["refused", "eof", "not-http", "oversized"],
)
async def test_an_upgrade_not_answered_with_101_fails(
    tls: Tls, answer: bytes, hang_up: bool, error: str
) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        if not hang_up:
            await asyncio.sleep(TIMEOUT)

    async with _server(tls, respond) as port:
        with pytest.raises(UpgradeFailed, match=error):
            await dial_derp("127.0.0.1", port, ssl_context=tls.client)


@pytest.mark.asyncio
async def test_a_stalled_response_head_times_out(tls: Tls) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DE")
        await writer.drain()
        await asyncio.sleep(TIMEOUT)

    async with _server(tls, stall) as port:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await dial_derp("127.0.0.1", port, ssl_context=tls.client, dial_timeout=0.3)
        assert loop.time() - start < 2.0


@pytest.mark.asyncio
async def test_a_certificate_we_do_not_trust_is_refused(relay: RelayServer, tmp_path: Path) -> None:
    other = make_tls(tmp_path / "other")  # another CA: the relay's certificate is not from it
    with pytest.raises(ssl.SSLCertVerificationError):
        await dial_derp("127.0.0.1", relay.port, ssl_context=other.client)
    with pytest.raises(ssl.SSLCertVerificationError):  # and the system store does not know it
        await dial_derp("127.0.0.1", relay.port, ssl_context=tls_client_context())


@pytest.mark.asyncio
async def test_a_name_the_certificate_does_not_cover_is_refused(
    relay: RelayServer, tls: Tls
) -> None:
    # The certificate is for 127.0.0.1; "localhost" is checked against it as the SNI name.
    with pytest.raises(ssl.SSLCertVerificationError):
        await dial_derp("localhost", relay.port, ssl_context=tls.client)


@pytest.mark.asyncio
async def test_ca_file_and_insecure_contexts(relay: RelayServer, tls: Tls) -> None:
    for ctx in (tls_client_context(str(tls.cert)), tls_client_context(insecure=True)):
        upgraded = await dial_derp("127.0.0.1", relay.port, ssl_context=ctx)
        assert upgraded.response.status == 101
        upgraded.transport.abort()
    # insecure checks nothing, not even the name
    upgraded = await dial_derp(
        "localhost", relay.port, ssl_context=tls_client_context(insecure=True)
    )
    upgraded.transport.abort()
