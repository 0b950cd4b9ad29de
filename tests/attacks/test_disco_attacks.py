"""Forged and replayed DISCO against the path engine: two engines with a trusted direct path,
and an attacker who knows both public keys but neither private key."""

from __future__ import annotations

import random

import nacl.public

from agent.engine.discokeys import static_disco_private, static_disco_public
from agent.engine.engine import PathEngine
from agent.engine.events import DiscoAuthenticated, Outgoing, PathChanged, PongReceived
from agent.engine.paths import derp_endpoint
from agent.keys import NodePrivate, NodePublic
from agent.proto import disco
from agent.proto.errors import DropReason

A_PRIV = NodePrivate(bytes(range(1, 33)))
B_PRIV = NodePrivate(bytes(range(33, 65)))
M_PRIV = NodePrivate(bytes(range(65, 97)))  # the attacker's own key
A, B = A_PRIV.public(), B_PRIV.public()
A_EP = ("198.51.100.1", 41641)
B_EP = ("198.51.100.2", 41641)
M_EP = ("203.0.113.66", 41641)
REGION = 7
NOW = 1000.0


def engine(priv: NodePrivate, seed: int) -> PathEngine:
    rng = random.Random(seed)
    return PathEngine(static_disco_private(priv), priv.public(), REGION, randbytes=rng.randbytes)


def deliver(src: PathEngine, src_key: NodePublic, src_ep: tuple[str, int], dst: PathEngine,
            now: float) -> list[Outgoing]:  # fmt: skip
    out = src.outgoing()
    for o in out:
        if o.derp_region is not None:
            dst.receive_disco(o.payload, o.endpoint, now, derp_src=src_key)
        else:
            dst.receive_disco(o.payload, src_ep, now)
    return out


def trusted_pair() -> tuple[PathEngine, PathEngine, float]:
    a, b = engine(A_PRIV, 1), engine(B_PRIV, 2)
    a.add_peer(B, derp_region=REGION, disco_key=static_disco_public(B))
    b.add_peer(A, derp_region=REGION, disco_key=static_disco_public(A))
    a.set_local_endpoints([A_EP])
    b.set_local_endpoints([B_EP])
    now = NOW
    for _ in range(20):
        now += 0.05
        a.on_send(B, now)
        b.on_send(A, now)
        for _ in range(10):
            if not (deliver(a, A, A_EP, b, now) or deliver(b, B, B_EP, a, now)):
                break
        if a.status(B, now).path == "direct" and b.status(A, now).path == "direct":
            break
    assert a.status(B, now).endpoint == B_EP
    a.events()
    return a, b, now


def forged(claimed_sender: NodePublic, receiver: NodePublic, message: disco.Message) -> bytes:
    """A DISCO packet that names `claimed_sender` but is boxed with the attacker's key."""
    box = nacl.public.Box(nacl.public.PrivateKey(M_PRIV.raw), nacl.public.PublicKey(receiver.raw))
    sealed = box.encrypt(message.encode(), random.Random(5).randbytes(disco.NONCE_LEN))
    return disco.MAGIC + claimed_sender.raw + bytes(sealed)


def test_forged_disco_is_dropped_and_cannot_move_the_path() -> None:
    a, _, now = trusted_pair()
    before = a.status(B, now)
    assert before.path == "direct"
    assert before.endpoint == B_EP
    drops = a.stats.drops[DropReason.AUTHENTICATION]
    received = dict(a.stats.received)
    tx = random.Random(6).randbytes(disco.TX_ID_LEN)
    attacks = [
        # a Ping from the attacker's address: would make it a candidate and draw a pong
        (forged(B, A, disco.Ping(tx, B.raw)), M_EP, None),
        # a Pong claiming a fast path via the attacker's address
        (forged(B, A, disco.Pong(tx, A_EP)), M_EP, None),
        # CallMeMaybe over DERP pointing at the attacker, with B's node key as the DERP source
        (forged(B, A, disco.CallMeMaybe((M_EP,))), derp_endpoint(REGION), B),
        (forged(B, A, disco.CallMeMaybe((M_EP,))), derp_endpoint(REGION), None),
    ]
    for packet, src, derp_src in attacks:
        now += 0.01
        a.receive_disco(packet, src, now, derp_src=derp_src)
    assert a.stats.drops[DropReason.AUTHENTICATION] - drops == len(attacks)
    assert dict(a.stats.received) == received  # nothing opened
    assert all(o.endpoint != M_EP for o in a.outgoing())  # no pong or ping to the attacker
    assert not [e for e in a.events() if isinstance(e, PathChanged)]
    after = a.status(B, now)
    assert (after.path, after.endpoint) == ("direct", B_EP)


def test_disco_boxed_for_someone_else_or_truncated_is_dropped() -> None:
    a, _, now = trusted_pair()
    received = dict(a.stats.received)
    # The attacker's own key is no peer of A: not even opened.
    m_box = disco.seal(M_PRIV.raw, A.raw, disco.Ping(bytes(12), M_PRIV.public().raw), bytes(24))
    a.receive_disco(m_box, M_EP, now)
    assert a.stats.drops[DropReason.UNKNOWN_PEER] == 1
    # Naming B but truncated, or only the magic: malformed.
    a.receive_disco(disco.MAGIC + B.raw + m_box[38:70], M_EP, now)
    a.receive_disco(disco.MAGIC + bytes(10), M_EP, now)
    assert a.stats.drops[DropReason.MALFORMED] == 2
    assert dict(a.stats.received) == received
    assert a.status(B, now).endpoint == B_EP


def test_a_pong_raced_or_replayed_from_another_address_cannot_move_the_path() -> None:
    """A genuine Pong captured on the wire and re-sent from the attacker's address: the TxID
    went to one destination, so the pong is credited to that destination whatever its way
    back (tailscaled does the same), and once answered a replay matches nothing."""
    a, b, now = trusted_pair()
    tx = a.ping(B, now)
    ping = next(o for o in a.outgoing() if o.endpoint == B_EP)
    b.receive_disco(ping.payload, A_EP, now + 0.01)
    pong = next(o for o in b.outgoing() if o.endpoint == A_EP)
    unmatched = a.stats.unmatched_pongs
    a.receive_disco(pong.payload, M_EP, now + 0.02)  # raced from the attacker's address
    pongs = [e for e in a.events() if isinstance(e, PongReceived)]
    assert [(e.tx_id, e.via) for e in pongs] == [(tx, B_EP)]
    a.receive_disco(pong.payload, B_EP, now + 0.03)  # the real one, late: already answered
    a.receive_disco(pong.payload, M_EP, now + 0.04)  # a replay
    assert a.stats.unmatched_pongs == unmatched + 2
    # No PongReceived, no PathChanged: only the news that the (replayed) box opened
    assert {type(e) for e in a.events()} == {DiscoAuthenticated}
    assert a.status(B, now + 0.05).endpoint == B_EP
