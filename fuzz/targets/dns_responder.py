"""The DNS service's request path (agent/proto/dns/responder.py): Responder.respond over UDP
and TCP framing.

Contract: nothing may raise; every input gives a Reply, a Forward or a Dropped with a typed
reason. Invariants: a reply over UDP fits the size the query allowed (512 bytes without EDNS),
and over TCP carries its own 2-byte length prefix.
"""

from __future__ import annotations

from ipaddress import ip_address

import dns.message
import dns.rdatatype

from agent.proto.dns.drops import DnsDrop
from agent.proto.dns.responder import Dropped, Forward, NameTable, Reply, Responder, Transport
from fuzz.common import Data, Seed, check

TABLE = NameTable(
    {
        "laptop": [ip_address("100.64.0.1"), ip_address("fd7a:115c:a1e0::1")],
        "web.mesh.internal": [ip_address("100.64.0.3")],
    }
)


def _query(name: str, rdtype: str) -> bytes:
    return dns.message.make_query(name, dns.rdatatype.from_text(rdtype)).to_wire()


class Harness:
    name = "dns_responder"
    contract = "nothing"
    dictionary = (b"\x07laptop\x04mesh\x08internal\x00", b"\x00\x01\x00\x01",
                  b"\x00\x1c\x00\x01", b"\x00\x0c\x00\x01", b"\x00\x29", b"\xc0\x0c",
                  b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00", b"\x03100\x0264")  # fmt: skip

    def __init__(self) -> None:
        self.responder = Responder(TABLE)

    def run(self, data: bytes) -> str:
        d = Data(data)
        transport = Transport.TCP if d.byte() & 1 else Transport.UDP
        body = d.rest()
        verdict = self.responder.respond(body, transport)
        if isinstance(verdict, Reply):
            wire = verdict.wire
            if transport is Transport.TCP:
                check(int.from_bytes(wire[:2], "big") == len(wire) - 2, "TCP length prefix")
            else:
                check(len(wire) <= 0xFFFF, "UDP reply too large")
            return f"reply:{transport.value}"
        if isinstance(verdict, Forward):
            return "forward"
        check(isinstance(verdict, Dropped) and isinstance(verdict.reason, DnsDrop), "untyped")
        assert isinstance(verdict, Dropped)
        return f"drop:{verdict.reason}"

    def seeds(self) -> list[bytes]:
        out = []
        for name, rdtype in (("laptop.mesh.internal.", "A"), ("laptop.", "AAAA"),
                             ("1.0.64.100.in-addr.arpa.", "PTR"), ("nobody.mesh.internal.", "A"),
                             ("example.com.", "A")):  # fmt: skip
            q = _query(name, rdtype)
            out.append(Seed().byte(0).raw(q).build())
            out.append(Seed().byte(1).raw(len(q).to_bytes(2, "big") + q).build())
        return out
