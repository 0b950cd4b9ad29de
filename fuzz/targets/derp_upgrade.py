"""The HTTP/1.1 upgrade that opens a DERP stream: parse_request / parse_response.

Contract (agent/proto/derp/upgrade.py): None while the head is incomplete, else (head,
leftover); raise only MalformedPacket. Invariants: leftover is the tail of the input; more bytes
after a complete head change only the leftover; a prefix of a head that parses is "need more"
or an error, never a different head.
"""

from __future__ import annotations

from agent.proto.derp.upgrade import client_request, parse_request, parse_response, server_response
from agent.proto.errors import MalformedPacket
from fuzz.common import Data, Seed, check, tag


def _parse(which: int, buf: bytes) -> tuple[object, bytes] | None:
    return parse_request(buf) if which == 0 else parse_response(buf)


class Harness:
    name = "derp_upgrade"
    contract = "MalformedPacket"
    dictionary = (b"\r\n", b"\r\n\r\n", b"GET /derp HTTP/1.1", b"HTTP/1.1 101 Switching Protocols",
                  b"Upgrade: DERP", b"Connection: Upgrade", b"Derp-Version: 2", b": ", b"\t",
                  b"Derp-Public-Key: ")  # fmt: skip

    def run(self, data: bytes) -> str:
        d = Data(data)
        which = d.byte() & 1
        cut = d.uint(2)
        buf = d.rest()
        try:
            got = _parse(which, buf)
        except MalformedPacket as exc:
            return tag(exc)
        if got is None:
            return f"{which}:more"
        head, leftover = got
        check(buf.endswith(leftover), "leftover is not the tail of the input")
        again = _parse(which, buf + b"GET x")
        check(again is not None and again[0] == head, "extra bytes changed the head")
        check(again is not None and again[1] == leftover + b"GET x", "extra bytes lost")
        head_len = len(buf) - len(leftover)
        if head_len:
            try:
                part = _parse(which, buf[: cut % head_len])
            except MalformedPacket:
                part = None
            check(part is None, "a prefix of the head parsed as a complete head")
        return f"{which}:ok:{len(head.headers)}"  # type: ignore[attr-defined]

    def seeds(self) -> list[bytes]:
        return [
            Seed().byte(0).uint(10, 2).raw(client_request("derp.example")).build(),
            Seed()
            .byte(0)
            .uint(20, 2)
            .raw(client_request("127.0.0.1", fast_start=True) + b"\x01")
            .build(),
            Seed().byte(1).uint(30, 2).raw(server_response(bytes(range(32))) + b"\x01\x00").build(),
            Seed().byte(0).uint(0, 2).raw(b"GET /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n").build(),
            Seed()
            .byte(1)
            .uint(5, 2)
            .raw(b"HTTP/1.0 404 Not Found\r\nA:\tb\r\nA: c\r\n\r\n")
            .build(),
        ]
