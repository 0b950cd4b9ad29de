"""WireGuard wire messages: `parse_any`, each message's `parse`, `message_type`.

Contract (agent/proto/wireguard/messages.py): parse raises only MalformedPacket. Invariant: a
message that parses encodes back to the same bytes (the transport header to its first 16).
"""

from __future__ import annotations

import contextlib

from agent.proto.errors import MalformedPacket
from agent.proto.wireguard.messages import (
    CookieReply,
    HandshakeInitiation,
    HandshakeResponse,
    TransportHeader,
    message_type,
    parse_any,
)
from fuzz.common import Data, Seed, check, load_vector, tag

_PARSERS = (HandshakeInitiation, HandshakeResponse, CookieReply, TransportHeader)


def vector_messages() -> list[bytes]:
    """The four datagrams of the wireguard-go interop vector (tests/vectors/wireguard)."""
    vec = load_vector("wireguard/wg-fixed-ephemeral-vs-wireguard-go.json")
    return [
        bytes.fromhex(vec["msg1_initiation_hex"]),
        bytes.fromhex(vec["msg2_response_hex"]),
        bytes.fromhex(vec["msg3_data_initiator_to_responder"]["hex"]),
        bytes.fromhex(vec["msg4_data_responder_to_initiator"]["hex"]),
    ]


def vector_plaintexts() -> list[bytes]:
    vec = load_vector("wireguard/wg-fixed-ephemeral-vs-wireguard-go.json")
    return [
        bytes.fromhex(vec[k]["plaintext_ipv4_hex"])
        for k in ("msg3_data_initiator_to_responder", "msg4_data_responder_to_initiator")
    ]


class Harness:
    name = "wg_messages"
    contract = "MalformedPacket"
    dictionary = (
        b"\x01\x00\x00\x00",
        b"\x02\x00\x00\x00",
        b"\x03\x00\x00\x00",
        b"\x04\x00\x00\x00",
    )

    def run(self, data: bytes) -> str:
        d = Data(data)
        which = d.byte()
        body = d.rest()
        buf = (body, bytearray(body), memoryview(body))[which % 3]
        with contextlib.suppress(MalformedPacket):
            message_type(buf)
        try:
            msg = parse_any(buf)
        except MalformedPacket as exc:
            out = tag(exc)
        else:
            enc = msg.encode()
            want = body[:16] if isinstance(msg, TransportHeader) else body
            check(enc == want, f"{type(msg).__name__} does not encode back to its bytes")
            out = type(msg).__name__
        cls = _PARSERS[(which >> 2) % 4]
        with contextlib.suppress(MalformedPacket):
            cls.parse(buf)
        return out

    def seeds(self) -> list[bytes]:
        out = [Seed().byte(0).raw(m).build() for m in vector_messages()]
        out.append(Seed().byte(4).raw(CookieReply(7, bytes(24), bytes(32)).encode()).build())
        out.append(Seed().byte(13).raw(TransportHeader(1, 2).encode() + bytes(16)).build())
        return out
