"""Codec tests for agent.proto.disco: golden bytes, message rules (tailscale disco/disco.go),
classification (wgengine/magicsock/magicsock.go packetLooksLike), round trips and hostile input.

The golden packets were computed with PyNaCl from fixed keys (X25519 private keys of 32 repeated
bytes) and a fixed nonce; the plaintext layouts agree with tailscale disco/disco_test.go, whose
Pong for 2.3.4.5:1234 is checked byte for byte."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proto import disco
from agent.proto.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    MalformedPacket,
    RemoteProtocolError,
)
from agent.proto.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)

# Keys: private keys are 32 repeated bytes.
DISCO_A_PRIV = b"\x44" * 32
DISCO_A_PUB = bytes.fromhex("ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6b")
DISCO_B_PRIV = b"\x55" * 32
DISCO_B_PUB = bytes.fromhex("38ab664bd86f77d7e66bdd9ae0792913a94fd8b33a1260027e4b46c1f4884c67")
CLIENT_NODE_KEY = bytes.fromhex("0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20")
NONCE = bytes.fromhex("000102030405060708090a0b0c0d0e0f1011121314151617")
TXID = bytes.fromhex("0102030405060708090a0b0c")

# DISCO: the shared key of A and B, a Ping A -> B, a Pong to a DERP ping, a CallMeMaybe.
SHARED_AB = bytes.fromhex("1b6fbda54f448090918280c6fe92479f65697e9bea50d6432abb8eae5ff95181")
PING_PLAIN = bytes.fromhex("01000102030405060708090a0b0c") + CLIENT_NODE_KEY
PING_PACKET = bytes.fromhex(
    "5453f09f92ac"
    "ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6b"
    "000102030405060708090a0b0c0d0e0f1011121314151617"
    "af676261e3cd4d76eb9238f81a3b8ae75c79f235b37d51c1a7f4827a98bfc06a"
    "0391c363a2a84ff17cac2980e6b174bf89b6d4a34da187bbc5bc28e083b4"
)
PONG_DERP_PLAIN = bytes.fromhex("02000102030405060708090a0b0c00000000000000000000ffff7f0303280001")
CMM_PLAIN = bytes.fromhex(
    "030000000000000000000000ffffc0000207a2a920010db8000000000000000000000007a2a9"
)
# Upstream golden from tailscale disco/disco_test.go: Pong for 2.3.4.5:1234.
PONG_UPSTREAM_PLAIN = bytes.fromhex(
    "02000102030405060708090a0b0c00000000000000000000ffff0203040504d2"
)

tx_ids = st.binary(min_size=12, max_size=12)
keys = st.binary(min_size=32, max_size=32)
ports = st.integers(min_value=0, max_value=0xFFFF)
hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
addresses = st.tuples(hosts, ports)


def canonical(addr: tuple[str, int]) -> tuple[str, int]:
    """What parsing gives back: IPv4-mapped IPv6 un-mapped."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), addr[1]
    return str(ip), addr[1]


def box_packet(plaintext: bytes, sender_priv: bytes = DISCO_A_PRIV) -> bytes:
    """A disco packet to B around arbitrary plaintext, built with PyNaCl directly."""
    priv = nacl.public.PrivateKey(sender_priv)
    sealed = nacl.public.Box(priv, nacl.public.PublicKey(DISCO_B_PUB)).encrypt(plaintext, NONCE)
    return disco.MAGIC + bytes(priv.public_key) + bytes(sealed)


# --- constants ------------------------------------------------------------------------------------


def test_constants() -> None:
    assert bytes.fromhex("5453f09f92ac") == disco.MAGIC
    assert disco.KEY_LEN == 32
    assert disco.NONCE_LEN == 24
    assert disco.HEADER_LEN == 62
    assert disco.MIN_PACKET_LEN == 80
    assert (disco.TYPE_PING, disco.TYPE_PONG, disco.TYPE_CALL_ME_MAYBE) == (1, 2, 3)
    assert disco.TYPE_NAT_INFO == 0x80
    assert disco.VERSION == 0


# --- golden bytes ---------------------------------------------------------------------------------


def test_shared_key_golden() -> None:
    assert disco.shared_key(DISCO_A_PRIV, DISCO_B_PUB) == SHARED_AB
    assert disco.shared_key(DISCO_B_PRIV, DISCO_A_PUB) == SHARED_AB


def test_ping_plaintext_golden() -> None:
    ping = disco.Ping(TXID, CLIENT_NODE_KEY)
    assert ping.encode() == PING_PLAIN
    assert len(PING_PLAIN) == 46
    assert disco.parse_message(PING_PLAIN) == ping


def test_ping_packet_golden_seal() -> None:
    packet = disco.seal(DISCO_A_PRIV, DISCO_B_PUB, disco.Ping(TXID, CLIENT_NODE_KEY), NONCE)
    assert packet == PING_PACKET
    assert len(packet) == 124


def test_ping_packet_golden_open() -> None:
    sender, msg = disco.open_packet(DISCO_B_PRIV, PING_PACKET)
    assert sender == DISCO_A_PUB
    assert msg == disco.Ping(TXID, CLIENT_NODE_KEY)
    assert disco.sender_key(PING_PACKET) == DISCO_A_PUB


def test_pong_derp_plaintext_golden() -> None:
    pong = disco.Pong(TXID, (disco.DERP_MAGIC_IP, 1))
    assert pong.encode() == PONG_DERP_PLAIN
    assert len(PONG_DERP_PLAIN) == 32
    assert disco.parse_message(PONG_DERP_PLAIN) == pong


def test_pong_upstream_golden() -> None:
    pong = disco.Pong(TXID, ("2.3.4.5", 1234))
    assert pong.encode() == PONG_UPSTREAM_PLAIN
    assert disco.parse_message(PONG_UPSTREAM_PLAIN) == pong


def test_call_me_maybe_golden() -> None:
    cmm = disco.CallMeMaybe((("192.0.2.7", 41641), ("2001:db8::7", 41641)))
    assert cmm.encode() == CMM_PLAIN
    assert len(CMM_PLAIN) == 38
    assert disco.parse_message(CMM_PLAIN) == cmm


def test_wire_sizes() -> None:
    # Ping with key 124, Pong 110, CallMeMaybe 80 + 18·N.
    def size(msg: disco.Message) -> int:
        return len(disco.seal(DISCO_A_PRIV, DISCO_B_PUB, msg, NONCE))

    assert size(disco.Pong(TXID, ("192.0.2.7", 1))) == 110
    for n in range(4):
        assert size(disco.CallMeMaybe((("192.0.2.7", 1),) * n)) == 80 + 18 * n


# --- message rules --------------------------------------------------------------------------------


def test_ping_without_key() -> None:
    plain = b"\x01\x00" + TXID
    assert disco.parse_message(plain) == disco.Ping(TXID)
    assert disco.Ping(TXID).encode() == plain
    # Fewer than 32 bytes after the tx id: no key, the rest ignored.
    assert disco.parse_message(plain + bytes(31)) == disco.Ping(TXID)


def test_ping_padding() -> None:
    ping = disco.Ping(TXID, CLIENT_NODE_KEY, padding=100)
    wire = ping.encode()
    assert wire == PING_PLAIN + bytes(100)
    assert disco.parse_message(wire) == ping


def test_ping_short_body() -> None:
    with pytest.raises(MalformedPacket):
        disco.parse_message(b"\x01\x00" + TXID[:11])


def test_ping_any_version_accepted() -> None:
    assert disco.parse_message(b"\x01\x07" + PING_PLAIN[2:]) == disco.Ping(TXID, CLIENT_NODE_KEY)


def test_pong_short_and_trailing() -> None:
    with pytest.raises(MalformedPacket):
        disco.parse_message(PONG_DERP_PLAIN[:-1])
    assert disco.parse_message(PONG_DERP_PLAIN + b"future") == disco.Pong(TXID, ("127.3.3.40", 1))


def test_pong_v6_src() -> None:
    pong = disco.Pong(TXID, ("2001:db8::1", 443))
    assert disco.parse_message(pong.encode()) == pong


@pytest.mark.parametrize(
    "plain",
    [
        b"\x03\x00",  # empty
        b"\x03\x01" + CMM_PLAIN[2:],  # unknown version
        CMM_PLAIN + b"\x00",  # not a multiple of 18
        CMM_PLAIN[:-1],
    ],
)
def test_call_me_maybe_parsed_empty(plain: bytes) -> None:
    assert disco.parse_message(plain) == disco.CallMeMaybe(())


@pytest.mark.parametrize(
    ("info", "plain"),
    [
        (disco.NatInfo(), b"\x80\x00\x00"),
        (disco.NatInfo(hard=True), b"\x80\x00\x01"),
        (disco.NatInfo(hard=False, want=True), b"\x80\x00\x06"),
        (disco.NatInfo(hard=True, probe=True), b"\x80\x00\x09"),
        (disco.NatInfo(hard=True, want=True, probe=True), b"\x80\x00\x0d"),
    ],
)
def test_nat_info_golden(info: disco.NatInfo, plain: bytes) -> None:
    assert info.encode() == plain
    assert disco.parse_message(plain) == info


@pytest.mark.parametrize(
    ("plain", "info"),
    [
        (b"\x80\x00\x03", disco.NatInfo()),  # hard and easy at once: not known
        (b"\x80\x00\xf1" + b"later", disco.NatInfo(hard=True)),  # unknown bits, trailing bytes
        (b"\x80\x07\x02", disco.NatInfo(hard=False)),  # any version
    ],
)
def test_nat_info_lenient_parse(plain: bytes, info: disco.NatInfo) -> None:
    assert disco.parse_message(plain) == info


@given(hard=st.none() | st.booleans(), want=st.booleans(), probe=st.booleans())
def test_nat_info_round_trip(hard: bool | None, want: bool, probe: bool) -> None:
    info = disco.NatInfo(hard=hard, want=want, probe=probe)
    assert disco.parse_message(info.encode()) == info


@pytest.mark.parametrize(
    "plain", [b"", b"\x01", b"\x00\x00", b"\x04\x00" + bytes(72), b"\xff\x00", b"\x80\x00"]
)
def test_parse_message_rejects(plain: bytes) -> None:
    with pytest.raises(MalformedPacket):
        disco.parse_message(plain)


def test_parse_wrong_class() -> None:
    with pytest.raises(MalformedPacket):
        disco.Pong.parse(PING_PLAIN)


@pytest.mark.parametrize(
    "msg",
    [
        disco.Ping(b"short"),
        disco.Ping(TXID, b"short"),
        disco.Ping(TXID, None, padding=4),
        disco.Ping(TXID, CLIENT_NODE_KEY, padding=-1),
        disco.Pong(TXID, ("example.com", 1)),
        disco.Pong(TXID, ("192.0.2.7", 70000)),
        disco.CallMeMaybe((("not an ip", 1),)),
    ],
)
def test_encode_misuse(msg: disco.Message) -> None:
    with pytest.raises(LocalProtocolError):
        msg.encode()


def test_seal_misuse() -> None:
    ping = disco.Ping(TXID)
    with pytest.raises(LocalProtocolError):
        disco.seal(DISCO_A_PRIV, DISCO_B_PUB, ping, NONCE[:23])
    with pytest.raises(LocalProtocolError):
        disco.seal(DISCO_A_PRIV[:31], DISCO_B_PUB, ping, NONCE)
    with pytest.raises(LocalProtocolError):
        disco.seal(DISCO_A_PRIV, bytes(32), ping, NONCE)  # low-order public key


# --- opening --------------------------------------------------------------------------------------


def test_open_wrong_receiver() -> None:
    with pytest.raises(AuthenticationFailed):
        disco.open_packet(b"\x66" * 32, PING_PACKET)


@pytest.mark.parametrize("pos", [6, 37, 38, 61, 62, 123])
def test_open_tampered(pos: int) -> None:
    bad = bytearray(PING_PACKET)
    bad[pos] ^= 0x01
    with pytest.raises(AuthenticationFailed):
        disco.open_packet(DISCO_B_PRIV, bytes(bad))


def test_open_low_order_sender_key() -> None:
    bad = PING_PACKET[:6] + bytes(32) + PING_PACKET[38:]
    with pytest.raises(AuthenticationFailed):
        disco.open_packet(DISCO_B_PRIV, bad)


def test_open_too_short_or_no_magic() -> None:
    with pytest.raises(MalformedPacket):
        disco.open_packet(DISCO_B_PRIV, box_packet(b"\x01"))  # 79 bytes
    with pytest.raises(MalformedPacket):
        disco.open_packet(DISCO_B_PRIV, b"XS" + PING_PACKET[2:])


def test_open_unparsable_plaintext() -> None:
    with pytest.raises(MalformedPacket):
        disco.open_packet(DISCO_B_PRIV, box_packet(b"\x09\x00" + bytes(20)))


def test_sender_key_rejects() -> None:
    with pytest.raises(MalformedPacket):
        disco.sender_key(PING_PACKET[:37])


# --- classification -------------------------------------------------------------------------------


def test_looks_like_disco() -> None:
    assert disco.looks_like_disco(PING_PACKET)
    assert disco.looks_like_disco(PING_PACKET[:38])
    assert not disco.looks_like_disco(PING_PACKET[:37])
    assert not disco.looks_like_disco(b"TS\xf0\x9f\x92\xad" + PING_PACKET[6:])
    stun_request = bytes.fromhex(
        "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f"
    )
    assert not disco.looks_like_disco(stun_request)


WIREGUARD = [
    (MSG_INITIATION, INITIATION_SIZE),
    (MSG_RESPONSE, RESPONSE_SIZE),
    (MSG_COOKIE_REPLY, COOKIE_REPLY_SIZE),
    (MSG_TRANSPORT, TRANSPORT_MIN_SIZE),
]


@given(kind=st.sampled_from(WIREGUARD), data=st.data())
def test_wireguard_never_disco(kind: tuple[int, int], data: st.DataObject) -> None:
    msg_type, size = kind
    extra = data.draw(st.integers(0, 1400)) if msg_type == MSG_TRANSPORT else 0
    rest = data.draw(st.binary(min_size=size - 4 + extra, max_size=size - 4 + extra))
    assert not disco.looks_like_disco(struct.pack("<I", msg_type) + rest)


# --- round trips ----------------------------------------------------------------------------------


@given(tx_id=tx_ids, node_key=st.none() | keys, padding=st.integers(0, 1400))
def test_ping_round_trip(tx_id: bytes, node_key: bytes | None, padding: int) -> None:
    ping = disco.Ping(tx_id, node_key, padding if node_key is not None else 0)
    assert disco.parse_message(ping.encode()) == ping


@given(tx_id=tx_ids, src=addresses)
def test_pong_round_trip(tx_id: bytes, src: tuple[str, int]) -> None:
    wire = disco.Pong(tx_id, src).encode()
    assert len(wire) == 2 + disco.PONG_LEN
    assert disco.parse_message(wire) == disco.Pong(tx_id, canonical(src))


@given(endpoints=st.lists(addresses, max_size=20))
def test_call_me_maybe_round_trip(endpoints: list[tuple[str, int]]) -> None:
    wire = disco.CallMeMaybe(tuple(endpoints)).encode()
    assert len(wire) == 2 + 18 * len(endpoints)
    expected = disco.CallMeMaybe(tuple(canonical(ep) for ep in endpoints))
    assert disco.parse_message(wire) == expected


messages = st.one_of(
    st.builds(disco.Ping, tx_ids, st.none()),
    st.builds(disco.Ping, tx_ids, keys, st.integers(0, 64)),
    st.builds(disco.Pong, tx_ids, st.tuples(st.ip_addresses(v=6).map(str), ports)),
    st.builds(
        disco.CallMeMaybe,
        st.lists(st.tuples(st.ip_addresses(v=4).map(str), ports), max_size=5).map(tuple),
    ),
    st.builds(disco.NatInfo, st.none() | st.booleans(), st.booleans(), st.booleans()),
)


@settings(max_examples=50)
@given(a=keys, b=keys, nonce=st.binary(min_size=24, max_size=24), msg=messages)
def test_seal_open_round_trip(a: bytes, b: bytes, nonce: bytes, msg: disco.Message) -> None:
    a_pub = bytes(nacl.public.PrivateKey(a).public_key)
    b_pub = bytes(nacl.public.PrivateKey(b).public_key)
    packet = disco.seal(a, b_pub, msg, nonce)
    assert disco.looks_like_disco(packet)
    assert disco.sender_key(packet) == a_pub
    assert packet[38:62] == nonce
    sender, opened = disco.open_packet(b, packet)
    assert sender == a_pub
    if isinstance(msg, disco.Pong):
        msg = disco.Pong(msg.tx_id, canonical(msg.src))
    assert opened == msg


# --- hostile input --------------------------------------------------------------------------------


@given(data=st.binary(max_size=200))
def test_fuzz_parse(data: bytes) -> None:
    for parse in (disco.parse_message, disco.Ping.parse, disco.Pong.parse, disco.CallMeMaybe.parse):
        with contextlib.suppress(RemoteProtocolError):
            parse(data)


@given(data=st.binary(max_size=200), tagged=st.booleans())
def test_fuzz_open(data: bytes, tagged: bool) -> None:
    packet = (disco.MAGIC + data) if tagged else data
    for call in (lambda p: disco.open_packet(DISCO_B_PRIV, p), disco.sender_key):
        with contextlib.suppress(RemoteProtocolError):
            call(packet)


@given(pos=st.integers(0, 123), mask=st.integers(1, 255), cut=st.integers(0, 124))
def test_fuzz_open_mutated(pos: int, mask: int, cut: int) -> None:
    bad = bytearray(PING_PACKET[:cut])
    if pos < len(bad):
        bad[pos] ^= mask
    with contextlib.suppress(RemoteProtocolError):
        disco.open_packet(DISCO_B_PRIV, bytes(bad))


@given(plain=st.binary(max_size=120))
@settings(max_examples=50)
def test_fuzz_boxed_plaintext(plain: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        disco.open_packet(DISCO_B_PRIV, box_packet(plain))
