"""StunProber: rounds of Binding Requests, answers matched by transaction ID."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from agent.engine.stun_probe import FIRST_RETRY, REQUEST_TIMEOUT, ROUND_INTERVAL, StunProber
from agent.engine.stun_probe import StunServer as S
from agent.proto import stun

S1 = S(900, ("198.18.0.10", 3478))
S2 = S(901, ("198.18.0.11", 3478))


def answer(request: bytes, mapped: tuple[str, int]) -> bytes:
    txid = stun.parse_binding_request(request)
    return stun.binding_response(txid, mapped)


def test_a_round_asks_every_server_and_learns_the_mapping(
    seeded_randbytes: Callable[[int], bytes],
) -> None:
    p = StunProber([S1, S2], randbytes=seeded_randbytes)
    out = p.start(10.0)
    assert [dst for _, dst in out] == [S1.endpoint, S2.endpoint]
    assert p.receive(answer(out[0][0], ("203.0.113.7", 40000)), S1.endpoint, 10.02)
    assert p.changed
    assert p.public_endpoints() == [("203.0.113.7", 40000)]
    assert p.mapping_varies() is None  # one answer only
    assert p.receive(answer(out[1][0], ("203.0.113.7", 40000)), S2.endpoint, 10.05)
    assert p.mapping_varies() is False
    assert p.latency(900) is not None
    assert abs(p.latency(900) - 0.02) < 1e-9  # type: ignore[operator]
    assert p.answered == 2


def test_different_ports_per_server_mean_the_mapping_varies(
    seeded_randbytes: Callable[[int], bytes],
) -> None:
    p = StunProber([S1, S2], randbytes=seeded_randbytes)
    out = p.start(0.0)
    p.receive(answer(out[0][0], ("203.0.113.7", 40000)), S1.endpoint, 0.1)
    p.receive(answer(out[1][0], ("203.0.113.7", 40001)), S2.endpoint, 0.1)
    assert p.mapping_varies() is True
    assert p.public_endpoints() == [("203.0.113.7", 40000), ("203.0.113.7", 40001)]


def test_unknown_late_and_foreign_datagrams(seeded_randbytes: Callable[[int], bytes]) -> None:
    p = StunProber([S1], randbytes=seeded_randbytes)
    ((req, _),) = p.start(0.0)
    assert not p.receive(b"\x04\x00\x00\x00" + bytes(28), S1.endpoint, 0.1)  # WireGuard
    stranger = stun.binding_response(b"x" * 12, ("198.18.0.1", 1))
    assert p.receive(stranger, S1.endpoint, 0.1)  # STUN, but not ours: claimed, ignored
    assert p.ignored == 1
    p.on_timer(REQUEST_TIMEOUT)  # the request expires
    assert p.receive(answer(req, ("198.18.0.1", 1)), S1.endpoint, REQUEST_TIMEOUT + 0.1)
    assert p.public_endpoints() == []
    assert p.ignored == 2


def test_rounds_repeat_sooner_until_an_answer_then_every_20_to_26_s(
    seeded_randbytes: Callable[[int], bytes],
) -> None:
    p = StunProber([S1], randbytes=seeded_randbytes)
    p.start(0.0)
    assert p.next_deadline() == FIRST_RETRY
    assert p.on_timer(FIRST_RETRY - 0.01) == []
    ((req, _),) = p.on_timer(FIRST_RETRY)
    p.receive(answer(req, ("198.18.0.1", 1)), S1.endpoint, FIRST_RETRY + 0.01)
    p.on_timer(2 * FIRST_RETRY)  # the round that was already scheduled
    deadline = p.next_deadline()
    assert deadline is not None
    assert 2 * FIRST_RETRY + ROUND_INTERVAL[0] <= deadline <= 2 * FIRST_RETRY + ROUND_INTERVAL[1]


def test_no_servers_no_traffic() -> None:
    p = StunProber([])
    assert p.start(0.0) == []
    assert p.next_deadline() is None


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    p = StunProber([S1])
    p.start(0.0)
    p.receive(data, S1.endpoint, 0.1)
