"""Attacks on the WireGuard core (two Device cores in memory, fake clock): a replayed handshake
initiation from another address, replayed transport data from the peer's and another address,
and an initiation flood from many sources while a real peer handshakes. Forged transport packets
are in tests/proto/test_device.py (test_replay_and_forged_packets_are_counted_not_raised); the
replay window itself in tests/proto/test_replay_allowedips.py."""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable
from ipaddress import ip_network

from agent.keys import NodePrivate
from agent.proto.errors import DropReason
from agent.proto.wireguard.constants import (
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    RATELIMIT_BURST,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
)
from agent.proto.wireguard.cookie import CookieGenerator
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.events import HandshakeCompleted
from agent.proto.wireguard.messages import CookieReply

A_EP = ("198.18.0.1", 41641)
B_EP = ("198.18.0.2", 41641)
EVIL_EP = ("198.18.0.66", 41641)
A_IP = bytes([100, 64, 0, 1])
B_IP = bytes([100, 64, 0, 2])
T0 = 100.0


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def ipv4(src: bytes, dst: bytes, payload: bytes = b"hello") -> bytes:
    total = 20 + len(payload)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, src, dst) + payload


def devices() -> tuple[Device, Device]:
    ka, kb = NodePrivate(bytes(range(1, 33))), NodePrivate(bytes(range(33, 65)))
    a = Device(ka, randbytes=seeded(1), wall_offset=1.7e9)
    b = Device(kb, randbytes=seeded(2), wall_offset=1.7e9)
    a.add_peer(kb.public(), endpoint=B_EP, allowed_ips=[ip_network("100.64.0.2/32")])
    b.add_peer(ka.public(), allowed_ips=[ip_network("100.64.0.1/32")])
    return a, b


def kinds(replies: list[tuple[bytes, tuple[str, int]]]) -> Counter[int]:
    return Counter(data[0] for data, _ in replies)


def test_replayed_initiation_from_elsewhere_is_refused_and_moves_nothing() -> None:
    a, b = devices()
    pa, pb = a.peers[b.public_key], b.peers[a.public_key]
    init = pa.encrypt([ipv4(A_IP, B_IP)], T0)
    assert len(init) == 1
    assert init[0][0] == MSG_INITIATION
    res = b.receive_batch(init, A_EP, T0)
    assert kinds(res.replies) == {MSG_RESPONSE: 1}
    staged = a.receive(res.replies[0][0], B_EP, T0).replies  # the first packet, sealed
    assert len(b.receive_batch([d for d, _ in staged], A_EP, T0).packets) == 1
    session = pb.keypairs.current
    assert session is not None
    assert pb.endpoint == A_EP

    # An attacker re-sends the captured initiation from its own address, later (beyond the
    # initiation rate limit, so only the replay rule can refuse it).
    for delay in (1.0, 30.0):
        res = b.receive(init[0], EVIL_EP, T0 + delay)
        assert res.replies == []
        assert res.packets == []
    assert b.drops[DropReason.REPLAYED_HANDSHAKE] == 2
    assert pb.endpoint == A_EP  # no roaming to the attacker
    assert pb.keypairs.current is session  # the session is untouched
    packets = b.receive_batch(pa.encrypt([ipv4(A_IP, B_IP, b"after")], T0 + 31), A_EP, T0 + 31)
    assert [bytes(p)[20:] for p in packets.packets] == [b"after"]


class Flood:
    """Initiations with a valid mac1 (the responder's public key is no secret) but junk inside,
    each from another spoofed source address: what an off-path attacker can send."""

    def __init__(self, target: Device) -> None:
        self.gen = CookieGenerator(target.public_key)
        self.rng = random.Random(99)
        self.target = target
        self.sent = 0
        self.replies: Counter[int] = Counter()

    def message(self) -> bytearray:
        body = bytes([MSG_INITIATION, 0, 0, 0]) + self.rng.randbytes(INITIATION_SIZE - 4)
        msg = bytearray(body)
        self.gen.add_macs(msg, 0.0)
        return msg

    def send(self, count: int, now: float) -> None:
        for _ in range(count):
            i = self.sent
            self.sent += 1
            src = (f"198.19.{i // 250 % 250}.{i % 250 + 1}", 1024 + i % 60000)
            res = self.target.receive(bytes(self.message()), src, now)
            assert res.packets == []
            self.replies.update(kinds(res.replies))


def test_initiation_flood_engages_cookies_and_a_real_peer_still_gets_through() -> None:
    a, b = devices()
    pa = a.peers[b.public_key]
    flood = Flood(b)
    threshold = UNDER_LOAD_HANDSHAKES_PER_SECOND

    # Up to the threshold the responder tries each one (a DH, then the box fails) ...
    flood.send(threshold, T0)
    assert b.drops[DropReason.AUTHENTICATION] == threshold
    assert not flood.replies
    # ... past it, it is under load: no DH any more, a cookie reply to the (spoofed) source.
    flood.send(300, T0 + 0.1)
    assert b.drops[DropReason.AUTHENTICATION] == threshold
    assert b.drops[DropReason.COOKIE_REQUIRED] == 300
    assert flood.replies == {MSG_COOKIE_REPLY: 300}

    # The real peer's initiation during the flood: it too must prove its address first.
    init = pa.encrypt([ipv4(A_IP, B_IP, b"through the flood")], T0 + 0.2)
    res = b.receive_batch(init, A_EP, T0 + 0.2)
    assert kinds(res.replies) == {MSG_COOKIE_REPLY: 1}
    cookie, to = res.replies[0]
    assert to == A_EP
    assert a.receive(cookie, B_EP, T0 + 0.2).replies == []  # A keeps the cookie

    # The flood goes on; when A retransmits (REKEY_TIMEOUT + jitter) the responder is still
    # under load, and A's initiation now carries mac2: accepted.
    deadline = pa.next_deadline()
    assert deadline is not None
    assert T0 + 5 <= deadline <= T0 + 6
    flood.send(threshold + 50, deadline - 0.05)
    retry = a.on_timer(deadline)
    assert [d[0] for d, _ in retry] == [MSG_INITIATION]
    res = b.receive_batch([d for d, _ in retry], A_EP, deadline)
    assert kinds(res.replies) == {MSG_RESPONSE: 1}
    got = a.receive(res.replies[0][0], B_EP, deadline + 0.01)
    assert any(isinstance(e, HandshakeCompleted) for e in a.events())
    # The packet staged since the first attempt goes out and arrives.
    delivered = b.receive_batch([d for d, _ in got.replies], A_EP, deadline + 0.02)
    assert [bytes(p)[20:] for p in delivered.packets] == [b"through the flood"]
    # Nothing was ever answered with a handshake response but the real peer.
    assert flood.replies[MSG_RESPONSE] == 0
    assert b.drops[DropReason.AUTHENTICATION] <= 2 * threshold  # one window's worth each


def test_an_attacker_with_a_cookie_is_rate_limited_per_address() -> None:
    """A non-spoofing attacker can answer the cookie; then the per-address limiter holds it to
    a burst of RATELIMIT_BURST and 20/s while the device is under load."""
    _, b = devices()
    flood = Flood(b)
    flood.send(UNDER_LOAD_HANDSHAKES_PER_SECOND + 1, T0)  # under load from here
    attacker = Flood(b)
    res = b.receive(bytes(attacker.message()), EVIL_EP, T0 + 0.1)
    assert kinds(res.replies) == {MSG_COOKIE_REPLY: 1}
    attacker.gen.consume_reply(CookieReply.parse(res.replies[0][0]), T0 + 0.1)
    before = b.drops[DropReason.AUTHENTICATION]
    limited_before = b.drops.get(DropReason.RATE_LIMITED, 0)
    for _ in range(50):
        msg = attacker.message()
        attacker.gen.add_macs(msg, T0 + 0.2)
        assert b.receive(bytes(msg), EVIL_EP, T0 + 0.2).replies == []
    # Only the burst got as far as the (failing) decryption.
    assert b.drops[DropReason.AUTHENTICATION] - before == RATELIMIT_BURST
    assert b.drops[DropReason.RATE_LIMITED] - limited_before == 50 - RATELIMIT_BURST


def test_replayed_data_from_elsewhere_is_dropped_and_moves_nothing() -> None:
    """An on-path attacker records a burst of transport packets and re-sends it, from the
    peer's address and from its own, now and after newer packets: every copy is a counted
    replay drop, nothing reaches the TUN twice, and the peer's endpoint does not roam."""
    a, b = devices()
    pa, pb = a.peers[b.public_key], b.peers[a.public_key]
    init = pa.encrypt([ipv4(A_IP, B_IP)], T0)
    res = b.receive_batch(init, A_EP, T0)
    staged = a.receive(res.replies[0][0], B_EP, T0).replies
    b.receive_batch([d for d, _ in staged], A_EP, T0)
    burst = pa.encrypt([ipv4(A_IP, B_IP, b"pay %d" % i) for i in range(8)], T0 + 1)
    got = b.receive_batch(burst, A_EP, T0 + 1).packets
    assert [bytes(p)[20:] for p in got] == [b"pay %d" % i for i in range(8)]

    for src in (A_EP, EVIL_EP):
        res = b.receive_batch(list(reversed(burst)), src, T0 + 2)
        assert res.packets == []
        assert res.replies == []
    newer = pa.encrypt([ipv4(A_IP, B_IP, b"newer")], T0 + 3)
    assert [bytes(p)[20:] for p in b.receive_batch(newer, A_EP, T0 + 3).packets] == [b"newer"]
    assert b.receive_batch(burst[:3], EVIL_EP, T0 + 4).packets == []
    assert b.drops[DropReason.REPLAY] == 8 + 8 + 3
    assert pb.endpoint == A_EP  # a replayed packet never makes the peer roam
