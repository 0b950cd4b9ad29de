"""The log limiter: once per flow per interval, bounded, and honest when full."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from agent.policy.flows import Flow, LogLimiter


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
