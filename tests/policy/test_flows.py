"""The flow table (idle expiry, least recently used out) and the log limiter (once per flow
per interval, bounded, honest when full)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from agent.policy.flows import Flow, FlowTable, LogLimiter


def flow(port: int) -> Flow:
    return Flow(6, ip_address("100.64.0.2"), port, ip_address("100.64.0.1"), 22)


def test_once_per_interval() -> None:
    limiter = LogLimiter(interval=60.0)
    assert limiter.should_log(flow(1), 0.0)
    assert not limiter.should_log(flow(1), 59.0)
    assert limiter.should_log(flow(2), 59.0)
    assert limiter.should_log(flow(1), 60.0)
    assert not limiter.should_log(flow(1), 100.0)


def test_full_limiter_declines_rather_than_forgetting_recent_flows() -> None:
    limiter = LogLimiter(interval=60.0, capacity=3)
    for port in range(3):
        assert limiter.should_log(flow(port), 0.0)
    assert not limiter.should_log(flow(99), 10.0)  # full of recent flows
    assert not limiter.should_log(flow(0), 10.0)  # and flow 0 is still remembered
    assert limiter.should_log(flow(99), 60.0)  # the old ones expire to make room
    assert len(limiter) <= 3


def test_bad_limits() -> None:
    with pytest.raises(ValueError, match="positive"):
        LogLimiter(interval=0)


# -- the flow table ------------------------------------------------------------------------

KEY = (17, b"\x64\x40\x00\x01\x64\x40\x00\x02\x9c\x40\x00\x35")


def key(port: int) -> tuple[int, bytes]:
    return (17, KEY[1][:8] + port.to_bytes(2) + b"\x00\x35")


def test_a_flow_lives_while_used_and_goes_when_idle() -> None:
    table = FlowTable(idle=120.0, capacity=8)
    assert table.touch(KEY, 0.0)  # new
    assert table.alive(KEY, 120.0)
    assert not table.alive(KEY, 120.5)
    assert not table.touch(KEY, 100.0)  # used again: not new, and open until 220
    assert table.alive(KEY, 220.0)
    assert not table.alive(KEY, 220.5)
    assert table.touch(KEY, 300.0)  # expired then used: a new flow again


def test_expire_forgets_idle_flows_in_order() -> None:
    table = FlowTable(idle=10.0, capacity=8)
    for port in range(5):
        table.touch(key(port), float(port))
    table.touch(key(0), 6.0)  # used again: now the newest
    assert table.expire(12.5) == 2  # ports 1 and 2 (idle since 1 and 2)
    assert list(table.deadlines) == [key(3), key(4), key(0)]
    assert table.expire(12.5) == 0
    assert table.expire(100.0) == 3
    assert len(table) == 0


def test_a_full_table_drops_the_least_recently_used() -> None:
    table = FlowTable(idle=60.0, capacity=3)
    for port in range(3):
        table.touch(key(port), 0.0)
    table.touch(key(0), 1.0)  # in use
    table.touch(key(9), 2.0)  # one too many: port 1 (least recently used) goes
    assert len(table) == 3
    assert table.alive(key(0), 2.0)
    assert not table.alive(key(1), 2.0)


def test_bad_table_limits() -> None:
    with pytest.raises(ValueError, match="positive"):
        FlowTable(idle=0.0, capacity=1)
