"""DISCO codec: parse_message on plaintexts, open_packet on raw packets and on real boxes
whose plaintext is the input, looks_like_disco / sender_key.

Contract (agent/proto/disco.py): receive paths raise only RemoteProtocolError subclasses
(MalformedPacket, AuthenticationFailed). Invariant: a parsed message re-encodes to bytes that
parse to the same message.
"""

from __future__ import annotations

import contextlib

from nacl.public import Box, PrivateKey

from agent.proto import disco
from agent.proto.errors import MalformedPacket, RemoteProtocolError
from fuzz.common import Data, Seed, check, tag

A_PRIV = bytes([0x41]) * 32
B_PRIV = bytes([0x42]) * 32
A_PUB = bytes(PrivateKey(A_PRIV).public_key)
B_PUB = bytes(PrivateKey(B_PRIV).public_key)
NONCE = bytes(range(24))
NODE_KEY = bytes(range(32))


def golden_messages() -> list[disco.Message]:
    return [
        disco.Ping(bytes(range(12))),
        disco.Ping(bytes(range(12)), NODE_KEY),
        disco.Ping(bytes(range(12)), NODE_KEY, padding=20),
        disco.Pong(bytes(range(12)), ("192.0.2.7", 41641)),
        disco.Pong(bytes(range(12)), ("2001:db8::1", 3478)),
        disco.CallMeMaybe((("192.0.2.7", 41641), ("2001:db8::1", 41641))),
        disco.CallMeMaybe(),
        disco.NatInfo(),
        disco.NatInfo(hard=True, probe=True),
        disco.NatInfo(hard=False, want=True),
    ]


def _roundtrip(msg: disco.Message) -> None:
    check(disco.parse_message(msg.encode()) == msg, f"{msg!r} does not survive encode/parse")


class Harness:
    name = "disco"
    contract = "RemoteProtocolError (MalformedPacket, AuthenticationFailed)"
    dictionary = (
        disco.MAGIC, b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x80\x00", b"\x00" * 10 + b"\xff\xff",
    )  # fmt: skip

    def __init__(self) -> None:
        self._box = Box(PrivateKey(B_PRIV), PrivateKey(A_PRIV).public_key)  # B -> A

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte() % 3
        body = d.rest()
        try:
            if mode == 0:
                msg = disco.parse_message(body)
            elif mode == 1:
                packet = disco.MAGIC + B_PUB + bytes(self._box.encrypt(body, NONCE))
                sender, msg = disco.open_packet(A_PRIV, packet)
                check(sender == B_PUB, "open_packet returned another sender")
            else:
                disco.looks_like_disco(body)
                with contextlib.suppress(MalformedPacket):
                    disco.sender_key(body)
                sender, msg = disco.open_packet(A_PRIV, body)
        except RemoteProtocolError as exc:
            return f"{mode}:{tag(exc)}"
        _roundtrip(msg)
        return f"{mode}:{type(msg).__name__}"

    def seeds(self) -> list[bytes]:
        out = []
        for m in golden_messages():
            out.append(Seed().byte(0).raw(m.encode()).build())
            out.append(Seed().byte(1).raw(m.encode()).build())
        packet = disco.seal(B_PRIV, A_PUB, golden_messages()[1], NONCE)
        out.append(Seed().byte(2).raw(packet).build())
        return out
