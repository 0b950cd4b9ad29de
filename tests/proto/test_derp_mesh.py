"""Region mesh in RelayCore: three cores wired in memory by their own mesh clients, fake clock."""

from __future__ import annotations

import contextlib
import ipaddress
import random
from dataclasses import dataclass, field

import pytest
from nacl.public import PrivateKey

from agent.proto.derp.client import (
    ClientState,
    Connected,
    DerpClientConn,
    PacketReceived,
    PeerGoneEvent,
    PeerPresentEvent,
)
from agent.proto.derp.frames import (
    NONCE_LEN,
    ClientInfo,
    FrameBuffer,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    PeerPresentFlags,
    WatchConns,
    open_client_info,
    seal_client_info,
)
from agent.proto.derp.server import (
    ClientRegistered,
    CloseConnection,
    ConnState,
    ForwardToMesh,
    RelayCore,
)
from agent.proto.errors import RemoteProtocolError

T0 = 5000.0
MESH_KEY = bytes(range(32))
DISCO = "TS💬".encode() + bytes(70)  # looks like disco: gets NotHere when undeliverable


def _key(seed: int) -> bytes:
    return bytes(PrivateKey(random.Random(seed).randbytes(32)))


def _pub(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


@dataclass
class MeshLink:
    """Node `owner`'s outbound mesh client to node `target` (conn id `conn_id` there)."""

    owner: Node
    target: Node
    conn_id: int
    client: DerpClientConn
    events: list[object] = field(default_factory=list)


class Node:
    def __init__(self, name: str, seed: int, rand: random.Random, mesh_key: bytes | None) -> None:
        self.name = name
        self.private = _key(seed)
        self.core = RelayCore(self.private, randbytes=rand.randbytes, mesh_key=mesh_key)
        self.clients: dict[int, DerpClientConn] = {}
        self.links: dict[str, MeshLink] = {}  # outbound, by target node name
        self.forwarded: list[ForwardToMesh] = []
        self.closed: list[CloseConnection] = []
        self.registered: list[ClientRegistered] = []


class Region:
    """Every node dials every other node with its server key and the mesh key, like derper."""

    def __init__(self, names: list[str], mesh_key: bytes | None = MESH_KEY) -> None:
        self.now = T0
        self.rand = random.Random(11)
        self.nodes = {n: Node(n, 100 + i, self.rand, mesh_key) for i, n in enumerate(names)}
        self.next_id = 1000
        for owner in self.nodes.values():
            for target in self.nodes.values():
                if target is not owner:
                    self.link(owner, target, mesh_key)
        self.pump()

    def link(self, owner: Node, target: Node, mesh_key: bytes | None) -> MeshLink:
        self.next_id += 1
        client = DerpClientConn(
            owner.private, randbytes=self.rand.randbytes, can_ack_pings=False, mesh_key=mesh_key
        )
        client.connection_made(self.now)
        target.core.connection_made(self.next_id, self.now, ("127.0.0.1", self.next_id))
        link = MeshLink(owner, target, self.next_id, client)
        owner.links[target.name] = link
        return link

    def connect(self, node: str, conn_id: int, private: bytes) -> DerpClientConn:
        n = self.nodes[node]
        client = DerpClientConn(private, randbytes=self.rand.randbytes)
        client.connection_made(self.now)
        n.clients[conn_id] = client
        n.core.connection_made(conn_id, self.now, ("198.18.0.9", 40000 + conn_id))
        self.pump()
        return client

    def disconnect(self, node: str, conn_id: int) -> None:
        n = self.nodes[node]
        del n.clients[conn_id]
        n.core.connection_lost(conn_id)
        self.pump()

    def drop_link(self, owner: str, target: str) -> None:
        link = self.nodes[owner].links.pop(target)
        link.target.core.connection_lost(link.conn_id)
        self.nodes[owner].core.mesh_peer_lost(target)
        self.pump()

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for node in self.nodes.values():
                moved |= self._pump_node(node)

    def _pump_node(self, node: Node) -> bool:
        moved = False
        for event in node.core.events():
            if isinstance(event, ForwardToMesh):
                node.forwarded.append(event)
                link = node.links.get(event.node)
                if link is not None:
                    link.client.forward_packet(event.src, event.dst, event.packet, self.now)
            elif isinstance(event, CloseConnection):
                node.closed.append(event)
            else:
                node.registered.append(event)
        for conn_id, client in node.clients.items():
            moved |= self._copy(node.core, conn_id, client)
        for link in node.links.values():
            moved |= self._copy(link.target.core, link.conn_id, link.client)
            for ev in link.client.events():
                link.events.append(ev)
                if isinstance(ev, Connected):
                    link.client.watch_conns()
                    moved = True
                elif isinstance(ev, PeerPresentEvent):
                    node.core.mesh_peer_present(link.target.name, ev.key)
                elif isinstance(ev, PeerGoneEvent):
                    node.core.mesh_peer_gone(link.target.name, ev.key)
        return moved

    def _copy(self, core: RelayCore, conn_id: int, client: DerpClientConn) -> bool:
        moved = False
        down = core.data_to_send(conn_id)
        if down and client.state is not ClientState.CLOSED:
            client.receive_data(down, self.now)
            moved = True
        up = client.data_to_send()
        conn = core._conns.get(conn_id)
        if up and conn is not None and conn.state is not ConnState.CLOSED:
            with contextlib.suppress(RemoteProtocolError):  # CloseConnection tells the tests
                core.receive_data(conn_id, up, self.now)
            moved = True
        return moved


@pytest.fixture
def region() -> Region:
    return Region(["n1", "n2", "n3"])


def test_mesh_links_log_in_as_mesh_peers_and_watch(region: Region) -> None:
    for node in region.nodes.values():
        assert len(node.core.mesh_conns()) == 2
        assert all(r.mesh for r in node.registered)
        for link in node.links.values():
            assert link.client.state is ClientState.CONNECTED
    # Only the other nodes' own mesh connections are clients so far: n2's is on n3, n3's on n2.
    assert region.nodes["n1"].core.remote_clients() == {
        _pub(region.nodes["n2"].private): ["n3"],
        _pub(region.nodes["n3"].private): ["n2"],
    }


def test_a_on_node1_reaches_b_on_node3_in_one_hop(region: Region) -> None:
    a_priv, b_priv = _key(1), _key(2)
    a = region.connect("n1", 1, a_priv)
    b = region.connect("n3", 3, b_priv)
    n1, n2, n3 = (region.nodes[n] for n in ("n1", "n2", "n3"))
    assert n1.core.remote_clients()[_pub(b_priv)] == ["n3"]
    assert n3.core.remote_clients()[_pub(a_priv)] == ["n1"]

    a.send_packet(_pub(b_priv), b"over the mesh", region.now)
    region.pump()
    assert b.events()[-1] == PacketReceived(_pub(a_priv), b"over the mesh")
    assert n1.forwarded == [ForwardToMesh("n3", _pub(a_priv), _pub(b_priv), b"over the mesh")]
    assert n1.core.counters.packets_forwarded_out == 1
    assert n1.core.counters.bytes_forwarded_out == len(b"over the mesh")
    assert n3.core.counters.packets_forwarded_in == 1
    assert n3.core.counters.packets_relayed == 1
    assert n2.core.counters.packets_forwarded_in == 0
    assert n3.forwarded == []
    assert n2.forwarded == []
    # And back: B answers A the same way.
    b.send_packet(_pub(a_priv), b"reply", region.now)
    region.pump()
    assert a.events()[-1] == PacketReceived(_pub(b_priv), b"reply")


def test_local_destination_wins_over_mesh(region: Region) -> None:
    b_priv = _key(2)
    a = region.connect("n1", 1, _key(1))
    region.connect("n3", 3, b_priv)
    b_local = region.connect("n1", 2, b_priv)
    a.send_packet(_pub(b_priv), b"x", region.now)
    region.pump()
    assert b_local.events()[-1] == PacketReceived(_pub(_key(1)), b"x")
    assert region.nodes["n1"].forwarded == []


def test_forward_for_a_key_not_local_is_dropped_not_forwarded(region: Region) -> None:
    """n2 forwards to n3 a packet for C, which is on n1: n3 knows C via the mesh but must not
    forward a second hop; it drops and tells n2 NotHere (disco), and n2 forgets C on n3."""
    c_priv, a_priv = _key(3), _key(1)
    c = region.connect("n1", 1, c_priv)
    c.events()
    n2, n3 = region.nodes["n2"], region.nodes["n3"]
    assert n3.core.remote_clients()[_pub(c_priv)] == ["n1"]
    n2.core.mesh_peer_present("n3", _pub(c_priv))  # a stale mapping: C "on n3" as seen from n2
    link = n2.links["n3"]
    link.client.forward_packet(_pub(a_priv), _pub(c_priv), DISCO, region.now)
    region.pump()
    assert n3.core.drops == {"unknown_dest_on_fwd": 1}
    assert n3.forwarded == []
    assert n3.core.counters.packets_forwarded_in == 1
    assert n3.core.counters.packets_relayed == 0
    assert c.events() == []
    assert PeerGoneEvent(_pub(c_priv), PeerGoneReason.NOT_HERE) in link.events
    assert n2.core.remote_clients()[_pub(c_priv)] == ["n1"]  # n3 removed, n1 kept


def test_non_mesh_client_sending_watch_conns_is_closed(region: Region) -> None:
    n1 = region.nodes["n1"]
    a = region.connect("n1", 1, _key(1))
    assert not n1.registered[-1].mesh
    with pytest.raises(RemoteProtocolError):
        n1.core.receive_data(1, WatchConns().encode(), region.now)
    assert n1.core.events() == [CloseConnection(1, "protocol error: insufficient permissions")]
    assert _pub(_key(1)) not in n1.core.clients()
    assert a.state is ClientState.CONNECTED  # the client only learns by EOF


def test_wrong_mesh_key_is_not_a_mesh_peer() -> None:
    rand = random.Random(5)
    core = RelayCore(_key(100), randbytes=rand.randbytes, mesh_key=MESH_KEY)
    client = DerpClientConn(_key(1), randbytes=rand.randbytes, mesh_key=bytes(32))
    client.connection_made(T0)
    core.connection_made(1, T0)
    client.receive_data(core.data_to_send(1), T0)
    core.receive_data(1, client.data_to_send(), T0)
    (registered,) = core.events()
    assert isinstance(registered, ClientRegistered)
    assert registered.info["meshKey"] == "00" * 32
    assert not registered.mesh
    assert core.mesh_conns() == []
    client.receive_data(core.data_to_send(1), T0)
    client.watch_conns()
    with pytest.raises(RemoteProtocolError, match="insufficient permissions"):
        core.receive_data(1, client.data_to_send(), T0)


@pytest.mark.parametrize("bad", ["", "abc", "zz" * 32, 7])
def test_malformed_mesh_key_drops_the_connection(bad: object) -> None:
    server_priv, client_priv = _key(100), _key(1)
    core = RelayCore(server_priv, mesh_key=MESH_KEY)
    core.connection_made(1, T0)
    sealed = seal_client_info(
        client_priv, _pub(server_priv), {"MeshKey": bad, "version": 2}, bytes(NONCE_LEN)
    )
    with pytest.raises(RemoteProtocolError, match="meshKey"):
        core.receive_data(1, ClientInfo(_pub(client_priv), sealed).encode(), T0)
    assert core.clients() == {}


def test_mesh_client_info_json_matches_derper() -> None:
    server_priv = _key(100)
    client = DerpClientConn(_key(1), can_ack_pings=False, mesh_key=MESH_KEY)
    core = RelayCore(server_priv, mesh_key=MESH_KEY)
    core.connection_made(1, T0)
    client.receive_data(core.data_to_send(1), T0)
    (frame,) = FrameBuffer().feed(client.data_to_send())
    assert isinstance(frame, ClientInfo)
    info = open_client_info(server_priv, frame.key, frame.sealed)
    assert list(info.items()) == [
        ("meshKey", MESH_KEY.hex()),
        ("version", 2),
        ("CanAckPings", False),
    ]


def test_mesh_peer_bypasses_verify_client() -> None:
    rand = random.Random(6)
    core = RelayCore(
        _key(100), randbytes=rand.randbytes, verify_client=lambda _: False, mesh_key=MESH_KEY
    )
    for conn_id, mesh_key in ((1, MESH_KEY), (2, None)):
        client = DerpClientConn(_key(conn_id), randbytes=rand.randbytes, mesh_key=mesh_key)
        client.connection_made(T0)
        core.connection_made(conn_id, T0)
        client.receive_data(core.data_to_send(conn_id), T0)
        core.receive_data(conn_id, client.data_to_send(), T0)
    assert core.mesh_conns() == [1]
    assert list(core.clients()) == [_pub(_key(1))]
    assert CloseConnection(2, "client not allowed") in core.events()


def test_watch_conns_flood_then_stream() -> None:
    """The flood lists current keys (endpoint and flags); dups each get PeerPresent, and
    PeerGone comes only when a key's last connection goes (derpserver.go)."""
    rand = random.Random(8)
    core = RelayCore(_key(100), randbytes=rand.randbytes, mesh_key=MESH_KEY)

    def login(conn_id: int, private: bytes, mesh_key: bytes | None = None) -> DerpClientConn:
        client = DerpClientConn(private, randbytes=rand.randbytes, mesh_key=mesh_key)
        client.connection_made(T0)
        core.connection_made(conn_id, T0, ("192.0.2.1", 1000 + conn_id))
        client.receive_data(core.data_to_send(conn_id), T0)
        core.receive_data(conn_id, client.data_to_send(), T0)
        client.receive_data(core.data_to_send(conn_id), T0)
        return client

    login(1, _key(1))
    watcher = login(9, _key(9), MESH_KEY)
    watcher.watch_conns()
    core.receive_data(9, watcher.data_to_send(), T0)
    flood = FrameBuffer().feed(core.data_to_send(9))
    ip = ipaddress.ip_address("192.0.2.1")
    assert flood == [
        PeerPresent(_pub(_key(1)), (ip, 1001), PeerPresentFlags.IS_REGULAR),
        PeerPresent(_pub(_key(9)), (ip, 1009), PeerPresentFlags.IS_MESH_PEER),
    ]
    login(2, _key(2))
    login(3, _key(2))  # a dup of key 2
    assert FrameBuffer().feed(core.data_to_send(9)) == [
        PeerPresent(_pub(_key(2)), (ip, 1002), PeerPresentFlags.IS_REGULAR),
        PeerPresent(_pub(_key(2)), (ip, 1003), PeerPresentFlags.IS_REGULAR),
    ]
    core.connection_lost(2)
    assert core.data_to_send(9) == b""
    core.connection_lost(3)
    assert FrameBuffer().feed(core.data_to_send(9)) == [PeerGone(_pub(_key(2)))]


def test_close_peer_closes_every_local_connection_of_the_key(region: Region) -> None:
    region.connect("n3", 1, _key(2))
    region.connect("n3", 2, _key(2))
    region.nodes["n1"].links["n3"].client.close_peer(_pub(_key(2)))
    region.pump()
    closed = region.nodes["n3"].closed
    assert closed == [
        CloseConnection(1, "closed by mesh peer"),
        CloseConnection(2, "closed by mesh peer"),
    ]
    assert _pub(_key(2)) not in region.nodes["n3"].core.clients()


def test_sender_gone_from_region_reaches_remote_receivers(region: Region) -> None:
    a_priv, b_priv = _key(1), _key(2)
    a = region.connect("n1", 1, a_priv)
    b = region.connect("n3", 3, b_priv)
    a.send_packet(_pub(b_priv), b"hi", region.now)
    region.pump()
    b.events()
    region.disconnect("n1", 1)
    assert b.events() == [PeerGoneEvent(_pub(a_priv), PeerGoneReason.DISCONNECTED)]
    assert _pub(a_priv) not in region.nodes["n3"].core.remote_clients()


def test_lost_mesh_link_forgets_that_nodes_clients(region: Region) -> None:
    a_priv, b_priv = _key(1), _key(2)
    a = region.connect("n1", 1, a_priv)
    b = region.connect("n3", 3, b_priv)
    a.send_packet(_pub(b_priv), b"before", region.now)
    region.pump()
    assert b.events()[-1] == PacketReceived(_pub(a_priv), b"before")
    region.drop_link("n1", "n3")
    n1 = region.nodes["n1"]
    assert _pub(b_priv) not in n1.core.remote_clients()
    a.events()
    a.send_packet(_pub(b_priv), DISCO, region.now)
    region.pump()
    assert n1.core.drops == {"unknown_dest": 1}
    assert a.events() == [
        PeerGoneEvent(_pub(b_priv), PeerGoneReason.NOT_HERE),
    ]
    assert b.events() == []


def test_multi_forwarder_prefers_the_first_reporter() -> None:
    core = RelayCore(_key(100))
    k = _pub(_key(5))
    core.mesh_peer_present("n2", k)
    core.mesh_peer_present("n3", k)
    core.mesh_peer_present("n2", k)
    assert core.remote_clients() == {k: ["n2", "n3"]}
    core.mesh_peer_gone("n2", k)
    assert core.remote_clients() == {k: ["n3"]}
    core.mesh_peer_lost("n3")
    assert core.remote_clients() == {}
    core.mesh_peer_present("n2", core.public_key)  # our own watcher, seen from n2: ignored
    assert core.remote_clients() == {}


def test_no_mesh_key_configured_means_no_mesh_peers() -> None:
    region = Region(["n1", "n2"], mesh_key=None)
    for node in region.nodes.values():
        assert node.core.mesh_conns() == []
        closed = [c.reason for c in node.closed]
        assert closed == ["protocol error: insufficient permissions"]  # their WatchConns
