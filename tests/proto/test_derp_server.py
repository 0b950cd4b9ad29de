"""RelayCore's fast paths: SendPacket runs routed from the input bytes, output only for the
connections that have some, deadlines in a heap, PeerGone listeners indexed; checked against the
frame codec, any chunking of the input, and the per-frame reference behaviour."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from agent.proto.derp.client import DerpClientConn
from agent.proto.derp.frames import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    FrameBuffer,
    FrameTooLarge,
    FrameType,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    Ping,
    Pong,
    RecvPacket,
    SendPacket,
    UnknownFrame,
)
from agent.proto.derp.server import CLIENT_INFO_TIMEOUT, CloseConnection, ConnState, RelayCore
from agent.proto.errors import MalformedPacket, NotPermitted

T0 = 1000.0
DISCO = "TS💬".encode() + bytes(60)


def _key(seed: int) -> bytes:
    return bytes(PrivateKey(random.Random(seed).randbytes(32)))


def _pub(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


def _core() -> RelayCore:
    return RelayCore(_key(1), randbytes=random.Random(7).randbytes)


def _login(core: RelayCore, conn_id: int, seed: int) -> bytes:
    """Register connection `conn_id` with client key _key(seed); returns its public key."""
    client = DerpClientConn(_key(seed), randbytes=random.Random(seed).randbytes)
    client.connection_made(T0)
    core.connection_made(conn_id, T0)
    client.receive_data(core.data_to_send(conn_id), T0)
    core.receive_data(conn_id, client.data_to_send(), T0)
    client.receive_data(core.data_to_send(conn_id), T0)
    core.events()
    return _pub(_key(seed))


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# --- SendPacket -> RecvPacket -------------------------------------------------------------------


def test_run_of_send_packets_becomes_recv_packets_byte_for_byte() -> None:
    core = _core()
    a, b = _login(core, 1, 10), _login(core, 2, 11)
    packets = [b"", b"x", bytes(range(256)) * 5, b"last"]
    core.receive_data(1, b"".join(SendPacket(b, p).encode() for p in packets), T0)
    assert core.data_to_send(2) == b"".join(RecvPacket(a, p).encode() for p in packets)
    assert core.data_to_send(1) == b""
    assert core.counters.packets_relayed == 4
    assert core.counters.bytes_relayed == sum(map(len, packets))


def _reference_outputs(frames: list[tuple[int, bytes]], keys: dict[int, bytes]) -> dict[int, bytes]:
    """What the per-frame path (one frame at a time, as whole inputs) produces."""
    core = _core()
    for conn_id, seed in ((1, 10), (2, 11), (3, 12)):
        _login(core, conn_id, seed)
    for conn_id, frame in frames:
        core.receive_data(conn_id, frame, T0)
    return {conn_id: core.data_to_send(conn_id) for conn_id in keys}


_FRAME = st.one_of(
    st.tuples(st.sampled_from([10, 11, 12, 99]), st.binary(max_size=80)).map(
        lambda t: ("send", t[0], t[1])
    ),
    st.just(("ping", 0, b"")),
    st.just(("preferred", 0, b"")),
    st.binary(max_size=20).map(lambda b: ("unknown", 0, b)),
    st.just(("disco", 99, DISCO)),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(_FRAME, min_size=1, max_size=25),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_any_chunking_gives_what_frame_by_frame_feeding_gives(
    spec: list[tuple[str, int, bytes]], cuts: list[int]
) -> None:
    keys = {1: _pub(_key(10)), 2: _pub(_key(11)), 3: _pub(_key(12))}
    frames: list[bytes] = []
    for kind, seed, body in spec:
        if kind in ("send", "disco"):
            frames.append(SendPacket(_pub(_key(seed)), body).encode())
        elif kind == "ping":
            frames.append(Ping(b"12345678").encode())
        elif kind == "preferred":
            frames.append(NotePreferred(True).encode())
        else:
            frames.append(UnknownFrame(0x30, body).encode())
    want = _reference_outputs([(1, f) for f in frames], keys)
    core = _core()
    for conn_id, seed in ((1, 10), (2, 11), (3, 12)):
        _login(core, conn_id, seed)
    for chunk in _chunks(b"".join(frames), cuts):
        core.receive_data(1, chunk, T0)
    assert {conn_id: core.data_to_send(conn_id) for conn_id in keys} == want


def test_byte_at_a_time_matches_whole() -> None:
    core = _core()
    a, b = _login(core, 1, 10), _login(core, 2, 11)
    stream = b"".join(SendPacket(b, bytes([i]) * i).encode() for i in range(40))
    for i in range(len(stream)):
        core.receive_data(1, stream[i : i + 1], T0)
    assert core.data_to_send(2) == b"".join(
        RecvPacket(a, bytes([i]) * i).encode() for i in range(40)
    )


def test_mixed_destinations_and_drops_in_one_input() -> None:
    core = _core()
    a, b, c = _login(core, 1, 10), _login(core, 2, 11), _login(core, 3, 12)
    nobody = _pub(_key(99))
    data = b"".join(
        [
            SendPacket(b, b"b1").encode(),
            SendPacket(b, b"b2").encode(),
            SendPacket(c, b"c1").encode(),
            SendPacket(nobody, b"lost").encode(),
            SendPacket(nobody, DISCO).encode(),
            Ping(b"pingpong").encode(),
            SendPacket(b, b"b3").encode(),
        ]
    )
    core.receive_data(1, data, T0)
    out = dict(core.take_output())
    assert bytes(out[2]) == b"".join(RecvPacket(a, p).encode() for p in (b"b1", b"b2", b"b3"))
    assert bytes(out[3]) == RecvPacket(a, b"c1").encode()
    assert bytes(out[1]) == (
        PeerGone(nobody, PeerGoneReason.NOT_HERE).encode() + Pong(b"pingpong").encode()
    )
    assert core.drops == {"unknown_dest": 2}


def test_duplicate_key_without_active_conn_drops_then_last_writer_wins() -> None:
    core = _core()
    a = _login(core, 1, 10)
    _login(core, 2, 11)
    _login(core, 3, 11)  # same key as 2: 3 is active
    _login(core, 4, 11)  # and now 4
    assert core.client_counts() == (4, 2)
    core.connection_lost(4)  # two left, the active one gone: none active
    core.receive_data(1, SendPacket(_pub(_key(11)), b"to whom").encode(), T0)
    assert core.drops == {"dup_client": 1}
    core.receive_data(2, Ping(b"iamhere!").encode(), T0)  # 2 wrote last: active
    core.take_output()
    core.receive_data(1, SendPacket(_pub(_key(11)), b"to 2").encode(), T0)
    assert [(cid, bytes(out)) for cid, out in core.take_output()] == [
        (2, RecvPacket(a, b"to 2").encode())
    ]


def test_send_packet_limits() -> None:
    core = _core()
    _login(core, 1, 10)
    header = bytes([FrameType.SEND_PACKET]) + (32 + (64 << 10) + 1).to_bytes(4, "big")
    core.receive_data(1, header[:3], T0)
    with pytest.raises(FrameTooLarge):
        core.receive_data(1, header[3:], T0)  # refused on the header, before any body
    assert core._conns[1].state is ConnState.CLOSED
    core2 = _core()
    _login(core2, 1, 10)
    short = bytes([FrameType.SEND_PACKET]) + (31).to_bytes(4, "big") + bytes(31)
    with pytest.raises(MalformedPacket):
        core2.receive_data(1, short, T0)
    assert core2.events() == [
        CloseConnection(1, "protocol error: SendPacket: payload of 31 bytes, need 32..")
    ]


# --- output and timers scale with the active connections only -----------------------------------


def test_take_output_returns_only_connections_with_output() -> None:
    core = _core()
    a = _login(core, 1, 10)
    b = _login(core, 2, 11)
    for conn_id in range(3, 203):
        _login(core, conn_id, conn_id + 100)
    assert core.take_output() == []
    assert not core.has_output()
    core.receive_data(1, SendPacket(b, b"one").encode(), T0)
    assert [(cid, bytes(out)) for cid, out in core.take_output()] == [
        (2, RecvPacket(a, b"one").encode())
    ]
    assert core.take_output() == []


def test_deadlines_come_from_a_heap_with_the_old_semantics() -> None:
    core = _core()
    core.connection_made(1, T0)
    core.connection_made(2, T0 + 1)
    assert core.next_deadline() == T0 + CLIENT_INFO_TIMEOUT
    core.connection_lost(1)
    assert core.next_deadline() == T0 + 1 + CLIENT_INFO_TIMEOUT
    _login(core, 3, 10)  # registered at T0: its deadline is now a keepalive
    deadline = core.next_deadline()
    assert deadline == T0 + 1 + CLIENT_INFO_TIMEOUT
    core.on_timer(T0 + 1 + CLIENT_INFO_TIMEOUT)
    assert core.events() == [CloseConnection(2, "timeout waiting for ClientInfo")]
    keepalive = core.next_deadline()
    assert keepalive is not None
    assert T0 + KEEPALIVE_INTERVAL <= keepalive < T0 + KEEPALIVE_INTERVAL + KEEPALIVE_JITTER
    core.take_output()
    core.on_timer(keepalive + 3 * KEEPALIVE_INTERVAL)  # late: one KeepAlive, next one ahead
    assert [(cid, bytes(out)) for cid, out in core.take_output()] == [(3, KeepAlive().encode())]
    next_one = core.next_deadline()
    assert next_one is not None
    assert next_one > keepalive + 3 * KEEPALIVE_INTERVAL
    core.connection_lost(3)
    assert core.next_deadline() is None
    assert core._timers == []


def test_timer_heap_stays_bounded_by_connections() -> None:
    core = _core()
    for conn_id in range(1, 51):
        _login(core, conn_id, conn_id + 10)
    now = T0
    for _ in range(20):
        now += KEEPALIVE_INTERVAL + KEEPALIVE_JITTER
        core.on_timer(now)
        core.take_output()
    assert len(core._timers) <= 2 * 50
    assert core.next_deadline() is not None


# --- PeerGone listeners ---------------------------------------------------------------------


def test_peer_gone_goes_only_to_connections_that_heard_from_the_key() -> None:
    core = _core()
    a, b = _login(core, 1, 10), _login(core, 2, 11)
    _login(core, 3, 12)
    core.receive_data(1, SendPacket(b, b"hi").encode(), T0)
    core.take_output()
    core.connection_lost(1)
    assert [(cid, bytes(out)) for cid, out in core.take_output()] == [(2, PeerGone(a).encode())]
    assert core.counters.peer_gone_disconnected == 1
    assert core._listeners == {}


def test_listener_that_left_first_is_forgotten() -> None:
    core = _core()
    a, b = _login(core, 1, 10), _login(core, 2, 11)
    core.receive_data(1, SendPacket(b, b"hi").encode(), T0)
    core.connection_lost(2)
    assert core._listeners == {}
    core.connection_lost(1)
    assert core.take_output() == []
    assert core.counters.peer_gone_disconnected == 0
    assert a not in core.clients()
    assert core.client_counts() == (0, 0)


def test_frames_after_a_closing_frame_are_ignored() -> None:
    core = _core()
    _login(core, 1, 10)
    b = _login(core, 2, 11)
    data = (
        bytes([FrameType.WATCH_CONNS]) + bytes(4) + SendPacket(b, b"after").encode()
    )  # WatchConns without the mesh key closes the connection
    with pytest.raises(NotPermitted):
        core.receive_data(1, data, T0)
    assert core.data_to_send(2) == b""
    assert FrameBuffer().feed(core.data_to_send(1)) == []
