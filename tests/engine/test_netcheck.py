"""agent.engine.netcheck: probe plans, building a report from STUN answers, the home region."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest

from agent.engine.netcheck import (
    ABSOLUTE_DIFF,
    HISTORY_MAX_AGE,
    REPORT_INTERVAL,
    Family,
    HomeRegion,
    Netchecker,
    NetcheckRun,
    NetcheckTimings,
    Probe,
    RegionTargets,
    Report,
    StunTarget,
    make_probe_plan,
)
from agent.proto import stun
from tests.conftest import FakeClock

T = NetcheckTimings()
R1 = RegionTargets(1, (StunTarget(v4=("192.0.2.1", 3478)),))
R2 = RegionTargets(
    2,
    (
        StunTarget(v4=("192.0.2.2", 3478), v6=("2001:db8::2", 3478)),
        StunTarget(v4=("192.0.2.22", 3478)),
    ),
)
R3 = RegionTargets(3, ())  # a DERP node without STUN: HTTPS only
ME = ("203.0.113.7", 41641)


def _report(latency: Mapping[int, float], *, ipv6: bool = False) -> Report:
    return Report(
        udp=bool(latency),
        ipv4=bool(latency),
        ipv6=ipv6,
        ipv6_os=ipv6,
        global_v4=None,
        global_v6=None,
        endpoints=(),
        mapping_varies_by_dest_ip=None,
        region_latency=dict(latency),
        region_v4_latency=dict(latency),
        region_v6_latency={},
        https_regions=frozenset(),
        full=True,
        started=0.0,
        duration=0.0,
    )


def _answer(req: bytes, mapped: tuple[str, int]) -> bytes:
    return stun.binding_response(stun.parse_binding_request(req), mapped)


# -- probe plans -----------------------------------------------------------------------------------


def test_full_plan_three_tries_per_family_rotating_nodes() -> None:
    plan = make_probe_plan([R1, R2, R3], have_v4=True, have_v6=True)
    assert set(plan) == {(1, Family.V4), (2, Family.V4), (2, Family.V6)}  # R3 has no STUN
    assert plan[(1, Family.V4)] == tuple(
        Probe(1, Family.V4, ("192.0.2.1", 3478), d) for d in (0.0, 0.1, 0.2)
    )
    assert [p.endpoint[0] for p in plan[(2, Family.V4)]] == ["192.0.2.2", "192.0.2.22", "192.0.2.2"]
    assert [p.endpoint[0] for p in plan[(2, Family.V6)]] == ["2001:db8::2"] * 3


def test_full_plan_without_ipv6_on_the_host() -> None:
    plan = make_probe_plan([R1, R2], have_v4=True, have_v6=False)
    assert set(plan) == {(1, Family.V4), (2, Family.V4)}


def test_incremental_plan_fastest_three_and_the_home() -> None:
    regions = [RegionTargets(i, (StunTarget(v4=(f"192.0.2.{i}", 3478)),)) for i in range(1, 7)]
    last = _report({1: 0.050, 2: 0.010, 3: 0.030, 4: 0.020, 5: 0.100})  # 6: never answered
    plan = make_probe_plan(regions, last=last, preferred=5)
    assert {r for r, _f in plan} == {2, 4, 3, 5}
    tries = {r: len(p) for (r, _f), p in plan.items()}
    assert tries == {2: 2, 4: 2, 3: 1, 5: 4}
    # try i waits i x 1.2 x last latency, plus i x 50 ms after the second try
    home = [p.delay for p in plan[(5, Family.V4)]]
    assert home == pytest.approx([0.0, 0.12, 0.24 + 0.1, 0.36 + 0.15])
    assert [p.delay for p in plan[(2, Family.V4)]] == pytest.approx([0.0, 0.012])


def test_incremental_plan_unknown_latency_uses_the_active_retransmit() -> None:
    last = _report({1: 0.010})
    plan = make_probe_plan([R1, R2], last=last, preferred=None)
    assert [p.delay for p in plan[(2, Family.V4)]] == pytest.approx([0.0, T.active_retransmit])


def test_incremental_plan_ipv6_only_if_it_worked_and_alternates_families() -> None:
    regions = [
        RegionTargets(i, (StunTarget(v4=(f"192.0.2.{i}", 3478), v6=(f"2001:db8::{i}", 3478)),))
        for i in range(1, 5)
    ]
    lat = {1: 0.01, 2: 0.02, 3: 0.03, 4: 0.04}
    no6 = make_probe_plan(regions, last=_report(lat), have_v6=True)
    assert {f for _r, f in no6} == {Family.V4}
    plan = make_probe_plan(regions, last=_report(lat, ipv6=True), have_v6=True)
    assert set(plan) == {
        (1, Family.V4),
        (1, Family.V6),
        (2, Family.V4),
        (2, Family.V6),
        (3, Family.V4),  # the 3rd region (index 2): IPv4 only
    }


# -- one run ---------------------------------------------------------------------------------------


def _run(
    regions: list[RegionTargets],
    clock: FakeClock,
    randbytes: Callable[[int], bytes],
    have_v6: bool = False,
) -> NetcheckRun:
    plan = make_probe_plan(regions, have_v6=have_v6)
    return NetcheckRun(plan, regions, clock.now, full=True, ipv6_os=have_v6, randbytes=randbytes)


def test_run_measures_latency_and_public_endpoint(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    run = _run([R1, R2], fake_clock, seeded_randbytes)
    out = run.on_timer(fake_clock.now)
    assert [ep for _d, ep in out] == [("192.0.2.1", 3478), ("192.0.2.2", 3478)]
    assert all(stun.is_stun(d) for d, _ep in out)
    assert run.next_deadline() == pytest.approx(fake_clock.now + 0.1)
    fake_clock.advance(0.010)
    assert run.receive(_answer(out[0][0], ME), out[0][1], fake_clock.now)
    assert not run.stun_done(fake_clock.now)
    fake_clock.advance(0.020)
    assert run.receive(_answer(out[1][0], ME), out[1][1], fake_clock.now)
    assert run.stun_done(fake_clock.now)  # every probe set answered
    assert run.on_timer(fake_clock.advance(0.2)) == []  # the later tries are not sent
    assert run.https_wanted() == []
    rep = run.report(fake_clock.now)
    assert rep.udp
    assert rep.ipv4
    assert not rep.ipv6
    assert rep.region_latency == pytest.approx({1: 0.010, 2: 0.030})
    assert rep.region_v4_latency == rep.region_latency
    assert rep.global_v4 == ME
    assert rep.endpoints == (ME,)
    assert rep.mapping_varies_by_dest_ip is False
    assert rep.nearest_region == 1
    assert rep.preferred_region is None  # decided by Netchecker.finish
    assert rep.duration == pytest.approx(0.23)


def test_run_mapping_varies_when_two_servers_see_different_ports(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    run = _run([R1, R2], fake_clock, seeded_randbytes)
    out = run.on_timer(fake_clock.now)
    run.receive(_answer(out[0][0], ME), out[0][1], fake_clock.advance(0.01))
    run.receive(_answer(out[1][0], (ME[0], 50000)), out[1][1], fake_clock.advance(0.01))
    rep = run.report(fake_clock.now)
    assert rep.mapping_varies_by_dest_ip is True
    assert rep.global_v4 == ME  # the first one seen
    assert rep.endpoints == (ME, (ME[0], 50000))


def test_run_one_server_cannot_tell_whether_mapping_varies(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    run = _run([R1], fake_clock, seeded_randbytes)
    (req, ep), *_ = run.on_timer(fake_clock.now)
    run.receive(_answer(req, ME), ep, fake_clock.advance(0.01))
    assert run.report(fake_clock.now).mapping_varies_by_dest_ip is None


def test_run_retries_until_an_answer_and_keeps_the_best(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    run = _run([R2], fake_clock, seeded_randbytes)
    first = run.on_timer(fake_clock.now)
    second = run.on_timer(fake_clock.advance(0.1))
    assert [ep for _d, ep in second] == [("192.0.2.22", 3478)]  # the next node of the region
    run.receive(_answer(second[0][0], ME), second[0][1], fake_clock.advance(0.005))
    run.receive(_answer(first[0][0], ME), first[0][1], fake_clock.advance(0.001))  # late
    assert run.report(fake_clock.now).region_latency == pytest.approx({2: 0.005})


def test_run_ignores_foreign_and_non_stun_datagrams(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    run = _run([R1], fake_clock, seeded_randbytes)
    run.on_timer(fake_clock.now)
    other = stun.binding_response(b"\x01" * 12, ME)
    assert not run.receive(other, ("192.0.2.1", 3478), fake_clock.now)
    assert not run.receive(b"\x04\x00\x00\x00" + bytes(28), ("192.0.2.1", 3478), fake_clock.now)
    assert not run.receive(stun.binding_request(b"\x02" * 12), ("192.0.2.1", 3478), 0.0)
    assert not run.report(fake_clock.now).udp


def test_run_udp_blocked_times_out_then_https(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    start = fake_clock.now
    run = _run([R1, R2, R3], fake_clock, seeded_randbytes)
    sent = 0
    while not run.stun_done(fake_clock.now):
        sent += len(run.on_timer(fake_clock.now))
        deadline = run.next_deadline()
        assert deadline is not None
        fake_clock.now = deadline
    assert sent == 6  # 3 tries x 2 regions with STUN
    assert fake_clock.now == pytest.approx(start + T.stun_timeout)
    assert run.next_deadline() is None
    assert run.https_wanted() == [1, 2, 3]
    run.add_https_latency(2, 0.040)
    run.add_https_latency(3, 0.025)
    rep = run.report(fake_clock.now)
    assert not rep.udp
    assert rep.region_latency == {2: 0.040, 3: 0.025}
    assert rep.region_v4_latency == {}
    assert rep.https_regions == {2, 3}
    assert rep.nearest_region == 3


def test_run_https_only_for_regions_stun_missed(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    run = _run([R1, R3], fake_clock, seeded_randbytes)
    (req, ep), *_ = run.on_timer(fake_clock.now)
    run.receive(_answer(req, ME), ep, fake_clock.advance(0.002))
    assert run.stun_done(fake_clock.now)
    assert run.https_wanted() == [3]


def test_run_stop_timer_after_enough_regions(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    regions = [RegionTargets(i, (StunTarget(v4=(f"192.0.2.{i}", 3478)),)) for i in range(1, 5)]
    run = _run(regions, fake_clock, seeded_randbytes)
    out = run.on_timer(fake_clock.now)
    assert len(out) == 4
    for (req, ep), dt in zip(out[:3], (0.004, 0.002, 0.004), strict=True):
        run.receive(_answer(req, ep), ep, fake_clock.advance(dt))
    # three regions answered; the slowest took 10 ms, so stop 2 x 10 ms later (full report)
    assert run.next_deadline() == pytest.approx(fake_clock.now + 0.020)
    assert not run.stun_done(fake_clock.advance(0.019))
    assert run.stun_done(fake_clock.advance(0.002))
    assert run.https_wanted() == [4]


def test_run_ipv6_answer(fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]) -> None:
    run = _run([R2], fake_clock, seeded_randbytes, have_v6=True)
    out = {ep: d for d, ep in run.on_timer(fake_clock.now)}
    v6 = ("2001:db8::2", 3478)
    me6 = ("2001:db8:1::7", 41641)
    run.receive(_answer(out[v6], me6), v6, fake_clock.advance(0.003))
    run.receive(
        _answer(out[("192.0.2.2", 3478)], ME), ("192.0.2.2", 3478), fake_clock.advance(1e-3)
    )
    rep = run.report(fake_clock.now)
    assert rep.ipv6
    assert rep.ipv4
    assert rep.ipv6_os
    assert rep.global_v6 == me6
    assert rep.region_v6_latency == pytest.approx({2: 0.003})
    assert rep.region_latency == pytest.approx({2: 0.003})
    assert rep.to_dict()["global_v6"] == "[2001:db8:1::7]:41641"


# -- home region -----------------------------------------------------------------------------------


@dataclass
class Step:
    latency: dict[int, float]  # milliseconds
    expect: int | None
    after: float = 25.0  # seconds since the previous step
    heard: dict[int, float] = field(default_factory=dict)  # region -> seconds ago


CASES: dict[str, list[Step]] = {
    "first report picks the lowest": [Step({1: 30, 2: 12, 3: 50}, 2)],
    "near-equal regions do not flap": [
        Step({1: 20, 2: 22}, 1),
        Step({1: 22, 2: 20}, 1),
        Step({1: 21, 2: 19}, 1),
        Step({1: 24, 2: 18}, 1),
        Step({1: 20, 2: 22}, 1),
    ],
    "5 ms slower is below the absolute threshold": [Step({1: 4, 2: 5}, 1), Step({1: 9, 2: 5}, 1)],
    "50 ms better out of 300 is within a third": [
        Step({1: 300, 2: 320}, 1),
        Step({1: 300, 2: 250}, 1),
    ],
    "home clearly slow in 3 reports in a row: switch": [
        Step({1: 20, 2: 25}, 1),
        Step({1: 90, 2: 25}, 1),  # its best of the recent reports is still 20 ms
        Step({1: 90, 2: 25}, 1),
        Step({1: 90, 2: 25}, 2),
    ],
    "home stops answering: switch": [Step({1: 20, 2: 25}, 1), Step({2: 25}, 2)],
    "home silent on STUN but DERP frames recent: keep": [
        Step({1: 20, 2: 25}, 1),
        Step({2: 5}, 1, heard={1: 3.0}),
    ],
    "home silent and DERP frames stale: switch": [
        Step({1: 20, 2: 25}, 1),
        Step({2: 5}, 2, heard={1: 30.0}),
    ],
    "nothing answers: keep the home": [Step({1: 20, 2: 25}, 1), Step({}, 1), Step({}, 1)],
    "a blip is smoothed by the recent best": [
        Step({1: 10, 2: 30}, 1),
        Step({1: 40, 2: 30}, 1),  # 1's best of the last 5 min is still 10 ms
    ],
    "the recent best expires": [
        Step({1: 10, 2: 30}, 1),
        Step({1: 80, 2: 30}, 1, after=60),  # 1's history still wins
        Step({1: 80, 2: 30}, 2, after=HISTORY_MAX_AGE),  # only slow samples remain
    ],
    "a region that answers rarely keeps its best": [
        Step({1: 30, 2: 10}, 2),
        Step({1: 30}, 1),  # 2 silent: switch
        Step({1: 30, 2: 60}, 1),  # 2's recent best is 10 ms, but now it is slower than 1
        Step({1: 30, 2: 60}, 1),
    ],
    "a region that recovers wins back only when clearly better": [
        Step({1: 50, 2: 30}, 2),
        Step({1: 25, 2: 30}, 2),
        Step({1: 5, 2: 30}, 1),
    ],
}


@pytest.mark.parametrize("steps", CASES.values(), ids=CASES.keys())
def test_home_region_hysteresis(steps: list[Step]) -> None:
    home = HomeRegion()
    now = 1000.0
    for i, step in enumerate(steps):
        now += step.after
        lat = {r: ms / 1000 for r, ms in step.latency.items()}
        heard = {r: now - ago for r, ago in step.heard.items()}
        got = home.update(lat, now, derp_heard=heard, started=now - 1.0)
        assert got == step.expect, f"step {i}: {step}"
        assert home.current == step.expect


def test_home_region_frame_since_the_run_began_keeps_it() -> None:
    home = HomeRegion()
    home.update({1: 0.020, 2: 0.025}, 100.0)
    # heard 20 s ago (outside DERP_FRAME_TIME) but after the run started 30 s ago
    assert home.update({2: 0.005}, 200.0, derp_heard={1: 180.0}, started=170.0) == 1


def test_home_region_pinned_always_wins() -> None:
    home = HomeRegion(pinned=3)
    assert home.current == 3
    assert home.update({1: 0.001, 2: 0.002}, 10.0) == 3
    assert home.update({}, 40.0) == 3


def test_home_region_scores_scale_latency() -> None:
    home = HomeRegion(scores={2: 2.0})
    assert home.update({1: 0.030, 2: 0.020}, 10.0) == 1  # region 2 counts as 40 ms
    assert home.best_recent(10.0) == pytest.approx({1: 0.030, 2: 0.040})


def test_home_region_threshold_edges() -> None:
    home = HomeRegion()
    home.update({1: 0.100}, 0.0)
    # 1/3 better but under 10 ms absolute: kept
    assert home.update({1: 0.015, 2: 0.015 - ABSOLUTE_DIFF + 0.001}, 25.0) == 1
    home = HomeRegion()
    home.update({1: 0.100}, 0.0)
    assert home.update({1: 0.030, 2: 0.0199}, 25.0) == 2  # 10.1 ms and > 1/3 better


# -- Netchecker ------------------------------------------------------------------------------------


def _finish_with(
    nc: Netchecker, run: NetcheckRun, clock: FakeClock, latency_ms: Mapping[int, float]
) -> Report:
    out = run.on_timer(clock.now)
    start = clock.now
    by_region: dict[int, tuple[bytes, tuple[str, int]]] = {}
    for req, ep in out:
        region = next(r.id for r in (R1, R2) if any(t.v4 == ep for t in r.stun))
        by_region.setdefault(region, (req, ep))
    for region, ms in sorted(latency_ms.items(), key=lambda kv: kv[1]):
        req, ep = by_region[region]
        clock.now = start + ms / 1000
        assert run.receive(_answer(req, ME), ep, clock.now)
    return nc.finish(run, clock.now)


def test_netchecker_full_then_incremental_and_home(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    nc = Netchecker(randbytes=seeded_randbytes)
    run = nc.new_run([R1, R2], fake_clock.now)
    assert run.full
    rep = _finish_with(nc, run, fake_clock, {1: 30, 2: 10})
    assert rep.preferred_region == 2
    assert not rep.pinned
    assert nc.last is rep
    assert nc.home.current == 2

    fake_clock.advance(25)
    run = nc.new_run([R1, R2], fake_clock.now)
    assert not run.full
    rep = _finish_with(nc, run, fake_clock, {1: 8, 2: 11})
    assert rep.preferred_region == 2  # 3 ms better is no reason to move

    fake_clock.advance(T.full_interval)
    assert nc.new_run([R1, R2], fake_clock.now).full  # the last full one is 5 min old
    nc.finish(nc.new_run([R1, R2], fake_clock.now, full=True), fake_clock.now)
    fake_clock.advance(25)
    assert not nc.new_run([R1, R2], fake_clock.now).full
    assert nc.new_run([R1], fake_clock.now).full  # the region list changed


def test_netchecker_pinned_home_is_reported(
    fake_clock: FakeClock, seeded_randbytes: Callable[[int], bytes]
) -> None:
    nc = Netchecker(pinned_home=1, randbytes=seeded_randbytes)
    rep = _finish_with(nc, nc.new_run([R1, R2], fake_clock.now), fake_clock, {1: 30, 2: 10})
    assert rep.preferred_region == 1
    assert rep.pinned
    assert rep.nearest_region == 2
    d = rep.to_dict()
    assert d["preferred_region"] == 1
    assert d["preferred_pinned"] is True
    assert d["nearest_region"] == 2
    assert d["region_latency"] == {"1": 0.03, "2": 0.01}
    assert d["global_v4"] == "203.0.113.7:41641"


def test_netchecker_next_run_is_jittered(seeded_randbytes: Callable[[int], bytes]) -> None:
    nc = Netchecker(randbytes=seeded_randbytes)
    lo, hi = REPORT_INTERVAL
    times = {nc.next_run_at(100.0) for _ in range(20)}
    assert all(100 + lo <= t <= 100 + hi for t in times)
    assert len(times) > 1
