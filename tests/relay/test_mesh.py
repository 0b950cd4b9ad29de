"""A three-node region of real relays on loopback over TLS: mesh forwarding, restart, verify."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from agent.keys import NodePrivate
from agent.proto.derp.client import (
    Connected,
    DerpClientConn,
    PacketReceived,
    PeerGoneEvent,
)
from agent.relay.main import load_allowed_keys
from agent.relay.mesh import MeshPeer, load_mesh_key, parse_mesh_with
from agent.relay.server import RelayServer, serve_relay
from tests.derp_stream import DerpStreamClient
from tests.tls_pair import Tls

LOG = structlog.get_logger()
MESH_KEY = bytes(range(100, 132))
RETRY = 0.05  # mesh reconnect backoff base for tests


async def _eventually(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Region:
    def __init__(self, tls: Tls) -> None:
        self.tls = tls
        self.keys = [secrets.token_bytes(32) for _ in range(3)]
        self.nodes: list[RelayServer] = []
        self.clients: list[DerpStreamClient] = []

    async def start_node(self, index: int, port: int = 0) -> RelayServer:
        relay = await serve_relay(
            "127.0.0.1",
            port,
            private_key=self.keys[index],
            ssl_context=self.tls.server,
            stun_port=None,
            log=LOG,
            mesh_key=MESH_KEY,
        )
        return relay

    def peers_of(self, index: int) -> list[MeshPeer]:
        return [MeshPeer("127.0.0.1", n.port) for i, n in enumerate(self.nodes) if i != index]

    def mesh(self, index: int) -> None:
        self.nodes[index].start_mesh(
            self.peers_of(index),
            private_key=self.keys[index],
            mesh_key=MESH_KEY,
            ssl_context=self.tls.client,
            retry_base=RETRY,
        )

    async def meshed(self) -> None:
        def ready() -> bool:
            return all(
                len(n.core.mesh_conns()) == 2 and all(ln.connected for ln in n.mesh_links.values())
                for n in self.nodes
            )

        await _eventually(ready, "a full mesh")

    async def connect(self, index: int, private: bytes | None = None) -> DerpStreamClient:
        client = await _connect(self.nodes[index].port, self.tls.client, private)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for node in self.nodes:
            await node.close()


async def _connect(
    port: int, ctx: ssl.SSLContext, private: bytes | None = None
) -> DerpStreamClient:
    """DerpStreamClient logging in with `private` (a fresh key when None)."""
    key = private if private is not None else secrets.token_bytes(32)

    class Keyed(DerpStreamClient):
        def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            super().__init__(reader, writer)
            self.conn = DerpClientConn(key)

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    return await Keyed.upgrade(reader, writer, f"127.0.0.1:{port}")


@pytest_asyncio.fixture
async def region(tls: Tls) -> AsyncIterator[Region]:
    r = Region(tls)
    try:
        r.nodes = [await r.start_node(i) for i in range(3)]
        for i in range(3):
            r.mesh(i)
        await r.meshed()
        yield r
    finally:
        await r.close()


async def _send(src: DerpStreamClient, dst: DerpStreamClient, payload: bytes) -> None:
    src.conn.send_packet(dst.conn.public_key, payload, src.now())
    src.flush()
    got = await dst.wait_for(lambda e: isinstance(e, PacketReceived) and e.packet == payload)
    assert got == PacketReceived(src.conn.public_key, payload)


@pytest.mark.asyncio
async def test_client_on_node1_reaches_client_on_node3(region: Region) -> None:
    n1, n2, n3 = region.nodes
    a = await region.connect(0)
    b = await region.connect(2)
    await a.wait_for(lambda e: isinstance(e, Connected))
    await b.wait_for(lambda e: isinstance(e, Connected))
    await _eventually(lambda: b.conn.public_key in n1.core.remote_clients(), "n1 learning B")
    assert n1.core.remote_clients()[b.conn.public_key] == [MeshPeer("127.0.0.1", n3.port).name]

    await _send(a, b, b"node 1 to node 3")
    await _eventually(lambda: b.conn.public_key not in n2.core.clients(), "settle")
    await _send(b, a, b"and back")
    assert n1.core.counters.packets_forwarded_out == 1
    assert n3.core.counters.packets_forwarded_in == 1
    assert n3.core.counters.packets_forwarded_out == 1
    assert n1.core.counters.packets_forwarded_in == 1
    assert n2.core.counters.packets_forwarded_in == 0  # one hop, never via n2
    assert n2.core.counters.packets_relayed == 0

    # A leaves node 1: B hears PeerGone through the mesh (it had received from A).
    await a.close()
    gone = await b.wait_for(lambda e: isinstance(e, PeerGoneEvent))
    assert gone == PeerGoneEvent(a.conn.public_key, 0)


@pytest.mark.asyncio
async def test_node3_restart_node1_reconnects_and_forwarding_resumes(region: Region) -> None:
    n1, _, n3 = region.nodes
    link = n1.mesh_links[MeshPeer("127.0.0.1", n3.port).name]
    a = await region.connect(0)
    b = await region.connect(2)
    await _eventually(lambda: b.conn.public_key in n1.core.remote_clients(), "n1 learning B")
    await _send(a, b, b"before the restart")

    port = n3.port
    await n3.close()
    await _eventually(lambda: not link.connected, "n1 noticing n3 down")
    assert b.conn.public_key not in n1.core.remote_clients()
    a.conn.send_packet(b.conn.public_key, b"into the void", a.now())
    a.flush()
    await _eventually(lambda: n1.core.drops.get("unknown_dest", 0) == 1, "a counted drop")

    region.nodes[2] = n3 = await region.start_node(2, port)
    region.mesh(2)
    await region.meshed()
    assert link.sessions == 2
    b2 = await region.connect(2, None)
    await _eventually(lambda: b2.conn.public_key in n1.core.remote_clients(), "n1 learning B2")
    await _send(a, b2, b"after the restart")
    assert n3.core.counters.packets_forwarded_in == 1


@pytest.mark.asyncio
async def test_mesh_link_to_ourselves_stops() -> None:
    """`--mesh-with` may list our own node under another name: the server key gives it away."""
    key = secrets.token_bytes(32)
    relay = await serve_relay(
        "127.0.0.1", 0, private_key=key, ssl_context=None, stun_port=None, log=LOG,
        mesh_key=MESH_KEY,
    )  # fmt: skip
    try:
        me = MeshPeer("127.0.0.1", relay.port)
        relay.start_mesh([me], private_key=key, mesh_key=MESH_KEY, ssl_context=None)
        link = relay.mesh_links[me.name]
        await _eventually(lambda: link.is_self, "self detection")
        assert link.sessions == 0
        assert relay.core.remote_clients() == {}
        await _eventually(lambda: not link.running, "the loop ending")
    finally:
        await relay.close()


@pytest.mark.asyncio
async def test_verify_clients_file(tls: Tls, tmp_path: Path) -> None:
    listed = NodePrivate.generate()
    listed_hex = NodePrivate.generate()
    allowed_file = tmp_path / "allowed"
    allowed_file.write_text(
        f"# region clients\n{listed.public().to_b64()}  # laptop\n\n"
        f"nodekey:{listed_hex.public().to_hex()}\n"
    )
    allowed = load_allowed_keys(allowed_file)
    assert allowed == {listed.public().raw, listed_hex.public().raw}
    relay = await serve_relay(
        "127.0.0.1", 0, private_key=secrets.token_bytes(32), ssl_context=tls.server,
        stun_port=None, log=LOG, verify_client=allowed.__contains__, mesh_key=MESH_KEY,
    )  # fmt: skip
    clients: list[DerpStreamClient] = []
    try:
        for private in (listed.raw, listed_hex.raw):
            client = await _connect(relay.port, tls.client, private)
            clients.append(client)
            await client.wait_for(lambda e: isinstance(e, Connected))
        stranger = await _connect(relay.port, tls.client)
        clients.append(stranger)
        with pytest.raises(AssertionError, match="EOF while waiting"):
            await stranger.wait_for(lambda e: isinstance(e, Connected))
        assert not any(isinstance(e, Connected) for e in stranger.events)
        # A mesh peer is not in the file but holds the mesh key: it gets in.
        peer = await _connect_mesh(relay.port, tls.client)
        clients.append(peer)
        await peer.wait_for(lambda e: isinstance(e, Connected))
        assert set(relay.core.clients()) == {
            listed.public().raw,
            listed_hex.public().raw,
            peer.conn.public_key,
        }
        assert len(relay.core.mesh_conns()) == 1
    finally:
        for client in clients:
            await client.close()
        await relay.close()


async def _connect_mesh(port: int, ctx: ssl.SSLContext) -> DerpStreamClient:
    class Mesh(DerpStreamClient):
        def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            super().__init__(reader, writer)
            self.conn = DerpClientConn(
                secrets.token_bytes(32), can_ack_pings=False, mesh_key=MESH_KEY
            )

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    return await Mesh.upgrade(reader, writer, f"127.0.0.1:{port}")


def test_parse_mesh_with_skips_ourselves() -> None:
    text = "https://198.18.0.11:443, https://198.18.0.12,derp3.example:8443,https://[fd00::1]:443"
    peers = parse_mesh_with(text, own=[("198.18.0.12", 443)])
    assert peers == [
        MeshPeer("198.18.0.11", 443),
        MeshPeer("derp3.example", 8443),
        MeshPeer("fd00::1", 443),
    ]
    assert [p.name for p in peers] == ["198.18.0.11:443", "derp3.example:8443", "[fd00::1]:443"]
    assert peers[0].host_header == "198.18.0.11"
    assert peers[1].host_header == "derp3.example:8443"
    for bad in ("http://x:80", "https://x:99999", "https://x/derp/more"):
        with pytest.raises(ValueError, match="--mesh-with"):
            parse_mesh_with(bad)


def test_load_mesh_key(tmp_path: Path) -> None:
    good = tmp_path / "mesh.key"
    good.write_text(MESH_KEY.hex() + "\n")
    assert load_mesh_key(good) == MESH_KEY
    for text in ("", "abc", MESH_KEY.hex()[:-2], "zz" * 32, MESH_KEY.hex() + "00"):
        bad = tmp_path / "bad.key"
        bad.write_text(text)
        with pytest.raises(ValueError, match="64 hex digits"):
            load_mesh_key(bad)


def test_load_allowed_keys_names_the_bad_line(tmp_path: Path) -> None:
    f = tmp_path / "allowed"
    f.write_text(f"{NodePrivate.generate().public().to_b64()}\nnodekey:1234\n")
    with pytest.raises(ValueError, match=r"allowed:2: not a public key"):
        load_allowed_keys(f)
