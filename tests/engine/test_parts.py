"""The engine's small parts: Candidate (pong history, learned expiry), TxTable (DISCO tx ids,
timeouts, late heartbeats, bounds), PunchSchedule (activity and pacing), Deadlines (heap)."""

from __future__ import annotations

import pytest

from agent.engine.candidates import Candidate, CandidateSource, PongResult
from agent.engine.disco_tx import PingPurpose, SentPing, TxTable
from agent.engine.paths import derp_endpoint
from agent.engine.schedule import Deadlines, PunchSchedule
from agent.engine.timings import (
    DEFAULT_TIMINGS,
    PONG_HISTORY_COUNT,
    SESSION_ACTIVE_TIMEOUT,
    Timings,
)
from agent.keys import NodePrivate

KEY = NodePrivate.generate().public()
OTHER = NodePrivate.generate().public()
EP = ("198.51.100.7", 41641)
EP2 = ("198.51.100.8", 41641)
DERP = derp_endpoint(1)
T = DEFAULT_TIMINGS


# -- Candidate ------------------------------------------------------------------------------------
def test_pong_history_is_a_bounded_ring() -> None:
    c = Candidate(EP, CandidateSource.CONFIG)
    assert c.latest_latency is None
    for i in range(PONG_HISTORY_COUNT + 10):
        c.record_pong(PongResult(float(i), i / 1000, EP2))
    assert len(c.pongs) == PONG_HISTORY_COUNT
    assert c.pongs[0].at == 10.0
    assert c.latest_latency == pytest.approx((PONG_HISTORY_COUNT + 9) / 1000)


def test_ping_due_after_the_interval() -> None:
    c = Candidate(EP, CandidateSource.CONFIG)
    assert c.ping_due(0.0, 5.0)
    c.last_ping = 100.0
    assert not c.ping_due(104.9, 5.0)
    assert c.ping_due(105.0, 5.0)


def test_learned_source_expires_others_stay() -> None:
    c = Candidate(EP, CandidateSource.LEARNED | CandidateSource.CALL_ME_MAYBE, learned_at=100.0)
    c.expire_learned(100.0 + SESSION_ACTIVE_TIMEOUT, SESSION_ACTIVE_TIMEOUT)
    assert CandidateSource.LEARNED in c.sources
    c.expire_learned(100.1 + SESSION_ACTIVE_TIMEOUT, SESSION_ACTIVE_TIMEOUT)
    assert c.sources == CandidateSource.CALL_ME_MAYBE
    assert c.alive
    c.sources = CandidateSource.NONE
    assert not c.alive


# -- TxTable --------------------------------------------------------------------------------------
def sent(tx: bytes, dest: tuple[str, int], at: float = 0.0, *, late: bool = False) -> SentPing:
    purpose = PingPurpose.HEARTBEAT if late else PingPurpose.DISCOVERY
    return SentPing(tx, KEY, dest, at, purpose, at + T.ping_timeout, at + 1.5 if late else None)


def test_single_destination_matches_whatever_the_way_back() -> None:
    table = TxTable()
    table.add(sent(b"a" * 12, EP))
    assert table.match(b"b" * 12, EP, KEY) is None  # unknown tx
    assert table.match(b"a" * 12, EP, OTHER) is None  # another peer's disco key
    got = table.match(b"a" * 12, EP2, KEY)
    assert got is not None
    assert got.dest == EP
    assert table.match(b"a" * 12, EP, KEY) is None  # answered once
    assert len(table) == 0


def test_shared_tx_is_matched_by_arrival() -> None:
    table = TxTable()
    tx = b"c" * 12
    for dest in (DERP, EP, EP2):
        table.add(sent(tx, dest))
    derp_hit = table.match(tx, derp_endpoint(1), KEY)
    assert derp_hit is not None
    assert derp_hit.via_derp
    assert table.match(tx, ("192.0.2.1", 1), KEY) is None  # from none of them
    udp_hit = table.match(tx, EP2, KEY)
    assert udp_hit is not None
    assert udp_hit.dest == EP2
    last = table.match(tx, ("192.0.2.1", 1), KEY)  # one left: matches (tailscaled semantics)
    assert last is not None
    assert last.dest == EP


def test_timeouts_and_late_heartbeats() -> None:
    table = TxTable()
    table.add(sent(b"h" * 12, EP, 10.0, late=True))
    table.add(sent(b"d" * 12, EP2, 11.0))
    assert table.next_deadline() == 11.5
    assert table.due(11.4) == ([], [])
    late, expired = table.due(11.5)
    assert [p.tx_id for p in late] == [b"h" * 12]
    assert expired == []
    assert table.next_deadline() == 15.0  # the late ping stays outstanding
    late, expired = table.due(16.0)
    assert late == []
    assert [p.tx_id for p in expired] == [b"h" * 12, b"d" * 12]
    assert table.next_deadline() is None


def test_answered_ping_neither_late_nor_expired() -> None:
    table = TxTable()
    table.add(sent(b"h" * 12, EP, 10.0, late=True))
    assert table.match(b"h" * 12, EP, KEY) is not None
    assert table.next_deadline() is None
    assert table.due(100.0) == ([], [])


def test_table_is_bounded_oldest_forgotten() -> None:
    table = TxTable(capacity=8)
    for i in range(20):
        table.add(sent(i.to_bytes(12, "big"), EP, float(i)))
    assert len(table) == 8
    assert table.match((0).to_bytes(12, "big"), EP, KEY) is None
    assert table.match((19).to_bytes(12, "big"), EP, KEY) is not None


def test_drop_peer() -> None:
    table = TxTable()
    table.add(sent(b"x" * 12, EP))
    table.drop_peer(KEY)
    assert len(table) == 0
    assert table.next_deadline() is None


# -- PunchSchedule --------------------------------------------------------------------------------
def test_heartbeat_runs_while_active_then_stops() -> None:
    s = PunchSchedule()
    assert not s.active(0.0, T)
    s.note_send(100.0, T)
    assert s.heartbeat_at == 100.0 + T.heartbeat_interval
    s.note_send(101.0, T)  # does not push the running heartbeat back
    assert s.heartbeat_at == 100.0 + T.heartbeat_interval
    assert not s.heartbeat_due(102.9)
    assert s.heartbeat_due(103.0)
    assert s.on_heartbeat(103.0, T)
    assert s.heartbeat_at == 106.0
    idle = 101.0 + T.session_active_timeout + 0.1
    assert not s.on_heartbeat(idle, T)
    assert s.heartbeat_at is None


def test_call_me_maybe_pacing() -> None:
    s = PunchSchedule()
    assert s.may_call_me_maybe(0.0, T)
    s.note_call_me_maybe(50.0)
    assert not s.may_call_me_maybe(54.9, T)
    assert s.may_call_me_maybe(55.0, T)
    assert not s.may_call_me_maybe(51.0, Timings(call_me_maybe_interval=2.0))


def test_heartbeat_late_after() -> None:
    assert T.heartbeat_late_after(None) == T.heartbeat_pong_deadline
    assert T.heartbeat_late_after(0.010) == T.heartbeat_pong_deadline
    assert T.heartbeat_late_after(1.0) == 3.0
    assert T.heartbeat_late_after(10.0) == T.ping_timeout


# -- Deadlines ------------------------------------------------------------------------------------
def test_deadlines_keep_one_per_key() -> None:
    d: Deadlines[str] = Deadlines()
    assert d.next() is None
    d.set("a", 5.0)
    d.set("b", 3.0)
    d.set("a", 2.0)  # re-armed earlier
    assert d.next() == 2.0
    d.set("b", None)
    assert d.due(4.0) == ["a"]
    assert d.next() is None
    d.set("c", 7.0)
    d.set("c", 9.0)  # re-armed later: the 7.0 entry is stale
    assert d.due(8.0) == []
    assert d.get("c") == 9.0
    assert d.due(9.0) == ["c"]


def test_many_rearms_fire_once_at_the_last_deadline() -> None:
    d: Deadlines[int] = Deadlines()
    for i in range(10_000):
        d.set(1, float(i))
    assert d.next() == 9999.0
    assert d.due(9998.0) == []
    assert d.due(9999.0) == [1]
    assert d.next() is None
