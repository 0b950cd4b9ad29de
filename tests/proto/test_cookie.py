"""mac1/mac2 and cookie replies (agent.proto.wireguard.cookie), driven by a fake clock."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.keys import NodePrivate
from agent.proto.errors import AuthenticationFailed, LocalProtocolError, MalformedPacket
from agent.proto.wireguard.constants import COOKIE_REFRESH_TIME
from agent.proto.wireguard.cookie import CookieChecker, CookieGenerator, is_handshake_message
from agent.proto.wireguard.handshake import Handshake, LocalIdentity, consume_initiation
from agent.proto.wireguard.messages import CookieReply, HandshakeInitiation, HandshakeResponse
from tests.conftest import FakeClock

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
FIXED: dict[str, Any] = json.loads(
    (VECTORS / "wireguard/wg-fixed-ephemeral-vs-wireguard-go.json").read_text()
)
A = LocalIdentity.from_private(
    NodePrivate.from_b64(FIXED["inputs"]["initiator_static_private_b64"])
)
B = LocalIdentity.from_private(
    NodePrivate.from_b64(FIXED["inputs"]["responder_static_private_b64"])
)
MSG1 = bytes.fromhex(FIXED["msg1_initiation_hex"])
MSG2 = bytes.fromhex(FIXED["msg2_response_hex"])
SOURCE = bytes([198, 18, 5, 1]) + (51820).to_bytes(2, "big")
OTHER_SOURCE = bytes([198, 18, 5, 9]) + (51820).to_bytes(2, "big")
WALL = 1_800_000_000.0


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def blake2s_mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


# --- mac1 ---------------------------------------------------------------------------------------


def test_add_macs_reproduces_golden_mac1() -> None:
    for golden, receiver in ((MSG1, B), (MSG2, A)):
        msg = bytearray(golden)
        msg[-32:] = bytes(32)
        CookieGenerator(receiver.public).add_macs(msg, now=1000.0)
        assert bytes(msg) == golden


def test_mac1_follows_the_whitepaper_formula() -> None:
    key = hashlib.blake2s(b"mac1----" + B.public.raw).digest()
    assert B.mac1_key == key
    assert MSG1[116:132] == blake2s_mac(key, MSG1[:116])


def test_check_mac1_rejects_tampering_and_wrong_sizes() -> None:
    checker = CookieChecker(B.public)
    assert checker.check_mac1(MSG1)
    assert checker.check_mac1(bytearray(MSG1))
    assert checker.check_mac1(memoryview(MSG1))
    for offset in (0 + 4, 50, 115, 116, 131):
        bad = bytearray(MSG1)
        bad[offset] ^= 0x40
        assert not checker.check_mac1(bad)
    bad = bytearray(MSG1)
    bad[140] ^= 1  # mac2 is not covered by mac1
    assert checker.check_mac1(bad)
    assert not checker.check_mac1(MSG1[:-1])
    assert not checker.check_mac1(MSG1 + b"\0")
    assert not checker.check_mac1(b"")
    assert not checker.check_mac1(MSG2)  # mac1 of the response is keyed for A


def test_is_handshake_message() -> None:
    assert is_handshake_message(MSG1)
    assert is_handshake_message(MSG2)
    assert not is_handshake_message(MSG1[:92])
    assert not is_handshake_message(MSG2 + bytes(56))
    assert not is_handshake_message(b"\x01")


def test_add_macs_refuses_non_handshake_buffer() -> None:
    with pytest.raises(LocalProtocolError):
        CookieGenerator(B.public).add_macs(bytearray(100), now=0.0)


# --- cookie round trip --------------------------------------------------------------------------


def make_initiation(hs: Handshake, gen: CookieGenerator, index: int, now: float) -> bytearray:
    msg = hs.create_initiation(index, WALL + now)
    gen.add_macs(msg, now)
    return msg


def test_under_load_round_trip(fake_clock: FakeClock) -> None:
    initiator = Handshake(A, B.public, randbytes=seeded(1))
    gen = CookieGenerator(B.public)
    checker = CookieChecker(B.public, randbytes=seeded(2))

    first = make_initiation(initiator, gen, 1, fake_clock.now)
    assert first[-16:] == bytes(16)  # no cookie yet
    assert checker.check_mac1(first)
    assert not checker.check_mac2(first, SOURCE, fake_clock.now)

    reply_bytes = checker.create_reply(first, SOURCE, fake_clock.now)
    assert len(reply_bytes) == 64
    reply = CookieReply.parse(reply_bytes)
    assert reply.receiver == HandshakeInitiation.parse(first).sender == 1
    fake_clock.advance(0.5)
    gen.consume_reply(reply, fake_clock.now)
    assert gen.has_cookie(fake_clock.now)

    second = make_initiation(initiator, gen, 2, fake_clock.now)
    assert second[-16:] != bytes(16)
    assert checker.check_mac1(second)
    assert checker.check_mac2(second, SOURCE, fake_clock.now)
    assert not checker.check_mac2(second, OTHER_SOURCE, fake_clock.now)
    tampered = bytearray(second)
    tampered[-1] ^= 1
    assert not checker.check_mac2(tampered, SOURCE, fake_clock.now)
    # The responder still reads the message normally.
    assert consume_initiation(B, second).remote_index == 2

    # Still valid just before COOKIE_REFRESH_TIME on both sides ...
    fake_clock.advance(COOKIE_REFRESH_TIME - 1.0)
    third = make_initiation(initiator, gen, 3, fake_clock.now)
    assert checker.check_mac2(third, SOURCE, fake_clock.now)
    # ... and gone after it: the generator stops sending mac2, the checker's secret expired.
    fake_clock.advance(2.0)
    assert not gen.has_cookie(fake_clock.now)
    fourth = make_initiation(initiator, gen, 4, fake_clock.now)
    assert fourth[-16:] == bytes(16)
    assert not checker.check_mac2(third, SOURCE, fake_clock.now)


def test_secret_rotates_after_refresh_time(fake_clock: FakeClock) -> None:
    checker = CookieChecker(B.public, randbytes=seeded(2))
    hs1, gen1 = Handshake(A, B.public, randbytes=seeded(1)), CookieGenerator(B.public)
    hs2, gen2 = Handshake(A, B.public, randbytes=seeded(5)), CookieGenerator(B.public)
    t0 = fake_clock.now

    def cookie_for(hs: Handshake, gen: CookieGenerator, index: int) -> None:
        msg = make_initiation(hs, gen, index, fake_clock.now)
        reply = checker.create_reply(msg, SOURCE, fake_clock.now)
        gen.consume_reply(CookieReply.parse(reply), fake_clock.now)

    cookie_for(hs1, gen1, 1)
    fake_clock.advance(60.0)
    cookie_for(hs2, gen2, 2)
    # Within the refresh time the secret is reused: both cookies verify.
    assert checker.check_mac2(make_initiation(hs1, gen1, 3, fake_clock.now), SOURCE, t0 + 60)
    assert checker.check_mac2(make_initiation(hs2, gen2, 4, fake_clock.now), SOURCE, t0 + 60)
    # After it the secret expires; the next reply draws a new one.
    fake_clock.advance(61.0)
    assert not gen1.has_cookie(fake_clock.now)
    assert gen2.has_cookie(fake_clock.now)  # gen2's cookie is only 61 s old
    old = make_initiation(hs2, gen2, 5, fake_clock.now)
    assert old[-16:] != bytes(16)
    assert not checker.check_mac2(old, SOURCE, fake_clock.now)
    checker.create_reply(old, OTHER_SOURCE, fake_clock.now)  # rotates the secret
    assert not checker.check_mac2(old, SOURCE, fake_clock.now)  # old secret's cookie
    cookie_for(hs2, gen2, 6)
    assert checker.check_mac2(make_initiation(hs2, gen2, 7, fake_clock.now), SOURCE, fake_clock.now)


def test_reply_matches_whitepaper_construction() -> None:
    draws: list[bytes] = []
    rng = random.Random(7)

    def randbytes(n: int) -> bytes:
        out = rng.randbytes(n)
        draws.append(out)
        return out

    checker = CookieChecker(B.public, randbytes=randbytes)
    reply = CookieReply.parse(checker.create_reply(MSG1, SOURCE, now=5.0))
    secret, nonce = draws
    assert len(secret) == 32
    assert reply.nonce == nonce
    cookie_key = hashlib.blake2s(b"cookie--" + B.public.raw).digest()
    cookie = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        reply.encrypted_cookie, MSG1[116:132], reply.nonce, cookie_key
    )
    assert cookie == blake2s_mac(secret, SOURCE)
    # A sender holding that cookie computes mac2 over everything before it.
    msg = bytearray(MSG1)
    msg[-16:] = blake2s_mac(cookie, bytes(msg[:-16]))
    assert checker.check_mac2(msg, SOURCE, now=5.0)


def test_cookie_reply_to_a_response() -> None:
    checker = CookieChecker(A.public, randbytes=seeded(3))
    reply = CookieReply.parse(checker.create_reply(MSG2, SOURCE, now=1.0))
    assert reply.receiver == HandshakeResponse.parse(MSG2).sender
    gen = CookieGenerator(A.public)
    msg = bytearray(MSG2)
    gen.add_macs(msg, now=1.0)
    gen.consume_reply(reply, now=1.0)
    gen.add_macs(msg, now=2.0)
    assert checker.check_mac1(msg)
    assert checker.check_mac2(msg, SOURCE, now=2.0)


def test_create_reply_refuses_non_handshake() -> None:
    checker = CookieChecker(B.public)
    with pytest.raises(MalformedPacket):
        checker.create_reply(MSG1[:100], SOURCE, now=0.0)


def test_consume_reply_failures(fake_clock: FakeClock) -> None:
    initiator = Handshake(A, B.public, randbytes=seeded(1))
    checker = CookieChecker(B.public, randbytes=seeded(2))
    gen = CookieGenerator(B.public)
    msg = make_initiation(initiator, gen, 1, fake_clock.now)
    reply = CookieReply.parse(checker.create_reply(msg, SOURCE, fake_clock.now))

    with pytest.raises(AuthenticationFailed):  # nothing sent yet
        CookieGenerator(B.public).consume_reply(reply, fake_clock.now)
    other = CookieGenerator(A.public)
    other.add_macs(bytearray(msg), fake_clock.now)
    with pytest.raises(AuthenticationFailed):  # encrypted for B's key, held for A's
        other.consume_reply(reply, fake_clock.now)
    flipped = bytes([reply.encrypted_cookie[-1] ^ 1])
    tampered = CookieReply(reply.receiver, reply.nonce, reply.encrypted_cookie[:-1] + flipped)
    with pytest.raises(AuthenticationFailed):
        gen.consume_reply(tampered, fake_clock.now)
    # A newer message changes the last mac1, so the reply to the old one no longer opens.
    make_initiation(initiator, gen, 2, fake_clock.now)
    with pytest.raises(AuthenticationFailed):
        gen.consume_reply(reply, fake_clock.now)
    assert not gen.has_cookie(fake_clock.now)


# --- hostile input ------------------------------------------------------------------------------

_GEN = CookieGenerator(B.public)
_GEN.add_macs(bytearray(MSG1), 0.0)
_CHECKER = CookieChecker(B.public, randbytes=seeded(4))


@given(data=st.binary(max_size=200), now=st.floats(0, 1e6))
def test_checks_on_garbage_return_false(data: bytes, now: float) -> None:
    assert _CHECKER.check_mac1(data) is False
    assert _CHECKER.check_mac2(data, SOURCE, now) is False


@given(
    nonce=st.binary(min_size=24, max_size=24),
    encrypted=st.binary(min_size=32, max_size=32),
)
def test_consume_garbage_reply_raises_authentication_failed(nonce: bytes, encrypted: bytes) -> None:
    with pytest.raises(AuthenticationFailed):
        _GEN.consume_reply(CookieReply(1, nonce, encrypted), 0.0)
