"""Two WireGuard Device cores wired together in memory with a fake clock (no sockets)."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from ipaddress import ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.keys import NodePrivate, PresharedKey
from agent.proto.errors import DropReason
from agent.proto.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.events import HandshakeCompleted, HandshakeGivenUp
from agent.proto.wireguard.peer import RETRY_HANDSHAKE_MIN_INTERVAL, Peer

A_EP = ("198.18.0.1", 41641)
B_EP = ("198.18.0.2", 41641)
A_IP = bytes([100, 64, 0, 1])
B_IP = bytes([100, 64, 0, 2])


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def ipv4(src: bytes, dst: bytes, payload: bytes = b"hello") -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, src, dst)
    return hdr + payload


class Pair:
    def __init__(self, psk: PresharedKey | None = None, keepalive: int | None = None) -> None:
        ka, kb = NodePrivate.generate(), NodePrivate.generate()
        self.now = 100.0
        self.a = Device(ka, randbytes=seeded(1), wall_offset=1.7e9)
        self.b = Device(kb, randbytes=seeded(2), wall_offset=1.7e9)
        self.pa = self.a.add_peer(
            kb.public(),
            preshared_key=psk,
            endpoint=B_EP,
            allowed_ips=[ip_network("100.64.0.2/32")],
            persistent_keepalive=keepalive,
        )
        self.pb = self.b.add_peer(
            ka.public(),
            preshared_key=psk,
            allowed_ips=[ip_network("100.64.0.1/32")],
        )
        self.lost = False

    def deliver(self, to: Device, src: tuple[str, int], datagrams: list[bytes]) -> list[bytes]:
        """Deliver datagrams; follow the replies back and forth; return TUN packets at `to`."""
        if self.lost:
            return []
        res = to.receive_batch(datagrams, src, self.now)
        other = self.b if to is self.a else self.a
        here = A_EP if to is self.a else B_EP
        for data, dst in res.replies:
            assert dst == src
            self.deliver(other, here, [data])
        return [bytes(p) for p in res.packets]

    def send_a(self, packets: list[bytes]) -> list[bytes]:
        peer = self.a.route(B_IP)
        assert peer is self.pa
        return self.deliver(self.b, A_EP, peer.encrypt(packets, self.now))

    def send_b(self, packets: list[bytes]) -> list[bytes]:
        peer = self.b.route(A_IP)
        assert peer is self.pb
        assert peer.endpoint is not None
        return self.deliver(self.a, B_EP, peer.encrypt(packets, self.now))

    def tick(self, dt: float) -> None:
        self.now += dt
        for dev, here in ((self.a, A_EP), (self.b, B_EP)):
            other = self.b if dev is self.a else self.a
            for data, _dst in dev.on_timer(self.now):
                self.deliver(other, here, [data])


@pytest.mark.parametrize("psk", [None, PresharedKey.generate()])
def test_first_packet_is_staged_then_delivered(psk: PresharedKey | None) -> None:
    p = Pair(psk)
    pkt = ipv4(A_IP, B_IP)
    # The initiation travels, the response returns, then staged packet goes out from A.
    out = p.pa.encrypt([pkt], p.now)
    assert len(out) == 1
    assert out[0][0] == 1
    got = p.deliver(p.b, A_EP, out)
    assert got == []  # the response triggered the flush of the staged packet (delivered inside)
    assert p.pa.keypairs.current is not None
    assert p.pb.keypairs.current is not None  # promoted by the staged packet
    # Data both ways now.
    assert p.send_a([pkt, pkt]) == [pkt, pkt]
    back = ipv4(B_IP, A_IP, b"reply")
    assert p.send_b([back]) == [back]
    events = p.a.events()
    assert HandshakeCompleted(p.pb.handshake.local.public, True) in events
    assert p.pa.last_handshake is not None
    assert p.pa.last_handshake > 1.7e9


def test_wrong_psk_never_completes() -> None:
    p = Pair()
    p.pb.set_preshared_key(PresharedKey.generate())
    p.deliver(p.b, A_EP, p.pa.encrypt([ipv4(A_IP, B_IP)], p.now))
    assert p.pa.keypairs.current is None
    assert p.a.drops.get(DropReason.AUTHENTICATION, 0) == 1


def test_replay_and_forged_packets_are_counted_not_raised() -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])
    datagrams = p.pa.encrypt([ipv4(A_IP, B_IP)], p.now)
    assert len(p.deliver(p.b, A_EP, datagrams)) == 1
    assert p.deliver(p.b, A_EP, datagrams) == []
    assert p.b.drops[DropReason.REPLAY] == 1
    forged = bytearray(datagrams[0])
    forged[-1] ^= 1
    forged[8] = 99  # new counter
    assert p.deliver(p.b, A_EP, [bytes(forged)]) == []
    assert p.b.drops[DropReason.AUTHENTICATION] == 1


def test_disallowed_source_is_dropped() -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])
    spoofed = ipv4(bytes([100, 64, 0, 9]), B_IP)
    assert p.send_a([spoofed]) == []
    assert p.b.drops[DropReason.DISALLOWED_SOURCE] == 1


def test_padding_is_trimmed() -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])  # handshake; the staged packet is delivered inside
    for n in range(40):
        pkt = ipv4(A_IP, B_IP, bytes(n))
        assert p.send_a([pkt]) == [pkt]


def test_ipv6_packets() -> None:
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    a, b = Device(ka), Device(kb)
    pa = a.add_peer(kb.public(), endpoint=B_EP, allowed_ips=[ip_network("fd7a::2/128")])
    b.add_peer(ka.public(), allowed_ips=[ip_network("fd7a::1/128")])
    src = bytes.fromhex("fd7a" + "00" * 13 + "01")
    dst = bytes.fromhex("fd7a" + "00" * 13 + "02")
    payload = b"v6 data"
    pkt = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst) + payload
    assert a.route(dst) is pa
    res = b.receive_batch(pa.encrypt([pkt], 1.0), A_EP, 1.0)
    resp = res.replies[0][0]
    res2 = a.receive(resp, B_EP, 1.0)
    got = b.receive_batch([d for d, _ in res2.replies], A_EP, 1.0)
    assert [bytes(x) for x in got.packets] == [pkt]


def test_roaming_updates_endpoint() -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])
    new_ep = ("198.18.9.9", 5000)
    p.deliver(p.b, new_ep, p.pa.encrypt([ipv4(A_IP, B_IP)], p.now))
    assert p.pb.endpoint == new_ep


def test_retransmit_then_give_up_when_peer_is_silent() -> None:
    p = Pair()
    p.lost = True
    p.pa.encrypt([ipv4(A_IP, B_IP)], p.now)
    sent = 1
    for _ in range(200):
        before = p.pa.handshake_attempts
        p.tick(1.0)
        if p.pa.handshake_attempts > before:
            sent += 1
    assert sent == MAX_TIMER_HANDSHAKES + 1
    assert any(isinstance(e, HandshakeGivenUp) for e in p.a.events())
    assert not p.pa.staged


def test_keepalive_after_receiving_data_and_new_handshake_when_unanswered() -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])
    rx_before = p.pa.rx_bytes
    p.send_a([ipv4(A_IP, B_IP)])
    p.tick(KEEPALIVE_TIMEOUT + 0.1)  # B owes A a keepalive
    assert p.pa.rx_bytes == rx_before + 32
    # Now B goes silent: A's data is unanswered, so A starts a new handshake after 15 s.
    p.lost = True
    p.send_a([ipv4(A_IP, B_IP)])
    hs = p.pa.handshake.initiation_pending
    assert not hs
    p.tick(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.5)
    assert p.pa.handshake.initiation_pending


def test_rekey_after_time_rotates_keys_and_old_ones_expire() -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])
    first = p.pa.keypairs.current
    p.now += REKEY_AFTER_TIME + 1
    assert p.send_a([ipv4(A_IP, B_IP)]) == [ipv4(A_IP, B_IP)]
    assert p.pa.keypairs.current is not first
    assert p.pa.keypairs.previous is first
    p.now += REJECT_AFTER_TIME + 1
    p.tick(0)
    # After 3 x REJECT_AFTER_TIME with no traffic, every key is zeroed.
    for _ in range(int(3 * REJECT_AFTER_TIME) + 10):
        p.tick(1.0)
    assert p.pa.keypairs.current is None
    assert p.pb.keypairs.current is None


def test_persistent_keepalive() -> None:
    p = Pair(keepalive=25)
    p.send_a([ipv4(A_IP, B_IP)])
    p.tick(KEEPALIVE_TIMEOUT + 1)  # B's keepalive answers A's data
    rx = p.pb.rx_bytes
    p.tick(20.0)
    assert p.pb.rx_bytes == rx  # nothing yet: 25 s since the last packet A saw
    p.tick(5.0)
    assert p.pb.rx_bytes == rx + 32


def test_cookie_under_load() -> None:
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    a = Device(ka)
    b = Device(kb, under_load_threshold=0)
    pa = a.add_peer(kb.public(), endpoint=B_EP, allowed_ips=[ip_network("100.64.0.2/32")])
    b.add_peer(ka.public(), allowed_ips=[ip_network("100.64.0.1/32")])
    init = pa.encrypt([ipv4(A_IP, B_IP)], 1.0)
    res = b.receive_batch(init, A_EP, 1.0)
    assert b.drops[DropReason.COOKIE_REQUIRED] == 1
    cookie = res.replies[0][0]
    assert len(cookie) == 64
    a.receive(cookie, B_EP, 1.1)
    retry = pa.on_timer(7.0)  # retransmit carries mac2 now
    assert retry
    assert retry[0][0] == 1
    res = b.receive_batch(retry, A_EP, 7.0)
    assert res.replies
    assert res.replies[0][0][0] == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_datagrams_only_count_drops(datagrams: list[bytes]) -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])
    res = p.b.receive_batch(datagrams, A_EP, p.now)
    assert res.packets == []


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3), st.binary(min_size=0, max_size=200))
def test_mutated_handshakes_only_count_drops(kind: int, tail: bytes) -> None:
    p = Pair()
    msg = bytes([kind + 1, 0, 0, 0]) + tail
    for dev, src in ((p.b, A_EP), (p.a, B_EP)):
        before = sum(dev.drops.values())
        res = dev.receive_batch([msg], src, p.now)
        assert (res.packets, res.replies, res.peers, res.foreign) == ([], [], [], [])
        assert sum(dev.drops.values()) == before + 1  # one bad datagram, one counted drop


def test_peer_removal_forgets_routes_and_sessions() -> None:
    p = Pair()
    p.send_a([ipv4(A_IP, B_IP)])
    p.b.remove_peer(p.pb.public_key)
    assert p.b.route(A_IP) is None
    assert p.send_a([ipv4(A_IP, B_IP)]) == []
    assert p.b.drops[DropReason.UNKNOWN_RECEIVER] >= 1
    assert p.pb.public_key not in p.b.peers
    assert p.pa.public_key in p.a.peers  # the other side still knows its peer


def test_retry_handshake_sends_a_new_initiation_early_at_most_so_often() -> None:
    gap = RETRY_HANDSHAKE_MIN_INTERVAL
    p = Pair()
    p.lost = True  # the first initiation is lost (the peer was not reachable yet)
    assert p.send_a([ipv4(A_IP, B_IP)]) == []
    assert p.pa.retry_handshake(p.now + gap / 2) == []  # too soon: the retransmit comes forward
    assert p.a.next_deadline() == p.now + gap
    p.now += gap
    p.lost = False
    (init,) = p.pa.retry_handshake(p.now)
    assert init[0] == 1  # an initiation
    p.deliver(p.b, A_EP, [init])  # response, then the staged packet, follow
    assert p.pa.keypairs.current is not None
    assert not p.pa.staged
    assert p.send_a([ipv4(A_IP, B_IP, b"next")]) == [ipv4(A_IP, B_IP, b"next")]
    assert p.pa.retry_handshake(p.now + 5) == []  # a session exists: nothing to retry


def test_retry_handshake_without_a_pending_handshake_does_nothing() -> None:
    p = Pair()
    assert p.pa.retry_handshake(p.now) == []


def test_timers_of_many_peers_come_from_a_heap_not_a_scan() -> None:
    """A thousand peers, a few with persistent keepalives: the device's next deadline is theirs,
    only due peers run their timers, and a removed peer's timers are forgotten."""
    dev = Device(NodePrivate(bytes(range(1, 33))), randbytes=seeded(5))
    peers = [
        dev.add_peer(
            NodePrivate.generate().public(),
            endpoint=("198.18.0.9", 1000 + i),
            persistent_keepalive=25 if i in (10, 500) else None,
        )
        for i in range(1000)
    ]
    assert dev.next_deadline() is None  # nothing armed yet
    for i, peer in enumerate(peers):
        if peer.persistent_keepalive:
            peer.timers.on_authenticated_traversal(100.0 + i)
    assert dev.next_deadline() == 125.0 + 10
    calls: list[Peer] = []
    for peer in peers:
        original = peer.on_timer

        def spy(
            now: float, peer: Peer = peer, original: Callable[[float], list[bytes]] = original
        ) -> list[bytes]:
            calls.append(peer)
            return original(now)

        peer.on_timer = spy  # type: ignore[method-assign]
    dev.on_timer_by_peer(140.0)
    assert calls == [peers[10]]
    # its keepalive found no session: a handshake went out, retransmitted after 5 s + jitter
    deadline = dev.next_deadline()
    assert deadline is not None
    assert 145.0 <= deadline <= 145.34
    dev.remove_peer(peers[10].public_key)
    assert dev.next_deadline() == 125.0 + 500
    dev.remove_peer(peers[500].public_key)
    assert dev.next_deadline() is None
    dev.on_timer_by_peer(1000.0)
    assert calls == [peers[10]]


def test_news_within_the_retry_second_brings_the_retransmit_forward() -> None:
    """The peer's announcement arrives just after our first (lost) initiation: the second
    initiation leaves RETRY_HANDSHAKE_MIN_INTERVAL after the first, from the timer, not after
    REKEY_TIMEOUT."""
    p = Pair()
    p.lost = True
    p.send_a([ipv4(A_IP, B_IP)])
    sent_at = p.now
    p.lost = False
    assert p.pa.retry_handshake(sent_at + RETRY_HANDSHAKE_MIN_INTERVAL / 5) == []
    deadline = p.a.next_deadline()
    assert deadline == sent_at + RETRY_HANDSHAKE_MIN_INTERVAL
    out = p.a.on_timer_by_peer(deadline)
    assert [d[0] for _, ds in out for d in ds] == [1]  # a new initiation
    assert p.pa.handshake_attempts == 1


def test_simultaneous_initiations_settle_in_one_round_trip() -> None:
    """Both sides initiate at once (each has a packet to send, the other's initiation still
    in flight). The side with the larger public key keeps its own; the other answers it, and
    both staged packets arrive at once instead of after REKEY_TIMEOUT."""
    p = Pair()
    p.pb.endpoint = A_EP
    ia = p.pa.encrypt([ipv4(A_IP, B_IP, b"from a")], p.now)
    ib = p.pb.encrypt([ipv4(B_IP, A_IP, b"from b")], p.now)
    assert ia[0][0] == ib[0][0] == 1  # two initiations, crossing
    ra = p.a.receive_batch(ib, B_EP, p.now + 0.01)
    rb = p.b.receive_batch(ia, A_EP, p.now + 0.01)
    a_larger = p.a.public_key.raw > p.b.public_key.raw
    keeper, yielder = (p.a, p.b) if a_larger else (p.b, p.a)
    kept, answered = (ra, rb) if a_larger else (rb, ra)
    assert kept.replies == []
    assert keeper.drops[DropReason.SIMULTANEOUS_INITIATION] == 1
    assert [d[0] for d, _ in answered.replies] == [2]  # the yielding side answers
    # the response reaches the keeper: its session is up and its staged packet follows
    k_peer = p.pa if keeper is p.a else p.pb
    y_peer = p.pb if keeper is p.a else p.pa
    y_ep, k_ep = (B_EP, A_EP) if keeper is p.a else (A_EP, B_EP)
    done = keeper.receive_batch([d for d, _ in answered.replies], y_ep, p.now + 0.02)
    assert k_peer.keypairs.current is not None
    got = yielder.receive_batch([d for d, _ in done.replies], k_ep, p.now + 0.03)
    assert len(got.packets) == 1  # the keeper's staged packet
    assert y_peer.keypairs.current is not None
    # the yielding side's own staged packet goes out on the new session
    back = [d for d, _ in got.replies]
    assert back, "the yielder flushes its staged packet once the session is confirmed"
    assert len(keeper.receive_batch(back, y_ep, p.now + 0.04).packets) == 1
    # a replay of the initiation the keeper did not take is refused as a replay
    before = keeper.drops.get(DropReason.REPLAYED_HANDSHAKE, 0)
    keeper.receive_batch(ib if keeper is p.a else ia, y_ep, p.now + 3)
    assert keeper.drops.get(DropReason.REPLAYED_HANDSHAKE, 0) == before + 1


def test_an_initiation_well_after_ours_is_taken_whatever_the_keys() -> None:
    p = Pair()
    p.pb.endpoint = A_EP
    ia = p.pa.encrypt([ipv4(A_IP, B_IP)], p.now)  # ours: lost on the way (never delivered)
    ib = p.pb.encrypt([ipv4(B_IP, A_IP)], p.now + 1.5)
    assert ia
    assert ib
    res = p.a.receive_batch(ib, B_EP, p.now + 1.5)
    assert [d[0] for d, _ in res.replies] == [2]
