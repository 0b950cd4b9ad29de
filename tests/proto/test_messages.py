"""Codec tests for agent.proto.wireguard.messages: golden bytes from wireguard-go, sizes, fuzz."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proto.errors import LocalProtocolError, MalformedPacket
from agent.proto.wireguard.messages import (
    CookieReply,
    HandshakeInitiation,
    HandshakeResponse,
    TransportHeader,
    message_type,
    parse_any,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
FIXED: dict[str, Any] = json.loads(
    (VECTORS / "wireguard/wg-fixed-ephemeral-vs-wireguard-go.json").read_text()
)
MSG1 = bytes.fromhex(FIXED["msg1_initiation_hex"])
MSG2 = bytes.fromhex(FIXED["msg2_response_hex"])
MSG3 = bytes.fromhex(FIXED["msg3_data_initiator_to_responder"]["hex"])
MSG4 = bytes.fromhex(FIXED["msg4_data_responder_to_initiator"]["hex"])
INITIATOR_INDEX = FIXED["inputs"]["sender_index"]
RESPONDER_INDEX = FIXED["responder_sender_index"]


# --- golden bytes -------------------------------------------------------------------------------


def test_parse_initiation_golden() -> None:
    msg = HandshakeInitiation.parse(MSG1)
    assert msg.sender == INITIATOR_INDEX == 0x0A0B0C0D
    assert msg.ephemeral == MSG1[8:40]
    assert msg.encrypted_static == MSG1[40:88]
    assert msg.encrypted_timestamp == MSG1[88:116]
    assert msg.mac1 == MSG1[116:132]
    assert msg.mac2 == bytes(16)
    assert msg.encode() == MSG1


def test_parse_response_golden() -> None:
    msg = HandshakeResponse.parse(MSG2)
    assert msg.sender == RESPONDER_INDEX
    assert msg.receiver == INITIATOR_INDEX
    assert msg.ephemeral == MSG2[12:44]
    assert msg.encrypted_nothing == MSG2[44:60]
    assert msg.mac1 == MSG2[60:76]
    assert msg.mac2 == bytes(16)
    assert msg.encode() == MSG2


def test_parse_transport_headers_golden() -> None:
    h3 = TransportHeader.parse(MSG3)
    assert (h3.receiver, h3.counter) == (RESPONDER_INDEX, 0)
    assert h3.encode() == MSG3[:16]
    h4 = TransportHeader.parse(MSG4)
    assert (h4.receiver, h4.counter) == (INITIATOR_INDEX, 0)
    assert h4.encode() == MSG4[:16]


def test_transport_header_is_little_endian() -> None:
    data = bytes.fromhex("04000000010203040102030405060708") + bytes(16)
    h = TransportHeader.parse(data)
    assert h.receiver == 0x04030201
    assert h.counter == 0x0807060504030201


def test_cookie_reply_layout() -> None:
    reply = CookieReply(receiver=0x11223344, nonce=bytes(range(24)), encrypted_cookie=b"\xaa" * 32)
    data = reply.encode()
    assert len(data) == 64
    assert data[:8] == bytes.fromhex("0300000044332211")
    assert data[8:32] == bytes(range(24))
    assert data[32:] == b"\xaa" * 32
    assert CookieReply.parse(data) == reply


@pytest.mark.parametrize("data", [MSG1, MSG2, MSG3, MSG4])
def test_parse_accepts_any_buffer_type(data: bytes) -> None:
    expected = parse_any(data)
    assert parse_any(bytearray(data)) == expected
    assert parse_any(memoryview(data)) == expected


def test_parse_any_and_message_type() -> None:
    assert message_type(MSG1) == 1
    assert message_type(MSG2) == 2
    assert message_type(MSG3) == 4
    assert isinstance(parse_any(MSG1), HandshakeInitiation)
    assert isinstance(parse_any(MSG2), HandshakeResponse)
    assert isinstance(parse_any(MSG3), TransportHeader)
    reply = CookieReply(1, bytes(24), bytes(32)).encode()
    assert message_type(reply) == 3
    assert isinstance(parse_any(reply), CookieReply)


# --- rejection ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "good"),
    [
        (HandshakeInitiation, MSG1),
        (HandshakeResponse, MSG2),
        (CookieReply, CookieReply(1, bytes(24), bytes(32)).encode()),
    ],
)
def test_exact_size_and_type_word(cls: Any, good: bytes) -> None:
    cls.parse(good)
    for wrong_size in (good[:-1], good + b"\0", b"", good[:4]):
        with pytest.raises(MalformedPacket):
            cls.parse(wrong_size)
    for i in (1, 2, 3):  # reserved bytes must be zero
        bad = bytearray(good)
        bad[i] = 1
        with pytest.raises(MalformedPacket):
            cls.parse(bad)
    wrong_type = bytearray(good)
    wrong_type[0] = 4 if good[0] != 4 else 1
    with pytest.raises(MalformedPacket):
        cls.parse(wrong_type)


def test_transport_rejects_short_and_wrong_type() -> None:
    TransportHeader.parse(MSG3[:32])  # keepalive size
    with pytest.raises(MalformedPacket):
        TransportHeader.parse(MSG3[:31])
    bad = bytearray(MSG3)
    bad[3] = 1
    with pytest.raises(MalformedPacket):
        TransportHeader.parse(bad)
    with pytest.raises(MalformedPacket):
        TransportHeader.parse(MSG1)


@pytest.mark.parametrize("word", [0, 5, 0x101, 0x01000000, 0xFFFFFFFF])
def test_message_type_rejects_unknown_words(word: int) -> None:
    with pytest.raises(MalformedPacket):
        message_type(struct.pack("<I", word) + bytes(200))


def test_message_type_rejects_short() -> None:
    for data in (b"", b"\x01", b"\x01\0\0"):
        with pytest.raises(MalformedPacket):
            message_type(data)


def test_constructor_validates_fields() -> None:
    with pytest.raises(LocalProtocolError):
        HandshakeInitiation(1, bytes(31), bytes(48), bytes(28), bytes(16), bytes(16))
    with pytest.raises(LocalProtocolError):
        HandshakeInitiation(1 << 32, bytes(32), bytes(48), bytes(28), bytes(16), bytes(16))
    with pytest.raises(LocalProtocolError):
        HandshakeResponse(1, -1, bytes(32), bytes(16), bytes(16), bytes(16))
    with pytest.raises(LocalProtocolError):
        CookieReply(1, bytes(24), bytes(33))
    with pytest.raises(LocalProtocolError):
        TransportHeader(1, 1 << 64)


def test_messages_are_frozen() -> None:
    h = TransportHeader(1, 2)
    with pytest.raises(AttributeError):
        h.counter = 3  # type: ignore[misc]


# --- properties ---------------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)


def blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


initiations = st.builds(HandshakeInitiation, u32, blob(32), blob(48), blob(28), blob(16), blob(16))
responses = st.builds(HandshakeResponse, u32, u32, blob(32), blob(16), blob(16), blob(16))
cookie_replies = st.builds(CookieReply, u32, blob(24), blob(32))
headers = st.builds(TransportHeader, u32, st.integers(0, (1 << 64) - 1))


@given(msg=st.one_of(initiations, responses, cookie_replies))
def test_encode_parse_round_trip(
    msg: HandshakeInitiation | HandshakeResponse | CookieReply,
) -> None:
    data = msg.encode()
    assert type(msg).parse(data) == msg
    assert parse_any(data) == msg


@given(header=headers, payload=st.binary(min_size=16, max_size=64))
def test_transport_header_round_trip(header: TransportHeader, payload: bytes) -> None:
    data = header.encode() + payload
    assert TransportHeader.parse(data) == header
    assert parse_any(data) == header


# Arbitrary bytes, and arbitrary bytes behind a valid type word (to reach the size checks).
garbage = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(1, 4), st.binary(max_size=200)).map(
        lambda t: struct.pack("<I", t[0]) + t[1]
    ),
)


@given(data=garbage)
def test_parse_garbage_raises_only_malformed(data: bytes) -> None:
    for parse in (
        HandshakeInitiation.parse,
        HandshakeResponse.parse,
        CookieReply.parse,
        TransportHeader.parse,
        parse_any,
        message_type,
    ):
        with contextlib.suppress(MalformedPacket):  # the only exception a parser may raise
            parse(data)
