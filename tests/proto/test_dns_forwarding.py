"""Forwarding bookkeeping: ID rewrite, answer matching, truncation, TCP retry, timeouts, limits."""

from __future__ import annotations

import struct
from collections.abc import Callable

import dns.flags
import dns.message
import dns.rcode
import pytest

from agent.proto.dns.drops import DnsDrop
from agent.proto.dns.forwarding import ForwardLimits, ForwardTable, RetryOverTcp, Sent, ToClient
from agent.proto.dns.responder import Dropped, Forward, NameTable, Responder, Transport
from tests.conftest import FakeClock

UP = ("192.0.2.53", 53)


def forward(
    name: str = "example.com", transport: Transport = Transport.UDP, **kw: object
) -> Forward:
    query = dns.message.make_query(name, "A", **kw)  # type: ignore[arg-type]
    wire = query.to_wire()
    if transport is Transport.TCP:
        wire = struct.pack("!H", len(wire)) + wire
    verdict = Responder(NameTable()).respond(wire, transport)
    assert isinstance(verdict, Forward)
    return verdict


def upstream_answer(sent: Sent, name: str = "example.com", n: int = 1, tc: bool = False) -> bytes:
    query = dns.message.make_query(name, "A")
    query.id = dns.message.from_wire(sent.wire).id
    response = dns.message.make_response(query)
    for i in range(n):
        response.answer.append(
            dns.rrset.from_text(name + ".", 60, "IN", "A", f"192.0.2.{i % 250 + 1}")
        )
    if tc:
        response.flags |= dns.flags.TC
    return response.to_wire()


def test_id_rewritten_and_restored(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    table: ForwardTable[str] = ForwardTable(randbytes=seeded_randbytes)
    fwd = forward()
    sent = table.start(fwd, "client-1", UP, fake_clock.now)
    assert isinstance(sent, Sent)
    assert sent.wire[2:] == fwd.wire[2:]
    assert struct.unpack("!H", sent.wire[:2])[0] == sent.upstream_id
    assert len(table) == 1
    out = table.receive(upstream_answer(sent), UP, fake_clock.now)
    assert isinstance(out, ToClient)
    assert out.client == "client-1"
    answer = dns.message.from_wire(out.wire)
    assert answer.id == fwd.query.id
    assert answer.answer[0][0].to_text() == "192.0.2.1"
    assert len(table) == 0
    # the same answer again: the ID is no longer known
    assert table.receive(upstream_answer(sent), UP, fake_clock.now) == Dropped(
        DnsDrop.UPSTREAM_UNKNOWN_ID
    )


def test_ids_unique_among_outstanding(fake_clock: FakeClock) -> None:
    values = iter([b"\x00\x07", b"\x00\x07", b"\x00\x07", b"\x00\x08"])
    table: ForwardTable[int] = ForwardTable(randbytes=lambda n: next(values))
    first = table.start(forward(), 1, UP, fake_clock.now)
    second = table.start(forward(), 2, UP, fake_clock.now)
    assert isinstance(first, Sent)
    assert isinstance(second, Sent)
    assert (first.upstream_id, second.upstream_id) == (7, 8)


def test_answers_must_match_source_and_question(fake_clock: FakeClock) -> None:
    table: ForwardTable[str] = ForwardTable()
    sent = table.start(forward(), "c", UP, fake_clock.now)
    assert isinstance(sent, Sent)
    mismatch = Dropped(DnsDrop.UPSTREAM_MISMATCH)
    assert table.receive(upstream_answer(sent), ("198.51.100.1", 53), fake_clock.now) == mismatch
    assert table.receive(upstream_answer(sent, "other.example"), UP, fake_clock.now) == mismatch
    assert table.receive(sent.wire, UP, fake_clock.now) == mismatch  # QR clear: not an answer
    assert table.receive(b"\x01", UP, fake_clock.now) == Dropped(DnsDrop.UPSTREAM_MALFORMED)
    junk = sent.wire[:2] + b"\x81\x80\x00\x01" + b"\x00" * 6 + b"\xff"
    assert table.receive(junk, UP, fake_clock.now) == Dropped(DnsDrop.UPSTREAM_MALFORMED)
    # case differences are fine (0x20 randomisation by upstreams)
    ok = table.receive(upstream_answer(sent, "EXAMPLE.com"), UP, fake_clock.now)
    assert isinstance(ok, ToClient)
    assert table.counters["drop_upstream_mismatch"] == 3


def test_timeout_gives_servfail(fake_clock: FakeClock) -> None:
    table: ForwardTable[str] = ForwardTable(ForwardLimits(timeout=2.0))
    assert table.next_deadline() is None
    fwd = forward()
    table.start(fwd, "a", UP, fake_clock.now)
    fake_clock.advance(1.0)
    table.start(forward("example.org"), "b", UP, fake_clock.now)
    assert table.next_deadline() == pytest.approx(fake_clock.now + 1.0)
    assert table.on_timer(fake_clock.advance(0.5)) == []
    expired = table.on_timer(fake_clock.advance(0.5))
    assert [e.client for e in expired] == ["a"]
    servfail = dns.message.from_wire(expired[0].wire)
    assert servfail.rcode() == dns.rcode.SERVFAIL
    assert servfail.id == fwd.query.id
    assert servfail.question == fwd.query.question
    assert table.next_deadline() == pytest.approx(fake_clock.now + 1.0)
    assert [e.client for e in table.on_timer(fake_clock.advance(5.0))] == ["b"]
    assert table.counters["drop_upstream_timeout"] == 2


def test_bounded(fake_clock: FakeClock) -> None:
    table: ForwardTable[int] = ForwardTable(ForwardLimits(max_outstanding=3))
    for i in range(3):
        assert isinstance(table.start(forward(), i, UP, fake_clock.now), Sent)
    full = table.start(forward(), 99, UP, fake_clock.now)
    assert isinstance(full, ToClient)
    assert dns.message.from_wire(full.wire).rcode() == dns.rcode.SERVFAIL
    assert table.counters["drop_forward_full"] == 1
    assert len(table) == 3
    nowhere = table.start(forward(), 5, None, fake_clock.now)
    assert isinstance(nowhere, ToClient)
    assert table.counters["drop_no_upstream"] == 1


def test_truncated_upstream_answer_retried_over_tcp(fake_clock: FakeClock) -> None:
    table: ForwardTable[str] = ForwardTable()
    sent = table.start(forward(use_edns=0, payload=4096), "c", UP, fake_clock.now)
    assert isinstance(sent, Sent)
    retry = table.receive(upstream_answer(sent, tc=True), UP, fake_clock.now)
    assert isinstance(retry, RetryOverTcp)
    assert retry.wire == sent.wire
    assert retry.deadline == fake_clock.now + 5.0
    # over TCP the full answer comes, bigger than the client's 1232: it gets TC and retries
    big = upstream_answer(sent, n=100)
    assert len(big) > 1232
    out = table.receive(big, UP, fake_clock.now, via_tcp=True)
    assert isinstance(out, ToClient)
    cut = dns.message.from_wire(out.wire)
    assert cut.flags & dns.flags.TC
    assert not cut.answer


def test_tcp_client_gets_framed_answer(fake_clock: FakeClock) -> None:
    table: ForwardTable[str] = ForwardTable()
    sent = table.start(forward(transport=Transport.TCP), "c", UP, fake_clock.now)
    assert isinstance(sent, Sent)
    big = upstream_answer(sent, n=100)
    out = table.receive(big, UP, fake_clock.now, via_tcp=True)
    assert isinstance(out, ToClient)
    assert struct.unpack("!H", out.wire[:2])[0] == len(out.wire) - 2
    assert len(dns.message.from_wire(out.wire[2:]).answer[0]) == 100


def test_clear(fake_clock: FakeClock) -> None:
    table: ForwardTable[int] = ForwardTable()
    for i in range(4):
        table.start(forward(), i, UP, fake_clock.now)
    assert sorted(t.client for t in table.clear()) == [0, 1, 2, 3]
    assert len(table) == 0
    assert table.next_deadline() is None
