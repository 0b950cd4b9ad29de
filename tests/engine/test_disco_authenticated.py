"""DiscoAuthenticated: the engine says which peer a DISCO message provably came from, and
`wake_handshake` decides what that peer's WireGuard state does about it. Real cores only: two
PathEngines back to back, and WireGuard Devices for the handshake side."""

from __future__ import annotations

import random
from ipaddress import ip_network

import pytest

from agent.engine.events import DiscoAuthenticated, EngineEvent
from agent.engine.handshake_wake import wake_handshake
from agent.engine.paths import derp_endpoint
from agent.keys import NodePrivate, NodePublic
from agent.proto import disco
from agent.proto.errors import DropReason, LocalProtocolError
from agent.proto.wireguard.constants import MSG_INITIATION
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.peer import RETRY_HANDSHAKE_MIN_INTERVAL
from tests.engine.test_engine import A_EP, A_PRIV, B_EP, B_PRIV, NOW, REGION, A, B, pair

M_PRIV = NodePrivate(bytes(range(65, 97)))


def authenticated(events: list[EngineEvent]) -> list[DiscoAuthenticated]:
    return [e for e in events if isinstance(e, DiscoAuthenticated)]


def test_each_authenticated_message_names_its_peer_kind_and_source() -> None:
    a, b = pair()
    a.on_send(B, NOW)  # CallMeMaybe through DERP (no candidate yet)
    for o in a.outgoing():
        b.receive_disco(o.payload, o.endpoint, NOW, derp_src=A)
    assert authenticated(b.events()) == [
        DiscoAuthenticated(A, "call_me_maybe", derp_endpoint(REGION))
    ]
    # b answers: pings to A's endpoints (UDP) and its own CallMeMaybe (DERP)
    out = b.outgoing()
    ping = next(o for o in out if o.derp_region is None)
    a.receive_disco(ping.payload, B_EP, NOW + 0.01)
    assert authenticated(a.events()) == [DiscoAuthenticated(B, "ping", B_EP)]
    pong = next(o for o in a.outgoing() if o.derp_region is None)
    b.receive_disco(pong.payload, A_EP, NOW + 0.02)
    assert authenticated(b.events()) == [DiscoAuthenticated(A, "pong", A_EP)]


def test_no_event_for_what_does_not_open_or_comes_from_the_wrong_peer() -> None:
    a, _ = pair()
    ping = disco.Ping(b"t" * 12, node_key=B.raw)
    forged = disco.seal(M_PRIV.raw, A.raw, ping, b"\x01" * 24)  # a stranger's disco key
    a.receive_disco(forged, B_EP, NOW)
    tampered = bytearray(disco.seal(B_PRIV.raw, A.raw, ping, b"\x02" * 24))
    tampered[-1] ^= 1
    a.receive_disco(bytes(tampered), B_EP, NOW)
    genuine = disco.seal(B_PRIV.raw, A.raw, ping, b"\x03" * 24)
    a.receive_disco(genuine, derp_endpoint(REGION), NOW, derp_src=M_PRIV.public())
    assert authenticated(a.events()) == []
    assert a.stats.drops[DropReason.UNKNOWN_PEER] == 2
    assert sum(a.stats.drops.values()) == 3
    a.receive_disco(genuine, B_EP, NOW)
    assert authenticated(a.events()) == [DiscoAuthenticated(B, "ping", B_EP)]


def test_a_call_me_maybe_over_udp_is_authenticated_but_refused() -> None:
    a, _ = pair()
    cmm = disco.seal(B_PRIV.raw, A.raw, disco.CallMeMaybe((B_EP,)), b"\x04" * 24)
    a.receive_disco(cmm, B_EP, NOW)
    assert authenticated(a.events()) == [DiscoAuthenticated(B, "call_me_maybe", B_EP)]
    assert a.stats.drops[DropReason.MALFORMED] == 1
    assert a.outgoing() == []


# --- the WireGuard side: wake_handshake ----------------------------------------------------------


def devices() -> tuple[Device, Device]:
    rng_a, rng_b = random.Random(1), random.Random(2)
    da = Device(A_PRIV, randbytes=rng_a.randbytes, wall_offset=1.7e9)
    db = Device(B_PRIV, randbytes=rng_b.randbytes, wall_offset=1.7e9)
    da.add_peer(B, endpoint=B_EP, allowed_ips=[ip_network("100.64.0.2/32")])
    db.add_peer(A, allowed_ips=[ip_network("100.64.0.1/32")])
    return da, db


def heard_from(key: NodePublic) -> DiscoAuthenticated:
    return DiscoAuthenticated(key, "ping", derp_endpoint(REGION))


def kinds(datagrams: list[bytes]) -> list[int]:
    return [d[0] for d in datagrams]


def test_no_session_and_no_handshake_starts_one() -> None:
    da, _ = devices()
    out = wake_handshake(heard_from(B), da.peers[B], NOW)
    assert kinds(out) == [MSG_INITIATION]
    # One per REKEY_TIMEOUT: a second message at once adds nothing
    assert wake_handshake(heard_from(B), da.peers[B], NOW + 0.1) == []


def test_a_waiting_handshake_is_retried_once_the_interval_passed() -> None:
    da, _ = devices()
    peer = da.peers[B]
    assert kinds(peer.keepalive(NOW)) == [MSG_INITIATION]  # lost on the way
    assert wake_handshake(heard_from(B), peer, NOW + RETRY_HANDSHAKE_MIN_INTERVAL / 2) == []
    later = NOW + RETRY_HANDSHAKE_MIN_INTERVAL
    assert kinds(wake_handshake(heard_from(B), peer, later)) == [MSG_INITIATION]


def test_a_live_session_needs_nothing() -> None:
    da, db = devices()
    initiation = da.peers[B].keepalive(NOW)
    replies = db.receive_batch(initiation, A_EP, NOW).replies
    da.receive_batch([data for data, _ in replies], B_EP, NOW)
    assert da.peers[B].keypairs.current is not None
    assert wake_handshake(heard_from(B), da.peers[B], NOW + 10) == []


def test_the_event_must_name_the_peer_given() -> None:
    da, _ = devices()
    with pytest.raises(LocalProtocolError):
        wake_handshake(heard_from(A), da.peers[B], NOW)


def test_engine_event_drives_the_handshake_end_to_end() -> None:
    """A's engine hears B's ping through DERP; the event wakes A's idle WireGuard peer, whose
    initiation B's device answers: both sides hold a session."""
    a, b = pair()
    da, db = devices()
    b.ping(A, NOW)
    for o in b.outgoing():
        if o.derp_region is not None:
            a.receive_disco(o.payload, o.endpoint, NOW, derp_src=B)
    events = authenticated(a.events())  # the ping and a CallMeMaybe, both through DERP
    assert {(e.key, e.kind) for e in events} == {(B, "ping"), (B, "call_me_maybe")}
    out = wake_handshake(events[0], da.peers[events[0].key], NOW)
    assert wake_handshake(events[1], da.peers[events[1].key], NOW) == []  # one is enough
    replies = db.receive_batch(out, A_EP, NOW).replies
    da.receive_batch([data for data, _ in replies], B_EP, NOW)
    assert da.peers[B].keypairs.current is not None
    assert db.peers[A].keypairs.next is not None  # confirmed by A's first data packet
