"""The MagicDNS responder: query types, bare names, case, NXDOMAIN, forwarding, hostile input."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proto.dns.drops import DnsDrop
from agent.proto.dns.responder import (
    Dropped,
    Forward,
    NameTable,
    Reply,
    Responder,
    ResponderConfig,
    Transport,
)
from agent.proto.errors import LocalProtocolError

A7 = ipaddress.ip_address("100.64.0.7")
A7_6 = ipaddress.ip_address("fd7a:115c:a1e0::7")
A8 = ipaddress.ip_address("100.64.0.8")


def table() -> NameTable:
    return NameTable({"laptop.mesh.internal": [A7, A7_6], "server": [A8]}, "mesh.internal")


def ask(
    r: Responder, name: str, rdtype: str = "A", transport: Transport = Transport.UDP, **kw: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    wire = query.to_wire()
    if transport is Transport.TCP:
        wire = struct.pack("!H", len(wire)) + wire
    verdict = r.respond(wire, transport)
    assert isinstance(verdict, Reply), verdict
    out = verdict.wire
    if transport is Transport.TCP:
        assert struct.unpack("!H", out[:2])[0] == len(out) - 2
        out = out[2:]
    answer = dns.message.from_wire(out)
    assert answer.id == query.id
    return answer


def addresses(answer: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in answer.answer for rd in rrset}


@pytest.mark.parametrize(
    ("name", "rdtype", "expect"),
    [
        ("laptop.mesh.internal", "A", {"100.64.0.7"}),
        ("laptop.mesh.internal.", "AAAA", {"fd7a:115c:a1e0::7"}),
        ("laptop.mesh.internal", "ANY", {"100.64.0.7", "fd7a:115c:a1e0::7"}),
        ("server.mesh.internal", "A", {"100.64.0.8"}),
        ("server.mesh.internal", "AAAA", set()),
        ("LapTop.MESH.Internal", "A", {"100.64.0.7"}),
        ("laptop", "A", {"100.64.0.7"}),
        ("LAPTOP", "AAAA", {"fd7a:115c:a1e0::7"}),
        ("laptop.mesh.internal", "MX", set()),
        ("laptop.mesh.internal", "TXT", set()),
        ("mesh.internal", "A", set()),
    ],
)
def test_answers(name: str, rdtype: str, expect: set[str]) -> None:
    answer = ask(Responder(table()), name, rdtype)
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.flags & dns.flags.AA
    assert answer.flags & dns.flags.QR
    assert addresses(answer) == expect
    assert all(rrset.ttl == 5 for rrset in answer.answer)
    # the owner name is the question's, in the client's spelling
    assert all(rrset.name == answer.question[0].name for rrset in answer.answer)


@pytest.mark.parametrize(
    "name", ["nope.mesh.internal", "a.laptop.mesh.internal", "NOPE.mesh.internal."]
)
def test_unknown_names_in_our_domain_are_nxdomain(name: str) -> None:
    answer = ask(Responder(table()), name, "A")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert answer.flags & dns.flags.AA
    assert not answer.answer
    assert not answer.authority  # no SOA: the negative answer is not cached


@pytest.mark.parametrize(("name", "rdtype"), [("example.com", "A"), ("nope", "A"), (".", "NS")])
def test_other_names_are_forwarded(name: str, rdtype: str) -> None:
    r = Responder(table())
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=4096)
    verdict = r.respond(query.to_wire())
    assert isinstance(verdict, Forward)
    assert verdict.wire == query.to_wire()
    assert verdict.client_limit == 1232  # the client's 4096 capped by our payload
    assert verdict.transport is Transport.UDP
    assert r.counters["forwarded"] == 1


def test_ptr() -> None:
    r = Responder(table())
    answer = ask(r, dns.reversename.from_address("100.64.0.7").to_text(), "PTR")
    assert [rd.to_text() for rd in answer.answer[0]] == ["laptop.mesh.internal."]
    answer = ask(r, dns.reversename.from_address("fd7a:115c:a1e0::7").to_text(), "PTR")
    assert [rd.to_text() for rd in answer.answer[0]] == ["laptop.mesh.internal."]
    unknown = ask(r, dns.reversename.from_address("100.64.9.9").to_text(), "PTR")
    assert unknown.rcode() == dns.rcode.NXDOMAIN
    partial = ask(r, "64.100.in-addr.arpa", "PTR")
    assert partial.rcode() == dns.rcode.NOERROR
    assert not partial.answer
    nodata = ask(r, dns.reversename.from_address("100.64.0.7").to_text(), "A")
    assert nodata.rcode() == dns.rcode.NOERROR
    assert not nodata.answer
    outside = dns.message.make_query(dns.reversename.from_address("10.0.0.1"), "PTR")
    assert isinstance(r.respond(outside.to_wire()), Forward)


def test_tcp() -> None:
    answer = ask(Responder(table()), "laptop.mesh.internal", "A", Transport.TCP)
    assert addresses(answer) == {"100.64.0.7"}
    r = Responder(table())
    query = dns.message.make_query("example.com", "A").to_wire()
    verdict = r.respond(struct.pack("!H", len(query)) + query, Transport.TCP)
    assert isinstance(verdict, Forward)
    assert verdict.wire == query
    assert verdict.client_limit == 0xFFFF
    bad = r.respond(struct.pack("!H", len(query) + 1) + query, Transport.TCP)
    assert bad == Dropped(DnsDrop.BAD_TCP_FRAME)


def test_live_table_swap() -> None:
    r = Responder(table())
    assert ask(r, "newbie.mesh.internal").rcode() == dns.rcode.NXDOMAIN
    r.table = NameTable({"newbie": [A8]})
    assert addresses(ask(r, "newbie.mesh.internal")) == {"100.64.0.8"}
    assert ask(r, "laptop.mesh.internal").rcode() == dns.rcode.NXDOMAIN


def test_other_domain() -> None:
    r = Responder(NameTable({"laptop.corp.example": [A7]}, "corp.example."))
    assert addresses(ask(r, "laptop.corp.example")) == {"100.64.0.7"}
    assert ask(r, "x.corp.example").rcode() == dns.rcode.NXDOMAIN
    assert isinstance(
        r.respond(dns.message.make_query("laptop.mesh.internal", "A").to_wire()), Forward
    )


def test_table_rejects_names_outside_the_domain() -> None:
    with pytest.raises(LocalProtocolError):
        NameTable({"laptop.other.example": [A7]})
    with pytest.raises(LocalProtocolError):
        NameTable({"Not Valid": [A7]})


def test_malformed_and_hostile_input() -> None:
    r = Responder(table(), ResponderConfig(max_query_size=512))
    assert r.respond(b"") == Dropped(DnsDrop.SHORT)
    assert r.respond(b"\x12\x34" + b"\0" * 9) == Dropped(DnsDrop.SHORT)
    assert r.respond(b"\0" * 600) == Dropped(DnsDrop.OVERSIZED)
    response = dns.message.make_response(dns.message.make_query("laptop", "A"))
    assert r.respond(response.to_wire()) == Dropped(DnsDrop.NOT_QUERY)
    # a header that promises a question that is not there: FORMERR with the ID kept
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"
    verdict = r.respond(garbage)
    assert isinstance(verdict, Reply)
    assert verdict.rcode == dns.rcode.FORMERR
    formerr = dns.message.from_wire(verdict.wire)
    assert formerr.id == 0xABCD
    assert formerr.rcode() == dns.rcode.FORMERR
    assert formerr.flags & dns.flags.RD
    # two questions: FORMERR
    two = bytearray(dns.message.make_query("laptop", "A").to_wire())
    q = bytes(two[12:])
    two[4:6] = b"\x00\x02"
    verdict = r.respond(bytes(two) + q)
    assert isinstance(verdict, Reply)
    assert verdict.rcode == dns.rcode.FORMERR
    # another opcode: NOTIMP
    notify = dns.message.make_query("laptop.mesh.internal", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    verdict = r.respond(notify.to_wire())
    assert isinstance(verdict, Reply)
    assert verdict.rcode == dns.rcode.NOTIMP
    assert r.counters["drop_short"] == 2
    assert r.counters["drop_oversized"] == 1
    assert r.counters["drop_not_query"] == 1
    assert r.counters["rcode_formerr"] == 2


def test_udp_truncation() -> None:
    many = [ipaddress.ip_address(f"100.64.1.{i}") for i in range(1, 60)]
    r = Responder(NameTable({"big": many}))
    small = ask(r, "big.mesh.internal", "A")  # no EDNS: 512 bytes at most
    assert small.flags & dns.flags.TC
    assert not small.answer
    assert small.question[0].name.to_text() == "big.mesh.internal."
    large = ask(r, "big.mesh.internal", "A", use_edns=0, payload=4096)
    assert not large.flags & dns.flags.TC
    assert len(addresses(large)) == 59
    assert large.edns == 0
    over_tcp = ask(r, "big.mesh.internal", "A", Transport.TCP)
    assert len(addresses(over_tcp)) == 59
    assert r.counters["truncated"] == 1


def test_edns_and_cookies_pass_through() -> None:
    r = Responder(table())
    options = [dns.edns.GenericOption(10, b"\x01" * 8)]  # a DNS client cookie
    answer = ask(r, "laptop.mesh.internal", "A", use_edns=0, payload=1400, options=options)
    assert answer.edns == 0
    assert answer.payload == 1232
    assert addresses(answer) == {"100.64.0.7"}


_TYPES = st.sampled_from(["A", "AAAA", "PTR", "ANY", "MX", "TXT", "SRV", "NS", "SOA", "CNAME"])
_NAMES = st.sampled_from(
    ["laptop", "laptop.mesh.internal", "x.mesh.internal", "example.com", "7.0.64.100.in-addr.arpa"]
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700), st.sampled_from(list(Transport)))
def test_fuzz_random_bytes_never_raise(data: bytes, transport: Transport) -> None:
    r = Responder(table())
    verdict = r.respond(data, transport)
    assert isinstance(verdict, Reply | Forward | Dropped)
    if isinstance(verdict, Reply):
        wire = verdict.wire[2:] if transport is Transport.TCP else verdict.wire
        assert dns.message.from_wire(wire).flags & dns.flags.QR


@settings(max_examples=300, deadline=None)
@given(_NAMES, _TYPES, st.data())
def test_fuzz_mutated_queries_never_raise(name: str, rdtype: str, data: st.DataObject) -> None:
    wire = bytearray(dns.message.make_query(name, rdtype, use_edns=0).to_wire())
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    wire += data.draw(st.binary(max_size=8))
    verdict = Responder(table()).respond(bytes(wire))
    assert isinstance(verdict, Reply | Forward | Dropped)
    if isinstance(verdict, Reply):
        assert verdict.wire[:2] == bytes(wire[:2])


def test_rdtype_edge_cases() -> None:
    r = Responder(table())
    for rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.OPT, 65280):
        query = dns.message.make_query("laptop.mesh.internal", rdtype)
        verdict = r.respond(query.to_wire())
        assert isinstance(verdict, Reply | Dropped)
