"""The birthday technique (engine/birthday.py) on the simulated internet (netsim.py), fake clock:
an easy NAT against a hard one goes direct through an extra socket and a guessed port, within
its bounds; nothing happens when the roles do not fit or it is off; sockets are given back."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from agent.engine.birthday import BirthdayLimits, public_v4
from agent.engine.discokeys import static_disco_private, static_disco_public
from agent.engine.engine import PathEngine
from agent.proto import disco
from tests.engine.netsim import Host, Pair, pair

LIMITS = BirthdayLimits()


def birthday_pair(
    hard: str = "symmetric",
    easy: str = "port_restricted",
    *,
    seed: int = 1,
    nat_a: bool | None = True,
    nat_b: bool | None = False,
    limits_a: BirthdayLimits = LIMITS,
    limits_b: BirthdayLimits = LIMITS,
) -> Pair:
    """a behind `hard`, b behind `easy`, each engine told what netcheck would say of its NAT."""
    p = pair(hard, easy, seed=seed)
    for host, limits in ((p.a, limits_a), (p.b, limits_b)):
        if limits is not LIMITS:
            _replace_engine(host, limits)
    p.a.add_peer(p.b)
    p.b.add_peer(p.a)
    p.a.engine.set_nat(nat_a, p.sim.now)
    p.b.engine.set_nat(nat_b, p.sim.now)
    return p


def _replace_engine(host: Host, limits: BirthdayLimits) -> None:
    host.engine = PathEngine(
        static_disco_private(host.private),
        host.key,
        1,
        birthday=limits,
        randbytes=host.net.rng.randbytes,
    )


def test_easy_against_hard_goes_direct_through_an_extra_socket() -> None:
    p = birthday_pair()
    t0 = p.sim.now
    p.start()
    t = p.sim.run_for(30, until=lambda: p.both("direct"))
    assert t is not None, (p.path(p.a, p.b), p.path(p.b, p.a), p.a.engine.stats)
    assert t - t0 < 10
    assert p.a.max_extra == LIMITS.sockets  # never more than one round's worth
    assert len(p.a.extra) == 1  # the others closed at once; one carries the path
    (sock,) = p.a.extra
    b_endpoint = p.a.engine.status(p.b.key, p.sim.now).endpoint
    assert b_endpoint is not None
    assert b_endpoint[0] == "198.51.100.2"
    assert p.a.engine.socket_for(b_endpoint) == sock
    a_endpoint = p.b.engine.status(p.a.key, p.sim.now).endpoint
    assert a_endpoint is not None
    assert a_endpoint[0] == "198.51.100.1"
    assert a_endpoint[1] == p.a.nat.outbound((p.a.ip, p.a.extra[sock]), b_endpoint)[1]  # type: ignore[union-attr]
    p.sim.run_for(20)  # data keeps flowing directly both ways on heartbeats
    assert p.both("direct")
    assert p.a.rx[p.b.key][-1].path == "udp"
    assert p.b.rx[p.a.key][-1].path == "udp"
    assert p.a.engine.stats.birthday_rounds == 1
    assert p.b.engine.stats.birthday_probe_rounds == 1
    assert p.a.engine.stats.birthday_hits + p.b.engine.stats.birthday_hits >= 1
    assert p.b.engine.stats.birthday_pings <= LIMITS.probes
    assert p.a.engine.stats.received["nat_info"] >= 1


@pytest.mark.parametrize("seed", range(1, 11))
def test_it_works_for_many_seeds_and_either_side_starting(seed: int) -> None:
    p = birthday_pair(seed=seed) if seed % 2 else _swapped(seed)
    p.start()
    assert p.sim.run_for(60, until=lambda: p.both("direct")) is not None


def _swapped(seed: int) -> Pair:
    """a easy, b hard."""
    return birthday_pair("port_restricted", "symmetric", seed=seed, nat_a=False, nat_b=True)


def test_only_the_easy_side_sending_still_asks_the_hard_side() -> None:
    p = birthday_pair()
    p.a.stun()
    p.b.stun()

    def tick() -> None:
        p.b.send_data(p.a)  # b is easy; a never sends
        p.sim.after(0.1, tick)

    p.sim.after(0.1, tick)
    assert p.sim.run_for(30, until=lambda: p.path(p.b, p.a) == "direct") is not None
    assert p.a.engine.stats.birthday_rounds == 1


@pytest.mark.parametrize(
    ("nat_a", "nat_b"),
    [(True, True), (False, False), (None, False), (True, None), (None, None)],
)
def test_no_round_unless_one_side_is_hard_and_the_other_easy(
    nat_a: bool | None, nat_b: bool | None
) -> None:
    p = birthday_pair(nat_a=nat_a, nat_b=nat_b)
    p.start()
    assert p.sim.run_for(30, until=lambda: p.path(p.a, p.b) == "direct") is None
    for host in (p.a, p.b):
        assert host.max_extra == 0
        assert host.engine.stats.birthday_pings == 0


@pytest.mark.parametrize("off", ["a", "b"])
def test_off_on_either_side_means_no_round(off: str) -> None:
    disabled = dataclasses.replace(LIMITS, enabled=False)
    p = birthday_pair(
        limits_a=disabled if off == "a" else LIMITS, limits_b=disabled if off == "b" else LIMITS
    )
    p.start()
    assert p.sim.run_for(30, until=lambda: p.path(p.a, p.b) == "direct") is None
    assert p.a.max_extra == 0
    assert p.b.engine.stats.birthday_pings == 0
    off_host = p.a if off == "a" else p.b
    assert off_host.engine.stats.sent["nat_info"] == 0  # an off side says nothing of its NAT


def test_rates_are_bounded() -> None:
    """Per 100 ms window: at most one tick's batch over the rate, on both sides."""
    p = birthday_pair()
    samples: list[tuple[float, int, int]] = []

    def sample() -> None:
        samples.append(
            (p.sim.now, p.a.engine.stats.birthday_pings, p.b.engine.stats.birthday_pings)
        )
        p.sim.after(0.1, sample)

    sample()
    p.start()
    p.sim.run_for(30)
    for (_, a0, b0), (_, a1, b1) in itertools.pairwise(samples):
        assert a1 - a0 <= LIMITS.spray_rate * 0.1 + LIMITS.spray_rate * LIMITS.tick + 1
        assert b1 - b0 <= LIMITS.probe_rate * 0.1 + LIMITS.probe_rate * LIMITS.tick + 1


def test_a_miss_backs_off_and_gives_the_sockets_back() -> None:
    few = dataclasses.replace(LIMITS, probes=1)  # the easy side guesses once: a miss
    p = birthday_pair(limits_b=few)
    p.start()
    p.sim.run_for(10)
    assert p.a.engine.stats.birthday_rounds == 1
    assert p.a.engine.stats.birthday_misses == 1
    assert p.a.extra == {}
    p.sim.run_for(20)  # 30 s after the miss: the second round
    assert p.a.engine.stats.birthday_rounds == 1
    p.sim.run_for(10)
    assert p.a.engine.stats.birthday_rounds == 2
    p.sim.run_for(50)  # then 60 s
    assert p.a.engine.stats.birthday_rounds == 2
    p.sim.run_for(15)
    assert p.a.engine.stats.birthday_rounds == 3
    assert p.b.engine.stats.birthday_pings == 3
    assert p.path(p.a, p.b) == "derp"


def test_an_idle_path_gives_its_socket_back() -> None:
    p = birthday_pair()
    p.start()
    assert p.sim.run_for(30, until=lambda: p.both("direct")) is not None
    assert len(p.a.extra) == 1
    p.flow.stop()
    p.sim.run_for(LIMITS.release_after + 60)  # idle: heartbeats stop, trust lapses, released
    assert p.a.extra == {}
    assert p.a.engine.extra_sockets() == frozenset()
    p.flow.start()  # traffic again: a new round finds a new path
    assert p.sim.run_for(30, until=lambda: p.both("direct")) is not None
    assert p.a.engine.stats.birthday_rounds == 2


def test_removing_the_peer_closes_its_sockets() -> None:
    p = birthday_pair()
    p.start()
    p.sim.run_for(1.5)  # a's round is spraying or listening
    assert len(p.a.extra) == LIMITS.sockets
    p.a.engine.remove_peer(p.b.key)
    p.a.pump()
    assert p.a.extra == {}


def test_our_nat_turning_easy_ends_a_hard_round() -> None:
    p = birthday_pair()
    p.start()
    p.sim.run_for(1.5)
    assert len(p.a.extra) == LIMITS.sockets
    p.a.engine.set_nat(False, p.sim.now)  # a port mapping came up, say
    p.a.pump()
    assert p.a.extra == {}


def test_nat_info_over_udp_is_dropped() -> None:
    p = birthday_pair()
    p.start()
    p.sim.run_for(0.05)
    packet = disco.seal(
        static_disco_private(p.a.private).raw,
        static_disco_public(p.b.key).raw,
        disco.NatInfo(hard=True, probe=True),
        bytes(24),
    )
    drops = sum(p.b.engine.stats.drops.values())
    p.b.engine.receive_disco(packet, ("198.51.100.1", 5000), p.sim.now)
    assert sum(p.b.engine.stats.drops.values()) == drops + 1
    assert p.b.engine.stats.birthday_probe_rounds == 0


@pytest.mark.parametrize(
    ("ip", "public"),
    [
        ("198.51.100.7", True),
        ("198.18.1.1", True),  # the labs' "public" underlay
        ("10.1.2.3", False),
        ("192.168.1.1", False),
        ("172.20.0.1", False),
        ("100.64.0.1", False),
        ("127.0.0.1", False),
        ("169.254.1.1", False),
        ("2001:db8::1", False),
        ("not an ip", False),
    ],
)
def test_public_v4(ip: str, public: bool) -> None:
    assert public_v4(ip) is public


def test_no_public_endpoint_of_the_peer_means_no_round() -> None:
    """Without an advertised public address (b's STUN answers lost), nothing to aim at."""
    p = birthday_pair()
    p.b.stun = lambda: None  # type: ignore[method-assign]
    p.b.engine.set_local_endpoints([p.b.local], p.sim.now)
    p.start()
    assert p.sim.run_for(10, until=lambda: p.path(p.a, p.b) == "direct") is None
    assert p.a.max_extra == 0
    assert p.a.engine.stats.birthday_rounds == 0
