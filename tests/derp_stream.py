"""Test helper: drive our sans-I/O DerpClientConn over an asyncio (TLS) stream.

Used against our relay (tests/relay/test_server.py) and Tailscale's (tests/integration/
test_derp_tailscale.py): the same client, two servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections.abc import Callable

from agent.proto.derp.client import ClientEvent, Connected, DerpClientConn
from agent.proto.derp.upgrade import client_request, parse_response

TIMEOUT = 10.0


class DerpStreamClient:
    """One DERP client connection: upgrade, then bytes <-> DerpClientConn, events collected."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = DerpClientConn(secrets.token_bytes(32))
        self.events: list[ClientEvent] = []
        self.upgrade_headers: dict[str, str] = {}

    @classmethod
    async def upgrade(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> DerpStreamClient:
        """Send `GET /derp` with `Upgrade: DERP`, require the 101, start the DERP login."""
        writer.write(client_request(host))
        buf = b""
        while (parsed := parse_response(buf)) is None:
            chunk = await asyncio.wait_for(reader.read(4096), TIMEOUT)
            assert chunk, "EOF before the 101"
            buf += chunk
        response, leftover = parsed
        assert response.status == 101, response
        client = cls(reader, writer)
        client.upgrade_headers = response.headers
        client.conn.connection_made(asyncio.get_running_loop().time())
        client.feed(leftover)
        return client

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> DerpStreamClient:
        """TLS to 127.0.0.1:`port`, upgrade, and wait until the relay accepted the login."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
        )
        client = await cls.upgrade(reader, writer, f"127.0.0.1:{port}")
        await client.wait_for(lambda e: isinstance(e, Connected))
        return client

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data, self.now())
        self.events += self.conn.events()
        self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)

    async def wait_for(self, want: Callable[[ClientEvent], bool]) -> ClientEvent:
        while True:
            for event in self.events:
                if want(event):
                    self.events.remove(event)
                    return event
            chunk = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            assert chunk, f"EOF while waiting; events so far {self.events}"
            self.feed(chunk)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()
