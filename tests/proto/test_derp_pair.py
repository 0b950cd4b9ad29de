"""DerpClientConn and RelayCore driven against each other by byte copying, on a fake clock."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey

from agent.proto.derp.client import (
    READ_TIMEOUT_REASON,
    ClientState,
    Closed,
    Connected,
    DerpClientConn,
    PacketReceived,
    PeerGoneEvent,
    PongReceived,
)
from agent.proto.derp.frames import (
    CLIENT_READ_TIMEOUT,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    FrameBuffer,
    KeepAlive,
    PeerGone,
    PeerGoneReason,
    SendPacket,
    ServerKey,
    WatchConns,
)
from agent.proto.derp.server import (
    CLIENT_INFO_TIMEOUT,
    ClientRegistered,
    CloseConnection,
    ConnState,
    RelayCore,
)
from agent.proto.errors import RemoteProtocolError

T0 = 1000.0


def _key(seed: int) -> bytes:
    return bytes(PrivateKey(random.Random(seed).randbytes(32)))


def _pub(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


class RelayPair:
    """Clients wired to one RelayCore by copying bytes both ways until quiet (h11 style)."""

    def __init__(self, verify_client: Callable[[bytes], bool] | None = None) -> None:
        self.now = T0
        self.rand = random.Random(7).randbytes
        self.server = RelayCore(_key(1), randbytes=self.rand, verify_client=verify_client)
        self.clients: dict[int, DerpClientConn] = {}

    def connect(self, conn_id: int, private: bytes) -> DerpClientConn:
        client = DerpClientConn(private, randbytes=self.rand)
        client.connection_made(self.now)
        self.clients[conn_id] = client
        self.server.connection_made(conn_id, self.now)
        self.pump()
        return client

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for conn_id, client in self.clients.items():
                down = self.server.data_to_send(conn_id)
                if down and client.state is not ClientState.CLOSED:
                    client.receive_data(down, self.now)
                    moved = True
                up = client.data_to_send()
                if up and self.server_open(conn_id):
                    self.server.receive_data(conn_id, up, self.now)
                    moved = True

    def server_open(self, conn_id: int) -> bool:
        conn = self.server._conns.get(conn_id)
        return conn is not None and conn.state is not ConnState.CLOSED

    def disconnect(self, conn_id: int) -> None:
        del self.clients[conn_id]
        self.server.connection_lost(conn_id)
        self.pump()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.server.on_timer(self.now)
        for client in self.clients.values():
            client.on_timer(self.now)


@pytest.fixture
def pair() -> RelayPair:
    return RelayPair()


def test_handshake_completes_both_sides(pair: RelayPair) -> None:
    a_priv = _key(10)
    a = pair.connect(1, a_priv)
    assert a.state is ClientState.CONNECTED
    assert a.events() == [Connected(pair.server.public_key)]
    assert a.server_info == {"version": 2}
    events = pair.server.events()
    assert len(events) == 1
    assert isinstance(events[0], ClientRegistered)
    assert events[0].key == _pub(a_priv)
    assert events[0].info == {"version": 2, "CanAckPings": True}
    assert pair.server.clients() == {_pub(a_priv): [1]}


def test_packet_is_relayed_with_source_key(pair: RelayPair) -> None:
    a_priv, b_priv = _key(10), _key(11)
    a, b = pair.connect(1, a_priv), pair.connect(2, b_priv)
    a.events(), b.events()
    a.send_packet(_pub(b_priv), b"hello", pair.now)
    pair.pump()
    assert b.events() == [PacketReceived(src=_pub(a_priv), packet=b"hello")]
    assert a.events() == []


def test_unknown_destination_is_a_counted_drop(pair: RelayPair) -> None:
    a = pair.connect(1, _key(10))
    a.events()
    a.send_packet(_pub(_key(99)), b"x", pair.now)
    pair.pump()
    assert pair.server.drops == {"unknown_dest": 1}
    assert a.events() == []  # not disco-looking: no NotHere


def test_unknown_disco_destination_gets_not_here(pair: RelayPair) -> None:
    a = pair.connect(1, _key(10))
    a.events()
    dst = _pub(_key(99))
    disco = "TS💬".encode() + bytes(60)
    for _ in range(5):
        a.send_packet(dst, disco, pair.now)
    pair.pump()
    gone = a.events()
    assert gone == [PeerGoneEvent(dst, PeerGoneReason.NOT_HERE)] * 3  # burst 3, then 1/s
    pair.advance(1.0)
    a.send_packet(dst, disco, pair.now)
    pair.pump()
    assert a.events() == [PeerGoneEvent(dst, PeerGoneReason.NOT_HERE)]


def test_ping_pong_both_ways(pair: RelayPair) -> None:
    a = pair.connect(1, _key(10))
    a.events()
    a.send_ping(b"12345678", pair.now)
    pair.pump()
    assert a.events() == [PongReceived(b"12345678")]
    # A server Ping is answered automatically.
    pair.server._out(pair.server._conns[1]).extend(b"\x12\x00\x00\x00\x08abcdefgh")
    down = pair.server.data_to_send(1)
    a.receive_data(down, pair.now)
    assert a.data_to_send() == b"\x13\x00\x00\x00\x08abcdefgh"


def test_peer_gone_after_sender_disconnects(pair: RelayPair) -> None:
    a_priv, b_priv = _key(10), _key(11)
    a, b = pair.connect(1, a_priv), pair.connect(2, b_priv)
    a.events(), b.events()
    # B sends to A, so A has heard from B; then B leaves.
    b.send_packet(_pub(a_priv), b"hi", pair.now)
    pair.pump()
    a.events()
    pair.disconnect(2)
    assert a.events() == [PeerGoneEvent(_pub(b_priv), PeerGoneReason.DISCONNECTED)]
    assert _pub(b_priv) not in pair.server.clients()


def test_no_peer_gone_for_never_heard_keys(pair: RelayPair) -> None:
    a = pair.connect(1, _key(10))
    pair.connect(2, _key(11))
    a.events()
    pair.disconnect(2)
    assert a.events() == []


def test_duplicate_key_last_writer_is_active(pair: RelayPair) -> None:
    a_priv, b_priv = _key(10), _key(11)
    a = pair.connect(1, a_priv)
    b1 = pair.connect(2, b_priv)
    b2 = pair.connect(3, b_priv)  # newest is active on registration
    for c in (a, b1, b2):
        c.events()
    a.send_packet(_pub(b_priv), b"1", pair.now)
    pair.pump()
    assert b1.events() == []
    assert b2.events() == [PacketReceived(_pub(a_priv), b"1")]
    b1.note_preferred(True)  # any frame makes b1 the active one
    pair.pump()
    a.send_packet(_pub(b_priv), b"2", pair.now)
    pair.pump()
    assert b1.events() == [PacketReceived(_pub(a_priv), b"2")]
    pair.disconnect(2)  # the active one left, but one remains: it becomes active
    a.send_packet(_pub(b_priv), b"3", pair.now)
    pair.pump()
    assert b2.events() == [PacketReceived(_pub(a_priv), b"3")]
    assert a.events() == []  # the key has not left the region


def test_out_of_order_frame_closes_client() -> None:
    client = DerpClientConn(_key(10))
    with pytest.raises(RemoteProtocolError):
        client.receive_data(KeepAlive().encode(), T0)
    assert client.state is ClientState.CLOSED
    assert len(client.events()) == 1
    # A second ServerKey after login is out of order too.
    pair = RelayPair()
    a = pair.connect(1, _key(10))
    with pytest.raises(RemoteProtocolError):
        a.receive_data(ServerKey(pair.server.public_key).encode(), pair.now)
    events = a.events()
    assert isinstance(events[-1], Closed)
    client.receive_data(b"ignored once closed", T0)


@pytest.mark.parametrize("server_key", [bytes(32), b"\x01" + bytes(31)])
def test_low_order_server_key_closes_client(server_key: bytes) -> None:
    client = DerpClientConn(_key(10))
    with pytest.raises(RemoteProtocolError):
        client.receive_data(ServerKey(server_key).encode(), T0)
    assert client.state is ClientState.CLOSED


def test_server_closes_on_frame_before_client_info(pair: RelayPair) -> None:
    pair.server.connection_made(5, pair.now)
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(5, SendPacket(bytes(32), b"x").encode(), pair.now)
    assert [type(e) for e in pair.server.events()] == [CloseConnection]


def test_mesh_frames_need_permission(pair: RelayPair) -> None:
    a = pair.connect(1, _key(10))
    pair.server.events()
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(1, WatchConns().encode(), pair.now)
    assert pair.server.events() == [CloseConnection(1, "protocol error: insufficient permissions")]
    assert pair.server.clients() == {}
    assert a.state is ClientState.CONNECTED


def test_verify_client_rejects_key() -> None:
    allowed = _pub(_key(10))
    pair = RelayPair(verify_client=lambda key: key == allowed)
    a = pair.connect(1, _key(10))
    b = pair.connect(2, _key(11))
    assert a.state is ClientState.CONNECTED
    assert b.state is ClientState.AWAIT_SERVER_INFO  # no ServerInfo ever arrives
    events = pair.server.events()
    assert CloseConnection(2, "client not allowed") in events
    assert list(pair.server.clients()) == [allowed]


def test_client_read_timeout_fires_at_the_right_time(pair: RelayPair) -> None:
    a = pair.connect(1, _key(10))
    a.events()
    assert a.next_deadline() == T0 + CLIENT_READ_TIMEOUT
    pair.now += 30.0
    a.receive_data(KeepAlive().encode(), pair.now)
    assert a.next_deadline() == T0 + 30.0 + CLIENT_READ_TIMEOUT
    a.on_timer(T0 + 30.0 + CLIENT_READ_TIMEOUT - 0.001)
    assert a.state is ClientState.CONNECTED
    a.on_timer(T0 + 30.0 + CLIENT_READ_TIMEOUT)
    assert a.events() == [Closed(READ_TIMEOUT_REASON)]
    assert a.next_deadline() is None


def test_server_keepalive_keeps_client_alive(pair: RelayPair) -> None:
    a = pair.connect(1, _key(10))
    a.events()
    deadline = pair.server.next_deadline()
    assert deadline is not None
    assert T0 + KEEPALIVE_INTERVAL <= deadline < T0 + KEEPALIVE_INTERVAL + KEEPALIVE_JITTER
    for _ in range(5):  # 5 keepalive periods > CLIENT_READ_TIMEOUT
        pair.advance(deadline - pair.now)
        assert FrameBuffer().feed(pair.server._conns[1].out) == [KeepAlive()]
        pair.pump()
        deadline = pair.server.next_deadline()
        assert deadline is not None
    assert a.state is ClientState.CONNECTED
    assert a.events() == []


def test_server_drops_silent_handshake(pair: RelayPair) -> None:
    pair.server.connection_made(9, pair.now)
    assert pair.server.next_deadline() == T0 + CLIENT_INFO_TIMEOUT
    pair.server.on_timer(T0 + CLIENT_INFO_TIMEOUT)
    assert pair.server.events() == [CloseConnection(9, "timeout waiting for ClientInfo")]
    assert pair.server.next_deadline() is None


def test_peer_gone_frame_encoding_matches_codec(pair: RelayPair) -> None:
    a_priv, b_priv = _key(10), _key(11)
    pair.connect(1, a_priv)
    b = pair.connect(2, b_priv)
    b.send_packet(_pub(a_priv), b"x", pair.now)
    pair.pump()
    pair.server.connection_lost(2)
    assert pair.server.data_to_send(1) == PeerGone(_pub(b_priv)).encode()


@given(st.lists(st.binary(max_size=120), max_size=6))
def test_client_receive_raises_only_remote_errors(chunks: list[bytes]) -> None:
    server_key = ServerKey(_pub(_key(1))).encode()
    for prefix in (b"", server_key):
        client = DerpClientConn(_key(10), randbytes=random.Random(3).randbytes)
        try:
            for chunk in [prefix, *chunks]:
                client.receive_data(chunk, T0)
        except RemoteProtocolError:
            assert client.state is ClientState.CLOSED


@given(st.lists(st.binary(max_size=120), max_size=6), st.booleans())
def test_server_receive_raises_only_remote_errors_for_that_conn(
    chunks: list[bytes], registered: bool
) -> None:
    pair = RelayPair()
    a = pair.connect(1, _key(10))
    if not registered:
        pair.server.connection_made(2, pair.now)
    else:
        pair.connect(2, _key(11))
    try:
        for chunk in chunks:
            pair.server.receive_data(2, chunk, pair.now)
    except RemoteProtocolError:
        assert not pair.server_open(2)
    assert pair.server_open(1)
    a.events()
    pair.clients.pop(2, None)
    a.send_ping(b"stillok!", pair.now)
    pair.pump()
    assert PongReceived(b"stillok!") in a.events()
