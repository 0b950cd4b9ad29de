"""Golden and pair tests for the Noise_IKpsk2 handshake (agent.proto.wireguard.handshake).

Sources (tests/vectors/README.md): cacophony's IKpsk2 vector drives the generic Noise steps; a
WireGuard exchange with a fixed initiator ephemeral, answered by wireguard-go, pins our initiator
byte for byte and our responder's view of message 1; a pcap of two wireguard-go peers checks
sizes, mac1 and that our responder reads a real initiation.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.keys import NodePrivate, NodePublic, PresharedKey
from agent.proto.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    MalformedPacket,
    RateLimited,
    RemoteProtocolError,
    ReplayedHandshake,
    UnknownPeer,
    UnknownReceiver,
)
from agent.proto.wireguard.cookie import CookieChecker, CookieGenerator
from agent.proto.wireguard.crypto import (
    aead_decrypt,
    aead_encrypt,
    dh,
    public_from_private,
    tai64n,
)
from agent.proto.wireguard.handshake import (
    ConsumedInitiation,
    Handshake,
    LocalIdentity,
    consume_initiation,
)
from agent.proto.wireguard.messages import (
    HandshakeInitiation,
    HandshakeResponse,
    TransportHeader,
    message_type,
)
from agent.proto.wireguard.noise import (
    SymmetricState,
    initiator_read_msg2,
    initiator_write_msg1,
    responder_read_msg1,
    responder_write_msg2,
)
from agent.proto.wireguard.session import SessionKeys

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


FIXED = load("wireguard/wg-fixed-ephemeral-vs-wireguard-go.json")
INPUTS = FIXED["inputs"]
A = LocalIdentity.from_private(NodePrivate.from_b64(INPUTS["initiator_static_private_b64"]))
B = LocalIdentity.from_private(NodePrivate.from_b64(INPUTS["responder_static_private_b64"]))
PSK = PresharedKey.from_b64(INPUTS["psk_b64"])
A_EPHEMERAL = bytes.fromhex(INPUTS["initiator_ephemeral_private_hex"])
MSG1 = bytes.fromhex(FIXED["msg1_initiation_hex"])
MSG2 = bytes.fromhex(FIXED["msg2_response_hex"])


def test_vector_keys_match_readme() -> None:
    assert A.public.to_b64() == INPUTS["initiator_static_public_b64"]
    assert B.public.to_b64() == INPUTS["responder_static_public_b64"]


# --- cacophony Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s --------------------------------------------

CACOPHONY = next(
    v
    for v in load("noise/cacophony-IK-IKpsk2_25519_ChaChaPoly_BLAKE2s.json")["vectors"]
    if v["protocol_name"] == "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
)


def _h(key: str) -> bytes:
    return bytes.fromhex(CACOPHONY[key])


def test_cacophony_ikpsk2_both_sides_byte_for_byte() -> None:
    v = CACOPHONY
    name = v["protocol_name"].encode()
    i_static, r_static = _h("init_static"), _h("resp_static")
    i_eph, r_eph = _h("init_ephemeral"), _h("resp_ephemeral")
    i_static_pub, r_static_pub = public_from_private(i_static), public_from_private(r_static)
    assert _h("init_remote_static") == r_static_pub
    psk = bytes.fromhex(v["init_psks"][0])
    assert v["resp_psks"] == v["init_psks"]
    messages = [
        (bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in v["messages"]
    ]

    initiator = SymmetricState.initialize(name)
    initiator.mix_hash(_h("init_prologue"))
    initiator.mix_hash(r_static_pub)
    responder = SymmetricState.initialize(name)
    responder.mix_hash(_h("resp_prologue"))
    responder.mix_hash(r_static_pub)

    # Message 1: initiator -> responder.
    payload, expected = messages[0]
    e_pub, enc_s, enc_payload = initiator_write_msg1(
        initiator,
        ephemeral_private=i_eph,
        local_static_public=i_static_pub,
        remote_static=r_static_pub,
        static_static=dh(i_static, r_static_pub),
        payload=payload,
    )
    assert e_pub + enc_s + enc_payload == expected
    got_static, got_payload = responder_read_msg1(
        responder,
        local_static_private=r_static,
        remote_ephemeral=expected[:32],
        encrypted_static=expected[32:80],
        encrypted_payload=expected[80:],
        static_static=lambda rs: dh(r_static, rs),
    )
    assert (got_static, got_payload) == (i_static_pub, payload)
    assert initiator.hash == responder.hash
    assert initiator.chaining_key == responder.chaining_key

    # Message 2: responder -> initiator.
    payload, expected = messages[1]
    r_e_pub, enc_payload = responder_write_msg2(
        responder,
        ephemeral_private=r_eph,
        remote_ephemeral=e_pub,
        remote_static=i_static_pub,
        preshared_key=psk,
        payload=payload,
    )
    assert r_e_pub + enc_payload == expected
    got = initiator_read_msg2(
        initiator,
        ephemeral_private=i_eph,
        local_static_private=i_static,
        remote_ephemeral=expected[:32],
        encrypted_payload=expected[32:],
        preshared_key=psk,
    )
    assert got == payload
    assert initiator.hash == responder.hash == _h("handshake_hash")

    # Transport: initiator sends with k1, responder with k2; nonces count per direction.
    k1, k2 = initiator.split()
    assert responder.split() == (k1, k2)
    nonces = {k1: 0, k2: 0}
    for i, (payload, expected) in enumerate(messages[2:]):
        key = k1 if i % 2 == 0 else k2
        assert aead_encrypt(key, nonces[key], payload, b"") == expected
        assert aead_decrypt(key, nonces[key], expected, b"") == payload
        nonces[key] += 1


def test_symmetric_state_initialize_short_name_is_padded() -> None:
    s = SymmetricState.initialize(b"Noise_NN")
    assert s.hash == s.chaining_key == b"Noise_NN" + bytes(24)


def test_symmetric_state_without_key_passes_plaintext() -> None:
    s = SymmetricState.initialize(b"x")
    before = s.hash
    assert s.encrypt_and_hash(b"clear") == b"clear"
    assert s.hash != before


# --- WireGuard exchange with wireguard-go (fixed initiator ephemeral) ---------------------------


def _fixed_initiation() -> tuple[Handshake, bytearray]:
    hs = Handshake(A, B.public, PSK.raw)
    msg = hs.create_initiation(
        INPUTS["sender_index"], float(INPUTS["timestamp_unix"]), ephemeral_private=A_EPHEMERAL
    )
    return hs, msg


def test_initiation_byte_for_byte() -> None:
    hs, msg = _fixed_initiation()
    assert isinstance(msg, bytearray)
    assert len(msg) == 148
    assert msg[116:] == bytes(32)  # macs are left to cookie.py
    CookieGenerator(B.public).add_macs(msg, now=1000.0)
    assert bytes(msg) == MSG1
    assert hs.initiation_pending
    assert hs.chaining_key is not None
    assert hs.chaining_key.hex() == FIXED["state_after_msg1"]["chaining_key"]
    assert hs.hash is not None
    assert hs.hash.hex() == FIXED["state_after_msg1"]["hash"]


def test_initiation_timestamp_is_tai64n() -> None:
    assert tai64n(float(INPUTS["timestamp_unix"])).hex() == INPUTS["timestamp_tai64n_hex"]


def test_responder_consumes_golden_initiation() -> None:
    assert CookieChecker(B.public).check_mac1(MSG1)
    consumed = consume_initiation(B, MSG1)
    assert consumed.remote_static == A.public
    assert consumed.timestamp.hex() == INPUTS["timestamp_tai64n_hex"]
    assert consumed.remote_index == INPUTS["sender_index"]
    assert consumed.chaining_key.hex() == FIXED["state_after_msg1"]["chaining_key"]
    assert consumed.hash.hex() == FIXED["state_after_msg1"]["hash"]
    # The peer lookup variant uses the cached static-static DH and reaches the same state.
    peer = Handshake(B, A.public, PSK)
    looked_up: list[NodePublic] = []

    def find_peer(key: NodePublic) -> Handshake | None:
        looked_up.append(key)
        return peer

    assert consume_initiation(B, MSG1, find_peer=find_peer) == consumed
    assert looked_up == [A.public]
    peer.accept_initiation(consumed)
    assert peer.last_timestamp == consumed.timestamp
    assert peer.response_pending
    assert peer.chaining_key == consumed.chaining_key


def test_unknown_peer_is_refused_before_the_timestamp() -> None:
    with pytest.raises(UnknownPeer):
        consume_initiation(B, MSG1, find_peer=lambda key: None)


def test_initiator_consumes_wireguard_go_response_and_derives_keys() -> None:
    hs, _ = _fixed_initiation()
    keys = hs.consume_response(MSG2)
    assert CookieChecker(A.public).check_mac1(MSG2)
    assert keys.send_key.hex() == FIXED["transport_keys"]["initiator_send_hex"]
    assert keys.recv_key.hex() == FIXED["transport_keys"]["initiator_recv_hex"]
    assert keys.local_index == INPUTS["sender_index"]
    assert keys.remote_index == FIXED["responder_sender_index"]
    assert keys.is_initiator
    assert hs.chaining_key is not None
    assert hs.chaining_key.hex() == FIXED["state_after_msg2"]["chaining_key"]
    assert hs.hash is not None
    assert hs.hash.hex() == FIXED["state_after_msg2"]["hash"]
    assert not hs.initiation_pending
    with pytest.raises(UnknownReceiver):  # a second identical response is refused
        hs.consume_response(MSG2)

    # msg3: our first data packet (counter 0, zero-padded to 16), byte for byte.
    d3 = FIXED["msg3_data_initiator_to_responder"]
    packet = bytes.fromhex(d3["plaintext_ipv4_hex"])
    padded = packet.ljust(d3["padded_plaintext_len"], b"\0")
    assert len(padded) % 16 == 0
    header = TransportHeader(keys.remote_index, d3["counter"]).encode()
    assert header + aead_encrypt(keys.send_key, 0, padded, b"") == bytes.fromhex(d3["hex"])

    # msg4: wireguard-go's reply opens with our receive key.
    d4 = FIXED["msg4_data_responder_to_initiator"]
    data = bytes.fromhex(d4["hex"])
    h4 = TransportHeader.parse(data)
    assert h4.receiver == keys.local_index == d4["receiver_index"]
    assert h4.counter == d4["counter"]
    plaintext = aead_decrypt(keys.recv_key, h4.counter, data[16:], b"")
    reply = bytes.fromhex(d4["plaintext_ipv4_hex"])
    assert plaintext == reply.ljust(d4["padded_plaintext_len"], b"\0")
    with pytest.raises(AuthenticationFailed):
        aead_decrypt(keys.send_key, h4.counter, data[16:], b"")


def test_golden_response_fails_with_wrong_psk() -> None:
    hs, _ = _fixed_initiation()
    hs.set_preshared_key(None)
    with pytest.raises(AuthenticationFailed):
        hs.consume_response(MSG2)
    assert hs.initiation_pending  # a bad response does not cancel the handshake
    hs.set_preshared_key(PSK)
    hs.consume_response(MSG2)


# --- pcap of two wireguard-go peers -------------------------------------------------------------

_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")


def read_pcap_udp(path: Path) -> list[tuple[str, int, str, int, bytes]]:
    """(src ip, src port, dst ip, dst port, payload) for each IPv4/UDP frame of an Ethernet pcap."""
    raw = path.read_bytes()
    magic, _, _, _, _, _, linktype = _PCAP_HEADER.unpack_from(raw)
    assert magic == 0xA1B2C3D4
    assert linktype == 1  # Ethernet
    out = []
    off = _PCAP_HEADER.size
    while off < len(raw):
        _, _, incl_len, _ = _PCAP_RECORD.unpack_from(raw, off)
        off += _PCAP_RECORD.size
        frame = raw[off : off + incl_len]
        off += incl_len
        if frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        src = ".".join(str(b) for b in ip[12:16])
        dst = ".".join(str(b) for b in ip[16:20])
        sport, dport, ulen, _ = struct.unpack_from("!HHHH", ip, ihl)
        out.append((src, sport, dst, dport, bytes(ip[ihl + 8 : ihl + ulen])))
    return out


PCAP = read_pcap_udp(VECTORS / "wireguard/wg-go-pair-handshake-3pings.pcap")
ADDR_A, ADDR_B = ("198.18.5.1", 51820), ("198.18.5.2", 51820)
PCAP_TIMESTAMP = next(
    v["tai64n_hex"]
    for v in load("tai64n/wireguard-tai64n.json")["vectors"]
    if "pcap" in v.get("note", "")
)


def test_pcap_datagram_sizes_and_types() -> None:
    sizes = [len(p[4]) for p in PCAP]
    types = [message_type(p[4]) for p in PCAP]
    directions = [((p[0], p[1]), (p[2], p[3])) for p in PCAP]
    assert sizes == [148, 92] + [128] * 6 + [32]
    assert types == [1, 2] + [4] * 7
    a_to_b, b_to_a = (ADDR_A, ADDR_B), (ADDR_B, ADDR_A)
    assert directions == [a_to_b, b_to_a] + [a_to_b, b_to_a] * 3 + [a_to_b]


def test_pcap_indexes_and_macs() -> None:
    init = HandshakeInitiation.parse(PCAP[0][4])
    resp = HandshakeResponse.parse(PCAP[1][4])
    assert resp.receiver == init.sender
    assert init.mac2 == resp.mac2 == bytes(16)
    for src, _, _, _, payload in PCAP[2:]:
        header = TransportHeader.parse(payload)
        assert header.receiver == (resp.sender if src == ADDR_A[0] else init.sender)
    # mac1 is keyed by the receiver's public key.
    assert CookieChecker(B.public).check_mac1(PCAP[0][4])
    assert CookieChecker(A.public).check_mac1(PCAP[1][4])
    assert not CookieChecker(A.public).check_mac1(PCAP[0][4])
    assert not CookieChecker(B.public).check_mac1(PCAP[1][4])


def test_pcap_responder_consumes_initiation_once() -> None:
    data = PCAP[0][4]
    consumed = consume_initiation(B, data)
    assert consumed.remote_static == A.public
    assert consumed.timestamp.hex() == PCAP_TIMESTAMP
    assert consumed.remote_index == HandshakeInitiation.parse(data).sender

    responder = Handshake(B, A.public, PSK)
    responder.accept_initiation(consumed)
    with pytest.raises(ReplayedHandshake):
        responder.accept_initiation(consume_initiation(B, data))
    # Our responder can answer it (wireguard-go's ephemeral is unknown, so no byte check).
    msg, keys = responder.create_response(77)
    parsed = HandshakeResponse.parse(msg)
    assert (parsed.sender, parsed.receiver) == (77, consumed.remote_index)
    assert (keys.local_index, keys.remote_index, keys.is_initiator) == (77, parsed.receiver, False)


def test_pcap_initiation_is_not_for_a() -> None:
    with pytest.raises(AuthenticationFailed):
        consume_initiation(A, PCAP[0][4])


# --- two Handshake objects in memory -------------------------------------------------------------


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def pair(
    psk_a: bytes | None = None, psk_b: bytes | None = None, seed: int = 1
) -> tuple[Handshake, Handshake]:
    a = Handshake(A, B.public, psk_a, randbytes=seeded(seed))
    b = Handshake(B, A.public, psk_b, randbytes=seeded(seed + 1000))
    return a, b


def run_handshake(
    a: Handshake, b: Handshake, wall: float = 1_800_000_000.0
) -> tuple[SessionKeys, SessionKeys]:
    msg1 = a.create_initiation(11, wall)
    consumed = consume_initiation(B, msg1)
    b.accept_initiation(consumed)
    msg2, keys_b = b.create_response(22)
    keys_a = a.consume_response(msg2)
    return keys_a, keys_b


@pytest.mark.parametrize("psk", [None, PSK.raw], ids=["no-psk", "psk"])
def test_pair_derives_mirrored_keys(psk: bytes | None) -> None:
    a, b = pair(psk, psk)
    keys_a, keys_b = run_handshake(a, b)
    assert keys_a.send_key == keys_b.recv_key
    assert keys_a.recv_key == keys_b.send_key
    assert keys_a.send_key != keys_a.recv_key
    assert (keys_a.local_index, keys_a.remote_index, keys_a.is_initiator) == (11, 22, True)
    assert (keys_b.local_index, keys_b.remote_index, keys_b.is_initiator) == (22, 11, False)
    assert a.hash == b.hash
    assert a.chaining_key == b.chaining_key
    assert not a.initiation_pending
    assert not b.response_pending
    # Keys work for real traffic both ways.
    ct = aead_encrypt(keys_a.send_key, 0, b"ping", b"")
    assert aead_decrypt(keys_b.recv_key, 0, ct, b"") == b"ping"


def test_none_psk_equals_zero_psk() -> None:
    a1, b1 = pair(None, None, seed=5)
    a2, b2 = pair(bytes(32), bytes(32), seed=5)
    assert run_handshake(a1, b1) == run_handshake(a2, b2)


def test_seeded_randbytes_reproduces_messages() -> None:
    m1 = pair(seed=9)[0].create_initiation(1, 1_800_000_000.0)
    m2 = pair(seed=9)[0].create_initiation(1, 1_800_000_000.0)
    m3 = pair(seed=10)[0].create_initiation(1, 1_800_000_000.0)
    assert m1 == m2
    assert m1 != m3


def test_psk_mismatch_fails_and_keeps_initiation() -> None:
    a, b = pair(PSK.raw, None)
    msg1 = a.create_initiation(11, 1_800_000_000.0)
    b.accept_initiation(consume_initiation(B, msg1))  # psk is not part of message 1
    msg2, _ = b.create_response(22)
    with pytest.raises(AuthenticationFailed):
        a.consume_response(msg2)
    assert a.initiation_pending


def test_consume_response_twice_fails() -> None:
    a, b = pair()
    msg1 = a.create_initiation(11, 1_800_000_000.0)
    b.accept_initiation(consume_initiation(B, msg1))
    msg2, _ = b.create_response(22)
    a.consume_response(msg2)
    with pytest.raises(UnknownReceiver):
        a.consume_response(msg2)


def test_response_with_wrong_receiver_index() -> None:
    a, b = pair()
    msg1 = a.create_initiation(11, 1_800_000_000.0)
    b.accept_initiation(consume_initiation(B, msg1))
    msg2, _ = b.create_response(22)
    bad = bytearray(msg2)
    bad[8] ^= 1
    with pytest.raises(UnknownReceiver):
        a.consume_response(bad)
    a.consume_response(msg2)


def test_response_without_initiation() -> None:
    a, _ = pair()
    with pytest.raises(UnknownReceiver):
        a.consume_response(MSG2)


def test_newer_initiation_replaces_older() -> None:
    a, b = pair()
    first = a.create_initiation(11, 1_800_000_000.0)
    second = a.create_initiation(12, 1_800_000_001.0)
    b.accept_initiation(consume_initiation(B, first))
    with pytest.raises(UnknownReceiver):  # response to the superseded initiation
        a.consume_response(b.create_response(22)[0])
    b.accept_initiation(consume_initiation(B, second))
    msg2, _ = b.create_response(23)
    keys = a.consume_response(msg2)
    assert keys.local_index == 12
    # The older initiation, replayed, is refused.
    with pytest.raises(ReplayedHandshake):
        b.accept_initiation(consume_initiation(B, first))


def test_replay_rule_is_bytewise_and_ignores_age() -> None:
    a, b = pair()
    b.accept_initiation(consume_initiation(B, a.create_initiation(1, 1_800_000_000.0)))
    same_stamp = a.create_initiation(2, 1_800_000_000.001)  # same 16.8 ms whitening bucket
    with pytest.raises(ReplayedHandshake):
        b.accept_initiation(consume_initiation(B, same_stamp))
    with pytest.raises(ReplayedHandshake):
        b.accept_initiation(consume_initiation(B, a.create_initiation(3, 1_700_000_000.0)))
    b.accept_initiation(consume_initiation(B, a.create_initiation(4, 1_800_000_000.1)))
    assert b.last_timestamp == tai64n(1_800_000_000.1)


def test_initiation_flood_is_rate_limited() -> None:
    a, b = pair()
    b.accept_initiation(consume_initiation(B, a.create_initiation(1, 1_800_000_000.0)), now=10.0)
    fast = consume_initiation(B, a.create_initiation(2, 1_800_000_001.0))
    with pytest.raises(RateLimited):
        b.accept_initiation(fast, now=10.015)
    assert b.last_timestamp == tai64n(1_800_000_000.0)  # the refused one changed nothing
    b.accept_initiation(fast, now=10.03)
    assert b.last_timestamp == tai64n(1_800_000_001.0)


def test_create_response_needs_accepted_initiation() -> None:
    a, b = pair()
    with pytest.raises(LocalProtocolError):
        b.create_response(1)
    b.accept_initiation(consume_initiation(B, a.create_initiation(1, 1_800_000_000.0)))
    b.create_response(2)
    with pytest.raises(LocalProtocolError):  # one response per accepted initiation
        b.create_response(3)


def test_accept_initiation_for_another_peer_is_a_bug() -> None:
    other = LocalIdentity.from_private(NodePrivate(bytes(range(1, 33))))
    hs = Handshake(B, other.public)
    consumed = consume_initiation(B, MSG1)
    with pytest.raises(LocalProtocolError):
        hs.accept_initiation(consumed)


def test_clear_forgets_state_but_not_timestamp() -> None:
    a, b = pair()
    a.create_initiation(1, 1_800_000_000.0)
    b.accept_initiation(consume_initiation(B, MSG1))
    stamp = b.last_timestamp
    a.clear()
    b.clear()
    assert not a.initiation_pending
    assert not b.response_pending
    assert a.chaining_key is None
    assert a.hash is None
    assert b.last_timestamp == stamp
    with pytest.raises(LocalProtocolError):
        b.create_response(1)


def test_tampered_initiation_fails_authentication() -> None:
    for offset in (8, 40, 87, 88, 115):
        bad = bytearray(MSG1)
        bad[offset] ^= 0x01
        with pytest.raises(AuthenticationFailed):
            consume_initiation(B, bad)


def test_low_order_ephemeral_is_refused() -> None:
    bad = bytearray(MSG1)
    bad[8:40] = bytes(32)
    with pytest.raises(AuthenticationFailed):
        consume_initiation(B, bad)


def test_low_order_peer_key_is_refused_at_construction() -> None:
    with pytest.raises(LocalProtocolError):
        Handshake(A, NodePublic(bytes(32)))


def test_local_identity_checks_and_precomputes() -> None:
    with pytest.raises(LocalProtocolError):
        LocalIdentity(A.private, B.public)
    assert A.mac1_key != A.cookie_key
    text = repr(SessionKeys(b"k" * 32, b"r" * 32, 1, 2, True))
    assert "key" not in text
    assert "kkkk" not in text
    text = repr(consume_initiation(B, MSG1))
    assert "chaining_key" not in text
    assert "remote_ephemeral" not in text


def test_wrong_psk_length_is_a_bug() -> None:
    with pytest.raises(LocalProtocolError):
        Handshake(A, B.public, b"short")


# --- hostile input ------------------------------------------------------------------------------


def _typed(msg_type: int, size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size - 4, max_size=size - 4).map(
        lambda body: struct.pack("<I", msg_type) + body
    )


@given(data=st.one_of(st.binary(max_size=200), _typed(1, 148), _typed(2, 92)))
def test_consume_initiation_garbage_raises_only_remote_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        consume_initiation(B, data)


_PENDING_INDEX = 0x01020304


@given(
    data=st.one_of(
        st.binary(max_size=200),
        _typed(2, 92),
        st.binary(min_size=80, max_size=80).map(
            lambda body: struct.pack("<III", 2, 7, _PENDING_INDEX) + body
        ),
    )
)
def test_consume_response_garbage_raises_only_remote_errors(data: bytes) -> None:
    hs = Handshake(A, B.public, randbytes=seeded(3))
    hs.create_initiation(_PENDING_INDEX, 1_800_000_000.0)
    with pytest.raises(RemoteProtocolError):
        hs.consume_response(data)
    assert hs.initiation_pending


def test_consume_rejects_wrong_sizes_as_malformed() -> None:
    with pytest.raises(MalformedPacket):
        consume_initiation(B, MSG1[:-1])
    hs, _ = _fixed_initiation()
    with pytest.raises(MalformedPacket):
        hs.consume_response(MSG2 + b"\0")


def test_consumed_initiation_is_frozen() -> None:
    consumed = consume_initiation(B, MSG1)
    assert isinstance(consumed, ConsumedInitiation)
    with pytest.raises(AttributeError):
        consumed.timestamp = bytes(12)  # type: ignore[misc]
