"""DERP frame codec tests: golden bytes, boxes, FrameBuffer, fuzz.

Hex literals below were written from tailscale's derp/derp.go frame layouts; keys are the
X25519 private scalars 32 bytes of 0x11 (server), 0x22 (client) and 0x33 (peer), and the fixed box
nonce is 00 01 .. 17.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proto.derp.frames import (
    FRAME_HEADER_LEN,
    MAGIC,
    MAX_FRAME_SIZE,
    MAX_PACKET_SIZE,
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    Frame,
    FrameBuffer,
    FrameTooLarge,
    FrameType,
    Health,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    PeerPresentFlags,
    Ping,
    Pong,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfo,
    ServerKey,
    UnknownFrame,
    WatchConns,
    open_client_info,
    open_server_info,
    parse_any,
    parse_frame,
    seal_client_info,
    seal_server_info,
)
from agent.proto.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    MalformedPacket,
    RemoteProtocolError,
)

# --- keys and vectors -----------------------------------------------------------------------------

SERVER_PRIV = bytes([0x11]) * 32
CLIENT_PRIV = bytes([0x22]) * 32
PEER_PRIV = bytes([0x33]) * 32
SERVER_PUB = bytes.fromhex("7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13")
CLIENT_PUB = bytes.fromhex("0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20")
PEER_PUB = bytes.fromhex("7b0d47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b14")
NONCE = bytes.fromhex("000102030405060708090a0b0c0d0e0f1011121314151617")

SERVER_KEY_HEX = "010000002844455250f09f9491" + SERVER_PUB.hex()
CLIENT_INFO_HEX = (
    "0200000068"
    + CLIENT_PUB.hex()
    + NONCE.hex()
    + "a858a062bb55fbd0e565bf952225b5e220ae6ff32ce093a7548f0f9efd7331db"
    "8b94711fe4546f1ed0d738121d94abe3"
)
SERVER_INFO_HEX = (
    "0300000035" + NONCE.hex() + "a9f96672359ffb53a9a765041e0e895820ae6ff32ce093a7548f0f9eac"
)

# (frame, hex) for every frame type past the login.
GOLDEN: list[tuple[Frame, str]] = [
    (ServerKey(SERVER_PUB), SERVER_KEY_HEX),
    (SendPacket(PEER_PUB, b"\x01\x02\x03"), "0400000023" + PEER_PUB.hex() + "010203"),
    (RecvPacket(CLIENT_PUB, b"\x01\x02\x03"), "0500000023" + CLIENT_PUB.hex() + "010203"),
    (KeepAlive(), "0600000000"),
    (NotePreferred(True), "070000000101"),
    (PeerGone(PEER_PUB, PeerGoneReason.NOT_HERE), "0800000021" + PEER_PUB.hex() + "01"),
    (
        PeerPresent(
            PEER_PUB, (ipaddress.IPv4Address("192.0.2.7"), 41641), PeerPresentFlags.IS_REGULAR
        ),
        "0900000033" + PEER_PUB.hex() + "00000000000000000000ffffc0000207" + "a2a9" + "01",
    ),
    (
        ForwardPacket(CLIENT_PUB, PEER_PUB, b"\x01\x02\x03"),
        "0a00000043" + CLIENT_PUB.hex() + PEER_PUB.hex() + "010203",
    ),
    (WatchConns(), "1000000000"),
    (ClosePeer(PEER_PUB), "1100000020" + PEER_PUB.hex()),
    (Ping(bytes.fromhex("0102030405060708")), "1200000008" + "0102030405060708"),
    (Pong(bytes.fromhex("0102030405060708")), "1300000008" + "0102030405060708"),
    (Health("dup"), "1400000003647570"),
    (Restarting(1500, 8000), "1500000008000005dc00001f40"),
]

CLIENT_JSON = {"version": 2, "CanAckPings": True}
SERVER_JSON = {"version": 2}


def test_spec_keys_match_private_scalars() -> None:
    from nacl.public import PrivateKey

    assert bytes(PrivateKey(SERVER_PRIV).public_key) == SERVER_PUB
    assert bytes(PrivateKey(CLIENT_PRIV).public_key) == CLIENT_PUB
    assert bytes(PrivateKey(PEER_PRIV).public_key) == PEER_PUB


# --- golden bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("frame", "hex_bytes"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_encode_and_parse(frame: Frame, hex_bytes: str) -> None:
    wire = bytes.fromhex(hex_bytes)
    assert frame.encode() == wire
    assert parse_any(wire) == frame
    assert parse_frame(wire[0], wire[FRAME_HEADER_LEN:]) == frame


def test_golden_server_key_layout() -> None:
    wire = bytes.fromhex(SERVER_KEY_HEX)
    assert len(wire) == 45
    assert wire[5:13] == MAGIC == bytes.fromhex("44455250f09f9491")


def test_golden_client_info_box() -> None:
    wire = bytes.fromhex(CLIENT_INFO_HEX)
    assert len(wire) == 109
    sealed = seal_client_info(CLIENT_PRIV, SERVER_PUB, CLIENT_JSON, NONCE)
    assert ClientInfo(CLIENT_PUB, sealed).encode() == wire
    frame = parse_any(wire)
    assert isinstance(frame, ClientInfo)
    assert frame.key == CLIENT_PUB
    assert frame.sealed[:24] == NONCE
    assert open_client_info(SERVER_PRIV, frame.key, frame.sealed) == CLIENT_JSON


def test_golden_server_info_box() -> None:
    wire = bytes.fromhex(SERVER_INFO_HEX)
    assert len(wire) == 58
    sealed = seal_server_info(SERVER_PRIV, CLIENT_PUB, SERVER_JSON, NONCE)
    assert ServerInfo(sealed).encode() == wire
    frame = parse_any(wire)
    assert isinstance(frame, ServerInfo)
    assert open_server_info(CLIENT_PRIV, SERVER_PUB, frame.sealed) == SERVER_JSON


def test_golden_disco_ping_inside_send_packet_header() -> None:
    # A DISCO ping (124 bytes) inside DERP has header 04 0000009c + destination key.
    frame = SendPacket(PEER_PUB, bytes(124))
    assert frame.encode()[:5] == bytes.fromhex("040000009c")


# --- boxes ----------------------------------------------------------------------------------------


def test_box_round_trip_and_wrong_keys_fail() -> None:
    info = {"meshKey": "ab" * 32, "version": 2, "CanAckPings": False}
    sealed = seal_client_info(CLIENT_PRIV, SERVER_PUB, info, NONCE)
    assert open_client_info(SERVER_PRIV, CLIENT_PUB, sealed) == info
    with pytest.raises(AuthenticationFailed):
        open_client_info(PEER_PRIV, CLIENT_PUB, sealed)  # wrong server key
    with pytest.raises(AuthenticationFailed):
        open_client_info(SERVER_PRIV, PEER_PUB, sealed)  # wrong claimed client key
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(AuthenticationFailed):
        open_client_info(SERVER_PRIV, CLIENT_PUB, tampered)
    with pytest.raises(AuthenticationFailed):
        open_server_info(
            CLIENT_PRIV, PEER_PUB, seal_server_info(SERVER_PRIV, CLIENT_PUB, {}, NONCE)
        )


def test_box_rejects_short_non_json_and_non_object() -> None:
    with pytest.raises(MalformedPacket):
        open_client_info(SERVER_PRIV, CLIENT_PUB, NONCE + bytes(15))
    with pytest.raises(MalformedPacket):
        open_client_info(SERVER_PRIV, bytes(32), NONCE + bytes(40))
    from nacl.public import Box, PrivateKey, PublicKey

    box = Box(PrivateKey(CLIENT_PRIV), PublicKey(SERVER_PUB))
    for plaintext in (b"not json", b"[1,2]", b"\xff\xfe"):
        sealed = bytes(box.encrypt(plaintext, NONCE))
        with pytest.raises(MalformedPacket):
            open_client_info(SERVER_PRIV, CLIENT_PUB, sealed)


def test_seal_rejects_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        seal_client_info(CLIENT_PRIV, SERVER_PUB, {}, NONCE[:23])
    with pytest.raises(LocalProtocolError):
        seal_client_info(CLIENT_PRIV[:31], SERVER_PUB, {}, NONCE)


# --- per-type length rules (derp/derp.go) ---------------------------------------------------------


def test_server_key_accepts_extra_bytes_and_checks_magic() -> None:
    payload = MAGIC + SERVER_PUB
    assert ServerKey.parse(payload + b"future") == ServerKey(SERVER_PUB)
    assert ServerKey.parse(payload + bytes(1024 - 40)) == ServerKey(SERVER_PUB)
    for bad in (payload[:-1], payload + bytes(1024 - 39), b"DERP\x00\x00\x00\x00" + SERVER_PUB):
        with pytest.raises(MalformedPacket):
            ServerKey.parse(bad)


def test_client_info_bounds_and_zero_key() -> None:
    assert ClientInfo.parse(CLIENT_PUB + NONCE).sealed == NONCE
    with pytest.raises(MalformedPacket):
        ClientInfo.parse(CLIENT_PUB + NONCE[:-1])
    with pytest.raises(MalformedPacket):
        ClientInfo.parse(CLIENT_PUB + bytes(256 * 1024 - 31))
    with pytest.raises(MalformedPacket):
        ClientInfo.parse(bytes(32) + NONCE + bytes(16))


def test_packet_frames_bounds() -> None:
    biggest = bytes(MAX_PACKET_SIZE)
    assert SendPacket.parse(PEER_PUB + biggest).packet == biggest
    assert RecvPacket.parse(PEER_PUB).packet == b""
    assert ForwardPacket.parse(CLIENT_PUB + PEER_PUB).packet == b""
    for cls in (SendPacket, RecvPacket):
        with pytest.raises(MalformedPacket):
            cls.parse(PEER_PUB[:31])
        with pytest.raises(MalformedPacket):
            cls.parse(PEER_PUB + biggest + b"x")
    with pytest.raises(MalformedPacket):
        ForwardPacket.parse(CLIENT_PUB + PEER_PUB[:31])
    with pytest.raises(MalformedPacket):
        ForwardPacket.parse(CLIENT_PUB + PEER_PUB + biggest + b"x")
    with pytest.raises(LocalProtocolError):
        SendPacket(PEER_PUB, biggest + b"x")
    with pytest.raises(LocalProtocolError):
        SendPacket(PEER_PUB[:31], b"")


@pytest.mark.parametrize(
    ("cls", "good", "bad"),
    [
        (KeepAlive, [b""], [b"\x00"]),
        (WatchConns, [b""], [b"\x00"]),
        (NotePreferred, [b"\x00", b"\x01"], [b"", b"\x01\x01"]),
        (ClosePeer, [PEER_PUB], [PEER_PUB[:31], PEER_PUB + b"\x00"]),
        (Ping, [bytes(8), bytes(1000)], [bytes(7), bytes(1001)]),
        (Pong, [bytes(8), bytes(1000)], [bytes(7), bytes(1001)]),
        (Restarting, [bytes(8), bytes(12)], [bytes(7)]),
        (PeerGone, [PEER_PUB, PEER_PUB + b"\x01", PEER_PUB + b"\x01ext"], [PEER_PUB[:31]]),
        (Health, [b"", "caf\u00e9".encode()], [b"\xff"]),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_exact_length_rules(cls: Any, good: list[bytes], bad: list[bytes]) -> None:
    for payload in good:
        cls.parse(payload)
    for payload in bad:
        with pytest.raises(MalformedPacket):
            cls.parse(payload)


def test_ping_extra_bytes_discarded() -> None:
    assert Ping.parse(bytes(range(20))) == Ping(bytes(range(8)))
    assert Pong.parse(bytes(range(20))).encode() == bytes.fromhex("1300000008") + bytes(range(8))


def test_note_preferred_nonzero_is_true() -> None:
    assert NotePreferred.parse(b"\x02").preferred
    assert NotePreferred(False).encode() == bytes.fromhex("070000000100")


def test_peer_gone_optional_reason() -> None:
    old = PeerGone.parse(PEER_PUB)
    assert old.reason is None
    assert old.effective_reason == PeerGoneReason.DISCONNECTED
    assert old.encode() == bytes.fromhex("0800000020") + PEER_PUB
    default = PeerGone(PEER_PUB)
    assert default.encode() == bytes.fromhex("0800000021") + PEER_PUB + b"\x00"
    odd = PeerGone.parse(PEER_PUB + b"\x07")
    assert odd.reason == 7
    assert PeerGone.parse(PEER_PUB + b"\x01").reason is PeerGoneReason.NOT_HERE


def test_peer_present_variants() -> None:
    ip6 = ipaddress.IPv6Address("2001:db8::7")
    addr6 = ip6.packed + b"\xa2\xa9"
    short = PeerPresent.parse(PEER_PUB)
    assert short == PeerPresent(PEER_PUB)
    assert short.encode() == bytes.fromhex("0900000020") + PEER_PUB
    no_flags = PeerPresent.parse(PEER_PUB + addr6)
    assert no_flags == PeerPresent(PEER_PUB, (ip6, 41641), None)
    assert no_flags.encode() == bytes.fromhex("0900000032") + PEER_PUB + addr6
    flagged = PeerPresent.parse(PEER_PUB + addr6 + b"\x0a" + b"future")
    assert flagged.flags == PeerPresentFlags.IS_MESH_PEER | PeerPresentFlags.NOT_IDEAL
    zero_addr = PeerPresent.parse(PEER_PUB + bytes(18) + b"\x04")
    assert zero_addr.endpoint is None
    assert zero_addr.flags == PeerPresentFlags.IS_PROBER
    assert zero_addr.encode() == bytes.fromhex("0900000033") + PEER_PUB + bytes(18) + b"\x04"
    for n in (33, 49):
        with pytest.raises(MalformedPacket):
            PeerPresent.parse(PEER_PUB + bytes(n - 32))


def test_unknown_frame_is_kept_and_skippable() -> None:
    wire = bytes.fromhex("7f00000003aabbcc")
    frame = parse_any(wire)
    assert frame == UnknownFrame(0x7F, b"\xaa\xbb\xcc")
    assert frame.encode() == wire
    frames = FrameBuffer().feed(wire + KeepAlive().encode())
    assert frames == [UnknownFrame(0x7F, b"\xaa\xbb\xcc"), KeepAlive()]
    with pytest.raises(LocalProtocolError):
        UnknownFrame(256, b"")


def test_parse_any_checks_header_length() -> None:
    with pytest.raises(MalformedPacket):
        parse_any(b"\x06\x00\x00")
    with pytest.raises(MalformedPacket):
        parse_any(bytes.fromhex("0600000001"))


def test_every_frame_type_is_covered_and_parses_to_its_class() -> None:
    covered = {f.frame_type for f, _ in GOLDEN} | {
        ClientInfo.frame_type,
        ServerInfo.frame_type,
    }
    assert covered == set(FrameType)
    for frame, hex_bytes in GOLDEN:
        parsed = parse_frame(frame.frame_type, bytes.fromhex(hex_bytes)[FRAME_HEADER_LEN:])
        assert type(parsed) is type(frame)


# --- round trip -----------------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
packets = st.binary(max_size=2000)
ips = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(1, 2**32 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(1, 2**128 - 1)).filter(
        lambda ip: ip.ipv4_mapped is None
    ),
)
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(ServerKey, keys),
    st.builds(ClientInfo, keys.filter(any), st.binary(min_size=24, max_size=300)),
    st.builds(ServerInfo, st.binary(min_size=24, max_size=300)),
    st.builds(SendPacket, keys, packets),
    st.builds(RecvPacket, keys, packets),
    st.just(KeepAlive()),
    st.builds(NotePreferred, st.booleans()),
    st.builds(PeerGone, keys, st.one_of(st.none(), st.integers(0, 255))),
    st.builds(
        PeerPresent,
        keys,
        st.one_of(st.none(), st.tuples(ips, st.integers(1, 65535))),
        st.one_of(st.none(), st.builds(PeerPresentFlags, st.integers(0, 255))),
    ),
    st.builds(ForwardPacket, keys, keys, packets),
    st.just(WatchConns()),
    st.builds(ClosePeer, keys),
    st.builds(Ping, st.binary(min_size=8, max_size=8)),
    st.builds(Pong, st.binary(min_size=8, max_size=8)),
    st.builds(Health, st.text(max_size=100)),
    st.builds(Restarting, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(
        UnknownFrame,
        st.integers(0, 255).filter(lambda t: t not in set(FrameType)),
        packets,
    ),
)


@given(frames)
def test_round_trip(frame: Frame) -> None:
    wire = frame.encode()
    assert int.from_bytes(wire[1:5]) == len(wire) - FRAME_HEADER_LEN
    assert wire[0] == frame.frame_type
    assert parse_any(wire) == frame


@given(st.lists(frames, max_size=8), st.data())
def test_frame_buffer_any_chunking(items: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(f.encode() for f in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    buf = FrameBuffer()
    out: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += buf.feed(stream[start:end])
    assert out == items
    assert buf.buffered == 0


# --- FrameBuffer ----------------------------------------------------------------------------------


def _handshake_stream() -> bytes:
    return b"".join(
        [
            bytes.fromhex(SERVER_KEY_HEX),
            bytes.fromhex(SERVER_INFO_HEX),
            *(bytes.fromhex(h) for _, h in GOLDEN[1:]),
        ]
    )


def test_frame_buffer_whole_equals_byte_by_byte() -> None:
    stream = _handshake_stream()
    whole = FrameBuffer().feed(stream)
    buf = FrameBuffer()
    single: list[Frame] = []
    for i in range(len(stream)):
        single += buf.feed(stream[i : i + 1])
    assert whole == single
    assert len(whole) == len(GOLDEN) + 1
    assert whole[0] == ServerKey(SERVER_PUB)
    assert isinstance(whole[1], ServerInfo)
    assert whole[2:] == [f for f, _ in GOLDEN[1:]]


def test_frame_buffer_holds_partial_frame() -> None:
    wire = SendPacket(PEER_PUB, b"hello").encode()
    buf = FrameBuffer()
    assert buf.feed(wire[:3]) == []
    assert buf.buffered == 3
    assert buf.feed(wire[3:-1]) == []
    assert buf.feed(wire[-1:] + wire[:2]) == [SendPacket(PEER_PUB, b"hello")]
    assert buf.buffered == 2
    assert buf.feed(memoryview(wire[2:])) == [SendPacket(PEER_PUB, b"hello")]


def test_oversize_header_rejected_before_body() -> None:
    buf = FrameBuffer(max_frame_size=MAX_FRAME_SIZE)
    header = bytes([0x7F]) + (MAX_FRAME_SIZE + 1).to_bytes(4, "big")
    with pytest.raises(FrameTooLarge):
        buf.feed(header)  # refused on the header alone, no body needed
    assert buf.failed
    assert buf.buffered == 0
    with pytest.raises(FrameTooLarge):
        buf.feed(b"")  # stays failed
    with pytest.raises(RemoteProtocolError):
        buf.feed(KeepAlive().encode())


def test_oversize_header_with_body_bytes_keeps_nothing() -> None:
    buf = FrameBuffer(max_frame_size=100)
    with pytest.raises(FrameTooLarge):
        buf.feed(bytes([0x7F]) + (101).to_bytes(4, "big") + bytes(50))
    assert buf.buffered == 0
    assert FrameBuffer(max_frame_size=100).feed(bytes([0x7F, 0, 0, 0, 100]) + bytes(100))


def test_per_type_limit_checked_at_header() -> None:
    # A SendPacket header over 32 + 64 KiB is refused even under the stream limit.
    header = bytes([FrameType.SEND_PACKET]) + (32 + MAX_PACKET_SIZE + 1).to_bytes(4, "big")
    with pytest.raises(FrameTooLarge):
        FrameBuffer().feed(header)
    with pytest.raises(FrameTooLarge):
        FrameBuffer().feed(bytes.fromhex("0600000001"))  # KeepAlive must be empty
    with pytest.raises(FrameTooLarge):
        FrameBuffer().feed(bytes([FrameType.SERVER_INFO]) + (2**32 - 1).to_bytes(4, "big"))


def test_malformed_frame_fails_stream_but_feed_raw_does_not_parse() -> None:
    bad = bytes.fromhex("07000000") + b"\x00"  # NotePreferred with an empty payload
    buf = FrameBuffer()
    with pytest.raises(MalformedPacket):
        buf.feed(bad)
    with pytest.raises(MalformedPacket):
        buf.feed(KeepAlive().encode())
    raw = FrameBuffer().feed_raw(bad + KeepAlive().encode())
    assert raw == [(FrameType.NOTE_PREFERRED, b""), (FrameType.KEEP_ALIVE, b"")]


# --- hostile input --------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=200), max_size=10))
def test_fuzz_frame_buffer_raises_only_remote_errors(chunks: list[bytes]) -> None:
    buf = FrameBuffer(max_frame_size=4096)
    for chunk in chunks:
        try:
            buf.feed(chunk)
        except RemoteProtocolError:
            assert buf.failed
            return


@given(st.integers(0, 255), st.binary(max_size=200))
def test_fuzz_parse_frame_raises_only_remote_errors(frame_type: int, payload: bytes) -> None:
    try:
        frame = parse_frame(frame_type, payload)
    except RemoteProtocolError:
        return
    assert parse_frame(frame_type, frame.encode()[FRAME_HEADER_LEN:]) == frame


@given(st.binary(max_size=300))
def test_fuzz_open_boxes_raise_only_remote_errors(sealed: bytes) -> None:
    for fn, priv, pub in (
        (open_client_info, SERVER_PRIV, CLIENT_PUB),
        (open_server_info, CLIENT_PRIV, SERVER_PUB),
    ):
        with pytest.raises(RemoteProtocolError):
            fn(priv, pub, sealed)
