"""PathEngine through its public surface: two engines wired back to back (no NAT), plain
WireGuard peers as PathTable, hostile DISCO input counted and dropped, `agent ping`."""

from __future__ import annotations

import random
from collections.abc import Callable

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine.discokeys import static_disco_private, static_disco_public
from agent.engine.engine import PathEngine
from agent.engine.events import Outgoing, PathChanged, PeerPathStatus, PongReceived
from agent.engine.paths import PathStatus, PathTable, Targets, derp_endpoint
from agent.engine.timings import DEFAULT_TIMINGS
from agent.keys import DiscoPublic, NodePrivate, NodePublic
from agent.proto import disco
from agent.proto.errors import DropReason, LocalProtocolError

T = DEFAULT_TIMINGS
A_PRIV = NodePrivate(bytes(range(1, 33)))
B_PRIV = NodePrivate(bytes(range(33, 65)))
A, B = A_PRIV.public(), B_PRIV.public()
A_EP = ("198.51.100.1", 41641)
B_EP = ("198.51.100.2", 41641)
REGION = 7
NOW = 1000.0


def engine(priv: NodePrivate, seed: int) -> PathEngine:
    rng = random.Random(seed)
    return PathEngine(static_disco_private(priv), priv.public(), REGION, randbytes=rng.randbytes)


def pair(*, udp: bool = True) -> tuple[PathEngine, PathEngine]:
    a, b = engine(A_PRIV, 1), engine(B_PRIV, 2)
    a.add_peer(B, derp_region=REGION, disco_key=static_disco_public(B))
    b.add_peer(A, derp_region=REGION, disco_key=static_disco_public(A))
    if udp:
        a.set_local_endpoints([A_EP])
        b.set_local_endpoints([B_EP])
    return a, b


def deliver(
    src: PathEngine,
    src_key: NodePublic,
    src_ep: tuple[str, int],
    dst: PathEngine,
    now: float,
    *,
    udp: bool = True,
) -> list[Outgoing]:
    """Hand `src`'s outgoing DISCO to `dst` as the network would (UDP src = src_ep)."""
    out = src.outgoing()
    for o in out:
        if o.derp_region is not None:
            dst.receive_disco(o.payload, o.endpoint, now, derp_src=src_key)
        elif udp:
            dst.receive_disco(o.payload, src_ep, now)
    return out


def settle(a: PathEngine, b: PathEngine, now: float, *, udp: bool = True) -> None:
    for _ in range(10):
        if not (deliver(a, A, A_EP, b, now, udp=udp) or deliver(b, B, B_EP, a, now, udp=udp)):
            return


def run_timers(
    engines: list[PathEngine], until: float, step: float = 0.1, udp: bool = True, send: bool = True
) -> float:
    a, b = engines
    now = NOW
    while now < until:
        now = round(now + step, 6)
        if send:
            a.on_send(B, now)
            b.on_send(A, now)
        for e in engines:
            d = e.next_deadline()
            if d is not None and d <= now:
                e.on_timer(now)
        settle(a, b, now, udp=udp)
    return now


# -- PathTable compatibility ----------------------------------------------------------------------
def test_plain_peers_follow_path_table() -> None:
    e = engine(A_PRIV, 1)
    table = PathTable(REGION)
    for t in (e, table):
        t.add_peer(B, endpoint=B_EP, derp_region=3)
        assert t.has_peer(B)
    steps: list[Callable[[PathEngine | PathTable], None]] = [
        lambda t: None,
        lambda t: t.on_receive(B, B_EP, NOW),
        lambda t: t.on_receive(B, derp_endpoint(4), NOW + 1),
        lambda t: t.set_endpoint(B, ("198.51.100.9", 1)),
    ]
    for step in steps:
        step(e)
        step(table)
        for now in (NOW, NOW + 1, NOW + 10):
            assert e.targets(B, now) == table.targets(B, now)
            got, want = e.status(B, now), table.status(B, now)
            assert isinstance(got, PathStatus)
            assert (got.path, got.endpoint, got.derp_region) == (
                want.path,
                want.endpoint,
                want.derp_region,
            )
    assert not e.has_disco(B)
    e.on_send(B, NOW)  # no DISCO for a plain peer
    assert e.outgoing() == []
    with pytest.raises(LocalProtocolError):
        e.ping(B, NOW)
    e.remove_peer(B)
    assert not e.has_peer(B)
    assert e.targets(B, NOW) == Targets()
    assert e.status(B, NOW) == PeerPathStatus("none", None, None)


def test_home_region_is_shared_with_plain_peers() -> None:
    e = engine(A_PRIV, 1)
    e.add_peer(B)
    e.home_region = 9
    assert e.targets(B, NOW) == Targets(derp=9)


# -- discovery ------------------------------------------------------------------------------------
def test_first_send_sends_call_me_maybe_through_derp() -> None:
    a, _ = pair()
    a.on_send(B, NOW)
    out = a.outgoing()
    assert [o.derp_region for o in out] == [REGION]
    assert out[0].key == B
    assert a.targets(B, NOW) == Targets(derp=REGION)
    a.on_send(B, NOW + 0.1)  # paced: no second CallMeMaybe at once
    assert a.outgoing() == []


def test_call_me_maybe_leads_to_direct_both_ways() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    assert a.status(B, NOW).path == "direct"
    assert b.status(A, NOW).path == "direct"
    assert a.targets(B, NOW) == Targets(udp=B_EP)
    assert b.targets(A, NOW) == Targets(udp=A_EP)
    changes = [e for e in a.events() if isinstance(e, PathChanged)]
    assert changes == [PathChanged(B, "derp", "direct", B_EP, None)]
    assert a.stats.drops == {}


def test_one_sided_traffic_still_punches_from_the_active_side() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    settle(a, b, NOW)
    assert a.status(B, NOW).path == "direct"


def test_configured_endpoint_is_pinged_without_call_me_maybe() -> None:
    a, b = pair()
    a.add_peer(B, endpoint=B_EP, derp_region=REGION, disco_key=static_disco_public(B))
    a.on_send(B, NOW)
    out = a.outgoing()
    assert sorted(o.endpoint for o in out) == sorted([B_EP, derp_endpoint(REGION)])
    for o in out:
        if o.derp_region is None:
            b.receive_disco(o.payload, A_EP, NOW)
    deliver(b, B, B_EP, a, NOW + 0.02)
    assert a.status(B, NOW + 0.02).path == "direct"
    assert a.status(B, NOW + 0.02).latency == pytest.approx(0.02)


def test_udp_blocked_stays_on_derp_and_keeps_retrying() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    end = run_timers([a, b], NOW + 30, udp=False)
    assert a.status(B, end).path == "derp"
    assert a.targets(B, end) == Targets(derp=REGION)
    assert a.stats.sent["ping"] >= 4  # background retries while relayed and active
    assert a.stats.sent["call_me_maybe"] >= 4


def test_direct_path_survives_on_heartbeats_then_idles() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    end = run_timers([a, b], NOW + 30)
    assert a.status(B, end).path == "direct"
    # stop sending: heartbeats stop after SESSION_ACTIVE_TIMEOUT, the trust lapses
    now = end
    while now < end + T.session_active_timeout + 10:
        now += 0.5
        for e in (a, b):
            d = e.next_deadline()
            if d is not None and d <= now:
                e.on_timer(now)
        settle(a, b, now)
    assert a.status(B, now).path == "derp"
    deadline = a.next_deadline()
    assert deadline is None or deadline > now  # nothing spinning


def test_path_loss_falls_back_within_five_seconds() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    broken_at = run_timers([a, b], NOW + 20)
    now = broken_at
    while a.status(B, now).path == "direct":
        now = round(now + 0.05, 6)
        a.on_send(B, now)
        for e in (a, b):
            d = e.next_deadline()
            if d is not None and d <= now:
                e.on_timer(now)
        settle(a, b, now, udp=False)
    assert now - broken_at <= 5.0
    assert a.targets(B, now).derp == REGION


# -- receive rules --------------------------------------------------------------------------------
def test_call_me_maybe_over_udp_is_dropped() -> None:
    a, b = pair()
    b.on_send(A, NOW)
    cmm = b.outgoing()[0]
    a.receive_disco(cmm.payload, B_EP, NOW)
    assert a.stats.drops[DropReason.MALFORMED] == 1
    assert a.outgoing() == []


def test_derp_source_must_own_the_disco_key() -> None:
    a, b = pair()
    b.on_send(A, NOW)
    cmm = b.outgoing()[0]
    stranger = NodePrivate(bytes(range(100, 132))).public()
    a.receive_disco(cmm.payload, derp_endpoint(REGION), NOW, derp_src=stranger)
    assert a.stats.drops[DropReason.UNKNOWN_PEER] == 1
    assert a.stats.counters()["dropped_unknown_peer"] == 1


def test_unknown_sender_is_not_opened() -> None:
    a, _ = pair()
    c = engine(NodePrivate(bytes(range(100, 132))), 3)
    c.add_peer(A, derp_region=REGION, disco_key=static_disco_public(A))
    c.on_send(A, NOW)
    a.receive_disco(c.outgoing()[0].payload, derp_endpoint(REGION), NOW)
    assert a.stats.drops[DropReason.UNKNOWN_PEER] == 1


def test_tampered_box_is_an_authentication_drop() -> None:
    a, b = pair()
    b.on_send(A, NOW)
    packet = bytearray(b.outgoing()[0].payload)
    packet[-1] ^= 1
    a.receive_disco(bytes(packet), derp_endpoint(REGION), NOW)
    assert a.stats.drops[DropReason.AUTHENTICATION] == 1


def test_duplicate_ping_gets_one_pong() -> None:
    a, b = pair()
    a.add_peer(B, endpoint=B_EP, derp_region=REGION, disco_key=static_disco_public(B))
    a.on_send(B, NOW)
    ping = next(o for o in a.outgoing() if o.derp_region is None)
    b.receive_disco(ping.payload, A_EP, NOW)
    b.receive_disco(ping.payload, A_EP, NOW)
    assert b.stats.duplicate_pings == 1
    assert b.stats.sent["pong"] == 1


def test_ping_over_derp_is_answered_over_derp_with_the_magic_source() -> None:
    a, b = pair(udp=False)
    tx = a.ping(B, NOW)
    out = a.outgoing()
    derp_ping = next(o for o in out if o.derp_region == REGION)
    b.receive_disco(derp_ping.payload, derp_endpoint(REGION), NOW + 0.05, derp_src=A)
    pong = next(o for o in b.outgoing() if o.key == A and o.derp_region == REGION)
    a.receive_disco(pong.payload, derp_endpoint(REGION), NOW + 0.1, derp_src=B)
    pongs = [e for e in a.events() if isinstance(e, PongReceived)]
    assert len(pongs) == 1
    p = pongs[0]
    assert (p.key, p.tx_id, p.via, p.via_derp) == (B, tx, derp_endpoint(REGION), REGION)
    assert p.src == derp_endpoint(REGION)
    assert p.latency == pytest.approx(0.1)
    assert a.status(B, NOW + 0.1).path == "derp"  # a DERP pong never makes a direct path
    assert a.status(B, NOW + 0.1).latency == pytest.approx(0.1)


def test_cli_ping_over_a_trusted_path_goes_direct_only() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    a.events()
    tx = a.ping(B, NOW + 1)
    out = a.outgoing()
    assert [o.endpoint for o in out] == [B_EP]
    b.receive_disco(out[0].payload, A_EP, NOW + 1.005)
    deliver(b, B, B_EP, a, NOW + 1.01)
    pongs = [e for e in a.events() if isinstance(e, PongReceived) and e.tx_id == tx]
    assert [(p.via, p.src) for p in pongs] == [(B_EP, A_EP)]


def test_unmatched_pong_is_counted() -> None:
    a, _ = pair()
    pong = disco.seal(B_PRIV.raw, A.raw, disco.Pong(b"z" * 12, A_EP), b"\x01" * 24)
    a.receive_disco(pong, B_EP, NOW)
    assert a.stats.unmatched_pongs == 1
    assert a.status(B, NOW).path == "derp"


def test_remove_peer_forgets_its_pings_and_timers() -> None:
    a, _ = pair()
    a.add_peer(B, endpoint=B_EP, derp_region=REGION, disco_key=static_disco_public(B))
    a.on_send(B, NOW)
    assert a.next_deadline() is not None
    a.remove_peer(B)
    assert a.next_deadline() is None
    a.on_timer(NOW + 100)
    assert a.outgoing()[-1].key == B  # the earlier queued datagrams are still handed out


def test_changed_local_endpoints_are_told_to_active_relayed_peers() -> None:
    a, _ = pair(udp=False)
    a.on_send(B, NOW)
    a.outgoing()
    a.set_local_endpoints([A_EP, ("10.0.0.1", 41641), ("0.0.0.0", 1), A_EP], NOW + 0.2)
    assert a.local_endpoints == (A_EP, ("10.0.0.1", 41641))
    out = a.outgoing()
    assert [o.derp_region for o in out] == [REGION]
    a.set_local_endpoints([A_EP, ("10.0.0.1", 41641)], NOW + 0.3)  # unchanged: nothing
    assert a.outgoing() == []


def test_static_disco_keys_are_the_node_keys() -> None:
    assert static_disco_private(A_PRIV).public() == DiscoPublic(A.raw)
    assert static_disco_public(A) == DiscoPublic(A.raw)


# -- hostile input --------------------------------------------------------------------------------
def _hostile_engine() -> tuple[PathEngine, nacl.public.Box]:
    a, _ = pair()
    a.on_send(B, NOW)
    a.outgoing()
    box = nacl.public.Box(nacl.public.PrivateKey(B_PRIV.raw), nacl.public.PublicKey(A.raw))
    return a, box


SOURCES = st.sampled_from([B_EP, derp_endpoint(REGION), derp_endpoint(0), ("::1", 9)])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), src=SOURCES)
def test_arbitrary_bytes_never_raise(data: bytes, src: tuple[str, int]) -> None:
    a, _ = _hostile_engine()
    a.receive_disco(data, src, NOW)
    a.receive_disco(disco.MAGIC + data, src, NOW)
    a.receive_disco(disco.MAGIC + B.raw + data, src, NOW, derp_src=B)
    a.on_timer(NOW + 10)
    assert sum(a.stats.drops.values()) >= 1 or a.stats.received


@settings(max_examples=300, deadline=None)
@given(plaintext=st.binary(max_size=200), src=SOURCES, kind=st.sampled_from([None, 1, 2, 3, 9]))
def test_authentic_boxes_with_arbitrary_plaintext_never_raise(
    plaintext: bytes, src: tuple[str, int], kind: int | None
) -> None:
    a, box = _hostile_engine()
    if kind is not None:
        plaintext = bytes([kind, 0]) + plaintext
    packet = disco.MAGIC + B.raw + bytes(box.encrypt(plaintext, b"\x02" * 24))
    a.receive_disco(packet, src, NOW)
    a.on_timer(NOW + 10)
    for o in a.outgoing():
        assert o.key == B


def test_idle_side_pings_back_once_then_leaves_it_to_the_active_side() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    settle(a, b, NOW)
    assert b.status(A, NOW).path == "direct"  # b pinged a's source back although idle
    pings = b.stats.sent["ping"]
    run_timers([a, b], NOW + 20, send=False)
    a.on_send(B, NOW + 20)
    end = run_timers([a, b], NOW + 40, send=False)
    assert a.stats.received["pong"] >= 3
    assert b.stats.sent["ping"] - pings <= 1  # no ping back for each of a's heartbeats
    assert b.status(A, end).path == "derp"  # idle: b's trust lapsed, a's traffic still direct


def test_lost_first_call_me_maybe_is_made_up_by_answering_inside_the_pacing_interval() -> None:
    """A's CallMeMaybe went out before B had joined the relay (lost). B's arrives 0.3 s later:
    A answers at once instead of waiting out the 5 s pacing, and both go direct."""
    a, b = pair()
    a.on_send(B, NOW)
    assert [o.derp_region for o in a.outgoing()] == [REGION]  # lost: B is not there yet
    b.on_send(A, NOW + 0.3)
    settle(a, b, NOW + 0.3)
    assert a.status(B, NOW + 0.3).path == "direct"
    assert b.status(A, NOW + 0.3).path == "direct"


def test_call_me_maybe_answers_cannot_loop() -> None:
    a, b = pair(udp=False)  # no UDP: nothing ever becomes trusted
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    cmm_sent = 0
    for _ in range(20):  # the relay delivers everything, instantly, many rounds
        out = deliver(a, A, A_EP, b, NOW, udp=False) + deliver(b, B, B_EP, a, NOW, udp=False)
        cmm_sent += sum(1 for o in out if o.derp_region is not None)
        if not out:
            break
    assert not out, "CallMeMaybe answers kept bouncing"
    assert cmm_sent <= 4


def test_announce_sends_call_me_maybe_without_starting_heartbeats() -> None:
    a, _ = pair()
    a.announce(B, NOW)
    out = a.outgoing()
    assert [o.derp_region for o in out] == [REGION]  # one CallMeMaybe through DERP
    a.announce(B, NOW + 1)  # paced like any CallMeMaybe
    assert a.outgoing() == []
    now = NOW
    while now < NOW + 10:  # nobody answers; nothing is sent to B but paced CallMeMaybes
        now += 0.1
        deadline = a.next_deadline()
        if deadline is not None and deadline <= now:
            a.on_timer(now)
        a.outgoing()
    assert a.stats.sent["ping"] == 0  # not active: no heartbeats, no discovery pings


def test_answered_direct_traffic_needs_no_silence_probes() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    now = NOW
    while now < NOW + 20:
        now = round(now + 0.05, 6)
        a.on_send(B, now)
        b.on_receive(A, A_EP, now)  # the data arrives and is answered at once
        b.on_send(A, now)
        a.on_receive(B, B_EP, now)
        for e in (a, b):
            d = e.next_deadline()
            if d is not None and d <= now:
                e.on_timer(now)
        settle(a, b, now)
    assert a.status(B, now).path == "direct"
    assert a.stats.silence_probes == b.stats.silence_probes == 0


def test_one_way_traffic_is_probed_at_most_once_per_interval_and_stays_direct() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    end = run_timers([a, b], NOW + 20)  # sends every 0.1 s, nothing ever comes back as data
    assert a.status(B, end).path == "direct"
    assert 20 / T.silent_path_probe / 2 <= a.stats.silence_probes <= 20 / T.silent_path_probe + 1
    assert a.stats.drops.total() == 0


def test_an_idle_trusted_path_is_never_probed_for_silence() -> None:
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    run_timers([a, b], NOW + 20, send=False)
    assert a.stats.silence_probes == 0


def test_data_through_derp_ends_the_trust_of_a_silent_direct_path() -> None:
    """The answering side of a stream (TCP ACKs only) falls back with the sending side: once
    the peer's data arrives through DERP and nothing came over UDP for a while, trust ends."""
    a, b = pair()
    a.on_send(B, NOW)
    b.on_send(A, NOW)
    settle(a, b, NOW)
    assert b.status(A, NOW).path == "direct"
    b.on_receive(A, A_EP, NOW + 0.1)
    b.on_receive(A, derp_endpoint(REGION), NOW + 0.2)  # a duplicate through DERP: direct works
    assert b.status(A, NOW + 0.2).path == "direct"
    later = NOW + 0.1 + T.silent_path_probe
    pings = b.stats.sent["ping"]
    b.on_receive(A, derp_endpoint(REGION), later)
    assert b.status(A, later).path == "derp"
    assert b.targets(A, later) == Targets(udp=A_EP, derp=REGION)
    assert b.stats.relayed_fallbacks == 1
    assert b.stats.counters()["relayed_fallbacks"] == 1
    assert b.stats.sent["ping"] > pings, "the direct path is probed"
    settle(a, b, later)  # the pong comes back: direct again
    assert b.status(A, later).path == "direct"


def test_netmap_endpoints_are_probed_without_a_call_me_maybe() -> None:
    """With a coordinator, the netmap lists the peer's endpoints: an active peer's are pinged at
    once, and the pong makes the path direct before any CallMeMaybe went through DERP."""
    a, b = pair()
    a.on_send(B, NOW)  # active, relayed: nothing to ping yet
    assert all(o.derp_region is not None for o in a.outgoing())
    a.set_netmap_endpoints(B, [B_EP], NOW + 0.1)
    pings = [o for o in a.outgoing() if o.endpoint == B_EP]
    assert len(pings) == 1
    b.receive_disco(pings[0].payload, A_EP, NOW + 0.1)
    for o in b.outgoing():
        if o.endpoint == A_EP:
            a.receive_disco(o.payload, B_EP, NOW + 0.11)
    assert a.status(B, NOW + 0.11).path == "direct"
    a.set_netmap_endpoints(A, [A_EP], NOW)  # not a peer of a: ignored
