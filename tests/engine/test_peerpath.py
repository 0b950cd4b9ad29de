"""PeerPath: one DISCO peer's candidates, best path, trust window and DERP route (§8.6)."""

from __future__ import annotations

from agent.engine.candidates import CandidateSource
from agent.engine.paths import Targets, derp_endpoint
from agent.engine.peerpath import PeerPath, usable_endpoint
from agent.engine.timings import DEFAULT_TIMINGS, MAX_CANDIDATES
from agent.keys import DiscoPrivate, NodePrivate

T = DEFAULT_TIMINGS
KEY = NodePrivate.generate().public()
DISCO = DiscoPrivate.generate().public()
PUB = ("198.51.100.7", 41641)
PUB2 = ("203.0.113.9", 41641)
LAN = ("192.168.1.5", 41641)


def peer(**kw: object) -> PeerPath:
    return PeerPath(KEY, DISCO, **kw)  # type: ignore[arg-type]


def test_usable_endpoints() -> None:
    assert usable_endpoint(PUB)
    assert usable_endpoint(("2001:db8::1", 1))
    assert not usable_endpoint(derp_endpoint(1))
    assert not usable_endpoint(("0.0.0.0", 41641))
    assert not usable_endpoint(("198.51.100.7", 0))
    assert not usable_endpoint(("fe80::1", 41641))  # IPv6 link-local, ignored as tailscaled
    assert not usable_endpoint(("224.0.0.1", 41641))
    assert not usable_endpoint(("not-an-ip", 41641))


def test_new_peer_goes_through_derp_and_has_its_configured_candidate() -> None:
    p = peer(configured_endpoint=PUB, configured_region=2)
    assert set(p.candidates) == {PUB}
    assert p.targets(0.0, 1) == Targets(udp=None, derp=2)
    st = p.status(0.0, 1)
    assert (st.path, st.endpoint, st.derp_region, st.latency) == ("derp", PUB, 2, None)


def test_without_any_region_the_configured_endpoint_is_used() -> None:
    p = peer(configured_endpoint=PUB)
    assert p.targets(0.0, None) == Targets(udp=PUB)
    assert p.status(0.0, None).path == "none"
    assert peer().targets(0.0, None) == Targets()


def test_region_preference_heard_then_configured_then_home() -> None:
    p = peer(configured_region=2)
    assert p.region(1) == 2
    p.derp_rx_region = 3
    assert p.region(1) == 3
    assert peer().region(1) == 1


def test_pong_makes_a_trusted_direct_path_that_lapses() -> None:
    p = peer(configured_region=1)
    p.add_candidate(PUB, CandidateSource.CALL_ME_MAYBE, 0.0)
    p.on_pong(PUB, 0.02, ("192.0.2.1", 5), 100.0, T)
    assert p.trusted(100.0)
    assert p.targets(100.0, 1) == Targets(udp=PUB)
    st = p.status(100.0, 1)
    assert (st.path, st.endpoint, st.latency) == ("direct", PUB, 0.02)
    assert p.candidates[PUB].latest_latency == 0.02
    assert p.next_deadline(100.0) == 100.0 + T.trust_udp_addr
    end = 100.0 + T.trust_udp_addr
    assert not p.trusted(end)
    assert p.targets(end, 1) == Targets(udp=PUB, derp=1)  # untrusted best: both
    assert p.status(end, 1).path == "derp"


def test_hysteresis_keeps_a_trusted_best_against_a_marginal_one() -> None:
    p = peer()
    p.on_pong(PUB, 0.020, PUB, 100.0, T)
    p.on_pong(PUB2, 0.0199, PUB, 100.1, T)  # 0.5 % faster: not enough
    assert p.best is not None
    assert p.best.endpoint == PUB
    p.on_pong(LAN, 0.022, PUB, 100.2, T)  # private bonus beats 10 % slower
    assert p.best is not None
    assert p.best.endpoint == LAN
    # once the trust lapsed any answering path takes over
    later = 100.2 + T.trust_udp_addr + 1
    p.on_pong(PUB2, 0.05, PUB, later, T)
    assert p.best is not None
    assert p.best.endpoint == PUB2


def test_ping_timeout_clears_only_an_untrusted_best() -> None:
    p = peer()
    p.on_pong(PUB, 0.02, PUB, 100.0, T)
    p.on_ping_timeout(PUB, 101.0)  # still trusted: kept
    assert p.best is not None
    p.on_ping_timeout(PUB2, 110.0)  # not the best: kept
    assert p.best is not None
    p.on_ping_timeout(PUB, 110.0)
    assert p.best is None


def test_lose_trust_on_a_late_heartbeat() -> None:
    p = peer(configured_region=1)
    p.on_pong(PUB, 0.02, PUB, 100.0, T)
    assert not p.lose_trust(PUB2, 101.0)
    assert p.lose_trust(PUB, 101.5)
    assert not p.trusted(101.5)
    assert p.targets(101.5, 1) == Targets(udp=PUB, derp=1)
    p.on_pong(PUB, 0.02, PUB, 102.0, T)  # a pong restores it at once
    assert p.trusted(102.0)


def test_call_me_maybe_replaces_its_source_and_makes_everything_due() -> None:
    p = peer(configured_endpoint=PUB)
    p.add_candidate(LAN, CandidateSource.LEARNED, 10.0)
    for ep in list(p.candidates):
        p.note_ping(ep, 10.0)
    p.set_call_me_maybe([PUB2, ("198.51.100.99", 1)], 11.0)
    assert set(p.due_pings(11.0, T)) == {PUB, LAN, PUB2, ("198.51.100.99", 1)}
    p.set_call_me_maybe([PUB2], 12.0)
    assert ("198.51.100.99", 1) not in p.candidates
    assert p.candidates[PUB].sources == CandidateSource.CONFIG


def test_learned_candidates_expire_and_take_the_best_with_them() -> None:
    p = peer()
    p.add_candidate(PUB, CandidateSource.LEARNED, 100.0)
    p.on_pong(PUB, 0.02, PUB, 100.0, T)
    p.prune(100.0 + T.session_active_timeout + 1, T)
    assert p.candidates == {}
    assert p.best is None


def test_due_pings_respect_the_disco_ping_interval() -> None:
    p = peer(configured_endpoint=PUB)
    assert p.due_pings(100.0, T) == [PUB]
    p.note_ping(PUB, 100.0)
    assert p.due_pings(104.0, T) == []
    assert p.due_pings(105.0, T) == [PUB]


def test_candidates_are_bounded_learned_evicted_first() -> None:
    p = peer(configured_endpoint=PUB)
    for i in range(MAX_CANDIDATES + 20):
        p.add_candidate((f"198.51.{i // 250}.{i % 250 + 1}", 1000), CandidateSource.LEARNED, i)
    assert len(p.candidates) == MAX_CANDIDATES
    assert PUB in p.candidates
    cmm = [(f"203.0.113.{i + 1}", 2000) for i in range(MAX_CANDIDATES)]
    p.set_call_me_maybe(cmm, 1000.0)
    assert len(p.candidates) == MAX_CANDIDATES
    assert PUB in p.candidates


def test_want_full_ping() -> None:
    p = peer()
    assert p.want_full_ping(100.0, T)  # no best
    p.on_pong(PUB, 0.020, PUB, 100.0, T)
    assert p.want_full_ping(100.0, T)  # never full-pinged
    p.schedule.note_full_ping(100.0)
    assert not p.want_full_ping(101.0, T)
    p.on_pong(PUB, 0.020, PUB, 160.0, T)
    assert p.want_full_ping(160.0, T)  # slow path, a minute since the last round
    p.on_pong(PUB, 0.001, PUB, 160.0, T)
    assert not p.want_full_ping(160.0, T)  # good enough: never look for better


def test_a_silent_direct_path_is_due_a_probe_once_per_interval() -> None:
    p = peer()
    p.on_pong(PUB, 0.01, PUB, 10.0, T)
    after = T.silent_after(0.01)
    assert after == T.silent_path_probe
    assert not p.note_direct_send(10.1, T)  # first send since the answer starts the clock
    assert not p.note_direct_send(10.1 + after - 0.01, T)
    assert p.note_direct_send(10.1 + after, T)  # silent for `after`: probe
    assert not p.note_direct_send(10.1 + after + 0.1, T)  # at most once per interval
    assert p.note_direct_send(10.1 + 2 * after, T)
    p.note_direct_answer(11.0)  # a packet came back: the clock restarts
    assert not p.note_direct_send(11.5, T)
    assert not p.note_direct_send(11.5 + after - 0.01, T)


def test_a_pong_from_the_best_path_ends_its_silence() -> None:
    p = peer()
    p.on_pong(PUB, 0.01, PUB, 10.0, T)
    p.note_direct_send(10.1, T)
    p.on_pong(PUB, 0.01, PUB, 10.3, T)
    assert not p.note_direct_send(10.1 + T.silent_path_probe, T)


def test_silence_scales_with_a_slow_path() -> None:
    assert T.silent_after(None) == T.silent_path_probe
    assert T.silent_after(0.4) == 0.8


def test_data_through_derp_while_the_direct_path_is_silent() -> None:
    p = peer(configured_region=1)
    p.on_pong(PUB, 0.01, PUB, 10.0, T)
    assert not p.relayed_while_silent(10.2, T)  # the pong was just now
    p.note_direct_answer(10.4)
    assert not p.relayed_while_silent(10.4 + T.silent_path_probe - 0.01, T)
    assert p.relayed_while_silent(10.4 + T.silent_path_probe, T)
    p.lose_trust(PUB, 11.0)
    assert not p.relayed_while_silent(11.0, T)  # untrusted already: nothing to end


def test_netmap_endpoints_replace_their_source_only() -> None:
    p = peer(configured_endpoint=PUB)
    p.set_netmap_endpoints([PUB, LAN], 1.0)
    assert set(p.candidates) == {PUB, LAN}
    p.set_netmap_endpoints([PUB2], 2.0)
    assert set(p.candidates) == {PUB, PUB2}  # PUB stays: the config still names it
    assert p.candidates[PUB2].ping_due(2.0, T.disco_ping_interval)
