"""The agent's DERP links against our relay on loopback over real TLS."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from agent.config import DerpConfig, DerpNode, DerpRegion
from agent.keys import NodePrivate, NodePublic
from agent.netio.certs import make_self_signed
from agent.node import derp_client
from agent.node.derp_client import BACKOFF_MAX, DerpClients, backoff_delay
from agent.relay.server import RelayServer, serve_relay

LOG = structlog.get_logger()
TIMEOUT = 10.0

Received = list[tuple[int, NodePublic, list[bytes]]]


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    assert backoff_delay(0, lambda: 0.0) == pytest.approx(0.125)
    assert backoff_delay(0, lambda: 0.999999) == pytest.approx(0.25, rel=1e-5)
    assert backoff_delay(1, lambda: 0.0) == pytest.approx(0.25)
    assert backoff_delay(50, lambda: 0.999999) == pytest.approx(BACKOFF_MAX, rel=1e-5)
    assert all(0 < backoff_delay(n) <= BACKOFF_MAX for n in range(40))


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_self_signed(tmp_path / "certs", "127.0.0.1")


def _server_ctx(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


async def _serve(cert: tuple[Path, Path], port: int = 0) -> RelayServer:
    return await serve_relay(
        "127.0.0.1",
        port,
        private_key=secrets.token_bytes(32),
        ssl_context=_server_ctx(cert),
        stun_port=None,
        log=LOG,
    )


@pytest_asyncio.fixture
async def relay(cert: tuple[Path, Path]) -> AsyncIterator[RelayServer]:
    server = await _serve(cert)
    try:
        yield server
    finally:
        await server.close()


def _derp(port: int, cert: Path, *regions: int) -> DerpConfig:
    node = DerpNode(host="127.0.0.1", port=port, ca_file=str(cert))
    return DerpConfig(
        home_region=regions[0],
        regions=tuple(DerpRegion(id=r, code=f"r{r}", nodes=(node,)) for r in regions),
    )


async def _until(cond: Callable[[], bool], what: str, within: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Node:
    def __init__(self, derp: DerpConfig) -> None:
        self.key = NodePrivate.generate()
        self.received: Received = []
        self.clients = DerpClients(derp, self.key, self._on_packets)

    def _on_packets(self, region: int, src: NodePublic, packets: list[bytes]) -> None:
        self.received.append((region, src, packets))

    def payloads(self) -> list[bytes]:
        return [p for _r, _s, batch in self.received for p in batch]


@pytest.mark.asyncio
async def test_two_agents_exchange_datagrams_through_the_home_region(
    relay: RelayServer, cert: tuple[Path, Path]
) -> None:
    derp = _derp(relay.port, cert[0], 900)
    a, b = Node(derp), Node(derp)
    a.clients.start()
    b.clients.start()
    try:
        await _until(lambda: a.clients.connected_regions() == (900,), "a connected")
        await _until(lambda: b.clients.connected_regions() == (900,), "b connected")
        assert a.clients.send(900, b.key.public(), [b"one", b"two"]) == 0
        await _until(lambda: len(b.payloads()) == 2, "b received")
        assert b.received[0][:2] == (900, a.key.public())
        assert b.payloads() == [b"one", b"two"]
        assert b.clients.send(900, a.key.public(), [b"back"]) == 0
        await _until(lambda: a.payloads() == [b"back"], "a received")
        stats = a.clients.stats()
        assert stats["tx_packets"] == 2
        assert stats["rx_packets"] == 1
        assert stats["connects"] == 1
    finally:
        await a.clients.close()
        await b.clients.close()


@pytest.mark.asyncio
async def test_datagrams_sent_while_connecting_wait_for_the_link(
    relay: RelayServer, cert: tuple[Path, Path]
) -> None:
    derp = _derp(relay.port, cert[0], 900, 901)
    a, b = Node(derp), Node(derp)
    b.clients.start()
    a.clients.start()
    try:
        await _until(lambda: b.clients.connected_regions() == (900,), "b connected")
        # a's region 901 link does not exist yet: created on demand, the datagram waits
        assert a.clients.send(901, b.key.public(), [b"early"]) == 0
        await _until(lambda: b.payloads() == [b"early"], "queued datagram delivered")
        assert b.received[0][0] == 900  # b hears it on its own (home) connection
        await _until(lambda: a.clients.connected_regions() == (900, 901), "a on both")
    finally:
        await a.clients.close()
        await b.clients.close()


@pytest.mark.asyncio
async def test_link_reconnects_after_the_relay_restarts(cert: tuple[Path, Path]) -> None:
    server = await _serve(cert)
    port = server.port
    derp = _derp(port, cert[0], 900)
    a, b = Node(derp), Node(derp)
    a.clients.start()
    b.clients.start()
    try:
        await _until(lambda: len(a.clients.connected_regions()) == 1, "a connected")
        await _until(lambda: len(b.clients.connected_regions()) == 1, "b connected")
        await server.close()
        await _until(lambda: not a.clients.connected_regions(), "a noticed the loss")
        server = await _serve(cert, port)
        await _until(lambda: a.clients.connected_regions() == (900,), "a reconnected", 8)
        await _until(lambda: b.clients.connected_regions() == (900,), "b reconnected", 8)
        a.clients.send(900, b.key.public(), [b"after restart"])
        await _until(lambda: b.payloads() == [b"after restart"], "delivered after restart")
        assert a.clients.stats()["connects"] == 2
    finally:
        await a.clients.close()
        await b.clients.close()
        await server.close()


@pytest.mark.asyncio
async def test_unreachable_relay_is_retried_and_counted(cert: tuple[Path, Path]) -> None:
    server = await _serve(cert)
    port = server.port
    await server.close()  # nothing listens there now
    a = Node(_derp(port, cert[0], 900))
    a.clients.start()
    try:
        await _until(lambda: a.clients.stats().get("connect_failures", 0) >= 2, "retries")
        assert a.clients.connected_regions() == ()
        # queued, not lost, while the relay is away; bounded
        assert a.clients.send(900, a.key.public(), [b"x"] * 10) == 0
        dropped = a.clients.send(900, a.key.public(), [b"y"] * derp_client.MAX_PENDING)
        assert dropped == 10
    finally:
        await a.clients.close()


@pytest.mark.asyncio
async def test_idle_non_home_regions_are_closed(
    relay: RelayServer, cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(derp_client, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(derp_client, "IDLE_CHECK", 0.1)
    a = Node(_derp(relay.port, cert[0], 900, 901))
    a.clients.start()
    try:
        a.clients.send(901, a.key.public(), [b"x"])
        await _until(lambda: a.clients.connected_regions() == (900, 901), "both up")
        await _until(lambda: a.clients.connected_regions() == (900,), "idle 901 closed")
        assert 900 in a.clients.links
        assert 901 not in a.clients.links
    finally:
        await a.clients.close()


@pytest.mark.asyncio
async def test_wrong_certificate_is_refused(relay: RelayServer, tmp_path: Path) -> None:
    other_cert, _ = make_self_signed(tmp_path / "other", "127.0.0.1")
    a = Node(_derp(relay.port, other_cert, 900))
    a.clients.start()
    try:
        await _until(lambda: a.clients.stats().get("connect_failures", 0) >= 1, "refused")
        assert a.clients.connected_regions() == ()
    finally:
        await a.clients.close()


@pytest.mark.asyncio
async def test_set_home_moves_the_preferred_region(
    relay: RelayServer, cert: tuple[Path, Path]
) -> None:
    a = Node(_derp(relay.port, cert[0], 900, 901))
    a.clients.start()
    try:
        await _until(lambda: a.clients.connected_regions() == (900,), "home up")
        assert set(a.clients.last_heard()) == {900}
        a.clients.set_home(901)
        assert a.clients.home_region == 901
        await _until(lambda: a.clients.connected_regions() == (900, 901), "new home up")
        assert a.clients.links[901].preferred
        assert not a.clients.links[900].preferred
        a.clients.set_home(12345)  # not in the map: ignored
        assert a.clients.home_region == 901
    finally:
        await a.clients.close()
