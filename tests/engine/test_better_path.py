"""better_path(): tailscaled's betterAddr rules (derp-disco.md §8.6), as a table of cases."""

from __future__ import annotations

import pytest

from agent.engine.candidates import AddrLatency, better_path, path_points

PUB = ("198.51.100.7", 41641)
PUB2 = ("203.0.113.9", 41641)
LAN = ("192.168.1.5", 41641)
LAN10 = ("10.0.0.5", 41641)
LOOP = ("127.0.0.1", 41641)
LINK = ("169.254.3.4", 41641)
V6 = ("2001:db8::7", 41641)
LAB = ("198.18.0.2", 41641)  # benchmark range: "public" to Go's IsPrivate, so no bonus
MS = 0.001


def a(ep: tuple[str, int], ms: float) -> AddrLatency:
    return AddrLatency(ep, ms * MS)


@pytest.mark.parametrize(
    ("new", "cur", "better"),
    [
        (a(PUB, 10), None, True),  # anything beats nothing
        (a(PUB, 10), a(PUB, 50), False),  # same address: only MTU could win
        (a(PUB2, 10), a(PUB, 20), True),  # 50 % faster
        (a(PUB2, 20), a(PUB, 10), False),  # slower
        (a(PUB2, 10), a(PUB, 10), False),  # equal: keep the current one
        (a(PUB2, 9.95), a(PUB, 10), False),  # 0.5 % faster: 1 point after rounding, keep
        (a(PUB2, 9.85), a(PUB, 10), True),  # 1.5 % faster: 2 points > 0 wins
        (a(PUB2, 9.9), a(PUB, 10), False),  # 1 point against 0: hysteresis keeps the current
        (a(LAN, 12), a(PUB, 10), True),  # private +20 beats 17 % slower
        (a(LAN, 20), a(PUB, 10), False),  # but not 50 % slower
        (a(PUB, 10), a(LAN, 11), False),  # 9 % faster does not beat the LAN bonus
        (a(LOOP, 10), a(LAN, 10), True),  # loopback +50 beats private +20
        (a(LINK, 10), a(LAN, 10), True),  # link-local +30 beats private +20
        (a(V6, 10), a(PUB, 10), True),  # IPv6 +10
        (a(LAB, 10), a(PUB, 10), False),  # 198.18/15 gets no private bonus
        (a(LAN10, 10), a(LAN, 10), False),  # both private: equal
    ],
)
def test_better_path(new: AddrLatency, cur: AddrLatency | None, better: bool) -> None:
    assert better_path(new, cur) is better


def test_none_never_wins() -> None:
    assert better_path(None, a(PUB, 10)) is False
    assert better_path(None, None) is False


def test_points_are_integer_percentages() -> None:
    assert path_points(a(PUB2, 10), a(PUB, 20)) == (50, 0)
    assert path_points(a(PUB2, 30), a(PUB, 10)) == (0, 67)
    assert path_points(a(LAN, 10), a(PUB, 10)) == (20, 0)
    assert path_points(AddrLatency(PUB2, 0.0), AddrLatency(PUB, 0.0)) == (0, 0)
