"""STUN binding codec: is_stun, BindingRequest/BindingResponse.parse, parse_binding_request,
parse_response.

Contract (agent/proto/stun.py): the parse functions raise only MalformedPacket. Invariant: a
parsed request or response re-encodes to bytes that parse to the same value.
"""

from __future__ import annotations

import contextlib

from agent.proto import stun
from agent.proto.errors import MalformedPacket
from fuzz.common import Data, Seed, check, tag

TXID = bytes(range(1, 13))


class Harness:
    name = "stun"
    contract = "MalformedPacket"
    dictionary = (b"\x21\x12\xa4\x42", b"\x00\x01", b"\x01\x01", b"\x80\x22", b"\x80\x28",
                  b"\x00\x20", b"\x80\x20", b"\x00\x01\x00\x08", b"tailnode")  # fmt: skip

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte() & 1
        body = d.rest()
        stun.is_stun(body)
        try:
            if mode == 0:
                req = stun.BindingRequest.parse(body)
                check(stun.BindingRequest.parse(req.encode()) == req, "request round trip")
                stun.parse_binding_request(body, software=None)
                with contextlib.suppress(MalformedPacket):
                    stun.parse_binding_request(body)
                return "request"
            res = stun.BindingResponse.parse(body)
            check(stun.BindingResponse.parse(res.encode()) == res, "response round trip")
            check(stun.parse_response(body) == (res.txid, res.address), "parse_response differs")
            return "response"
        except MalformedPacket as exc:
            return f"{mode}:{tag(exc)}"

    def seeds(self) -> list[bytes]:
        return [
            Seed().byte(0).raw(stun.binding_request(TXID)).build(),
            Seed().byte(1).raw(stun.binding_response(TXID, ("192.0.2.1", 41641))).build(),
            Seed().byte(1).raw(stun.binding_response(TXID, ("2001:db8::1", 3478))).build(),
            Seed().byte(1).raw(bytes.fromhex(
                "0101000c2112a4420102030405060708090a0b0c0001000800011f90c0000201")).build(),
        ]  # fmt: skip
