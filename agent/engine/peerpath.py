"""One DISCO-capable peer's path state: candidates, best direct path, trust, DERP route.

State (tailscale's wgengine/magicsock/endpoint.go `endpoint`):

    candidates     endpoint -> Candidate (sources, last ping, pong history)
    best           AddrLatency | None: the direct path in use or being proven
    trust_until    the best path is used alone until then (TRUST_UDP_ADDR_DURATION after its
                   last pong); heartbeats keep moving it forward
    regions        the region the peer was last heard through, else its configured region,
                   else our home region
    schedule       PunchSchedule: activity, heartbeat, discovery and CallMeMaybe pacing

Where packets go (`targets`):

    best trusted (now < trust_until)        -> UDP to best only                  "direct"
    otherwise, a region known               -> DERP, plus UDP to best if any     "derp"
    no region: best, else the configured endpoint, over UDP                      "none"

Transitions, each a method here:

    on_pong(A, latency)      a direct pong for a ping sent to A: A replaces best if it is
                             better_path() or best is untrusted; if best is A, its latency is
                             updated and trust_until = now + TRUST_UDP_ADDR_DURATION
    on_ping_timeout(A)       a ping to A failed: if A is best and untrusted, best is cleared
    lose_trust(A)            a heartbeat to the trusted best A is late: trust ends now, so
                             traffic goes through DERP as well until a pong comes back
    note_direct_send(now)    data goes out over the trusted best path: True when the path has
                             returned nothing for `Timings.silent_after` and is due a probe
    note_direct_answer(now)  something authenticated came back over the best path
    relayed_while_silent()   data came through DERP while the trusted best path is silent:
                             the engine then ends the trust at once (lose_trust)
    set_call_me_maybe(eps)   the CallMeMaybe source moves to exactly `eps`; every candidate
                             becomes due for a ping
    set_netmap_endpoints()   the coordinator's endpoints for the peer replace that source
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from agent.engine.candidates import (
    AddrLatency,
    Candidate,
    CandidateSource,
    PongResult,
    better_path,
)
from agent.engine.events import PeerPathStatus
from agent.engine.paths import Endpoint, PathKind, Targets, derp_region_of
from agent.engine.schedule import PunchSchedule
from agent.engine.timings import MAX_CANDIDATES, Timings
from agent.keys import DiscoPublic, NodePublic

__all__ = ["PeerPath", "path_summary", "usable_endpoint"]


def path_summary(status: PeerPathStatus) -> tuple[PathKind, Endpoint | None, int | None]:
    """What a PathChanged event reports of a status: the kind, and the direct endpoint or the
    DERP region that goes with it."""
    if status.path == "direct":
        return ("direct", status.endpoint, None)
    return (status.path, None, status.derp_region)


def usable_endpoint(ep: Endpoint) -> bool:
    """A unicast ip:port worth pinging (not a DERP pseudo-endpoint, port 0, unspecified,
    multicast, or IPv6 link-local, which CallMeMaybe handling ignores as tailscaled does)."""
    if derp_region_of(ep) is not None or not 0 < ep[1] <= 0xFFFF:
        return False
    try:
        ip = ipaddress.ip_address(ep[0])
    except ValueError:
        return False
    if ip.is_unspecified or ip.is_multicast:
        return False
    return not (ip.version == 6 and ip.is_link_local)


@dataclass(slots=True)
class PeerPath:
    """Path state of one peer that speaks DISCO. Owned by the PathEngine."""

    key: NodePublic
    disco: DiscoPublic
    configured_endpoint: Endpoint | None = None
    configured_region: int | None = None
    derp_rx_region: int | None = None  # region the peer was last heard through
    candidates: dict[Endpoint, Candidate] = field(default_factory=dict)
    best: AddrLatency | None = None
    trust_until: float | None = None
    derp_latency: float | None = None  # latest pong over DERP
    schedule: PunchSchedule = field(default_factory=PunchSchedule)
    reported: tuple[PathKind, Endpoint | None, int | None] = ("none", None, None)
    unanswered_since: float | None = None  # first send over best since it last answered
    last_silence_probe: float | None = None
    last_direct_answer: float | None = None  # last packet or pong from the best path

    def __post_init__(self) -> None:
        if self.configured_endpoint is not None:
            self.set_configured_endpoint(self.configured_endpoint)

    # -- candidates --------------------------------------------------------------------------
    def add_candidate(self, ep: Endpoint, source: CandidateSource, now: float) -> Candidate | None:
        """Record `ep` as a candidate from `source`; None when the table is full of others."""
        if not usable_endpoint(ep):
            return None
        cand = self.candidates.get(ep)
        if cand is None:
            if len(self.candidates) >= MAX_CANDIDATES and not self._evict_one():
                return None
            cand = self.candidates[ep] = Candidate(ep)
        cand.sources |= source
        if source & CandidateSource.LEARNED:
            cand.learned_at = now
        return cand

    def _evict_one(self) -> bool:
        """Make room by forgetting the oldest candidate that only a packet taught us."""
        learned = [
            c
            for c in self.candidates.values()
            if c.sources == CandidateSource.LEARNED and not self._is_best(c.endpoint)
        ]
        if not learned:
            return False
        oldest = min(learned, key=lambda c: c.learned_at or 0.0)
        del self.candidates[oldest.endpoint]
        return True

    def _is_best(self, ep: Endpoint) -> bool:
        return self.best is not None and self.best.endpoint == ep

    def _drop_source(self, ep: Endpoint, source: CandidateSource) -> None:
        cand = self.candidates.get(ep)
        if cand is not None:
            cand.sources &= ~source

    def set_configured_endpoint(self, ep: Endpoint | None) -> None:
        if self.configured_endpoint is not None:
            self._drop_source(self.configured_endpoint, CandidateSource.CONFIG)
        self.configured_endpoint = ep
        if ep is not None:
            self.add_candidate(ep, CandidateSource.CONFIG, 0.0)
        self._sweep()

    def set_call_me_maybe(self, endpoints: list[Endpoint], now: float) -> None:
        """The peer's CallMeMaybe: replace that source, make every candidate due for a ping."""
        self._replace_source(CandidateSource.CALL_ME_MAYBE, endpoints, now)
        for cand in self.candidates.values():
            cand.last_ping = None

    def set_netmap_endpoints(self, endpoints: list[Endpoint], now: float) -> None:
        """The coordinator's list of the peer's endpoints replaces that source. New ones are
        due for a ping at the next discovery round (their last ping is unset)."""
        self._replace_source(CandidateSource.NETMAP, endpoints, now)

    def _replace_source(
        self, source: CandidateSource, endpoints: list[Endpoint], now: float
    ) -> None:
        for cand in self.candidates.values():
            cand.sources &= ~source
        for ep in endpoints:
            self.add_candidate(ep, source, now)
        self._sweep()

    def prune(self, now: float, t: Timings) -> None:
        """Expire learned endpoints nothing came from for SESSION_ACTIVE_TIMEOUT."""
        for cand in self.candidates.values():
            cand.expire_learned(now, t.session_active_timeout)
        self._sweep()

    def _sweep(self) -> None:
        dead = [ep for ep, c in self.candidates.items() if not c.alive]
        for ep in dead:
            del self.candidates[ep]
            if self._is_best(ep):
                self.best = None
                self.trust_until = None

    def due_pings(self, now: float, t: Timings) -> list[Endpoint]:
        """Candidates not pinged within DISCO_PING_INTERVAL."""
        self.prune(now, t)
        return [ep for ep, c in self.candidates.items() if c.ping_due(now, t.disco_ping_interval)]

    def note_ping(self, ep: Endpoint, now: float) -> None:
        cand = self.candidates.get(ep)
        if cand is not None:
            cand.last_ping = now

    # -- paths -------------------------------------------------------------------------------
    def trusted(self, now: float) -> bool:
        return self.best is not None and self.trust_until is not None and now < self.trust_until

    def on_pong(
        self, ep: Endpoint, latency: float, pong_src: Endpoint, now: float, t: Timings
    ) -> None:
        """A pong came back over UDP for a ping we sent to `ep`."""
        cand = self.candidates.get(ep)
        if cand is not None:
            cand.record_pong(PongResult(now, latency, pong_src))
        this = AddrLatency(ep, latency)
        if better_path(this, self.best) or not self.trusted(now):
            self.best = this
        if self.best is not None and self.best.endpoint == ep:
            self.best = this
            self.trust_until = now + t.trust_udp_addr
            self.note_direct_answer(now)

    def on_ping_timeout(self, ep: Endpoint, now: float) -> None:
        if self._is_best(ep) and not self.trusted(now):
            self.best = None
            self.trust_until = None

    def lose_trust(self, ep: Endpoint, now: float) -> bool:
        """A heartbeat to `ep` is late: stop trusting it if it is the trusted best path."""
        if self._is_best(ep) and self.trusted(now):
            self.trust_until = now
            return True
        return False

    def note_direct_send(self, now: float, t: Timings) -> bool:
        """Data goes out over the trusted best path. True when nothing has come back over it
        for `t.silent_after(latency)` since the first such send, and no silence probe went out
        within that time: the caller pings the best path at once."""
        since = self.unanswered_since
        if since is None:
            self.unanswered_since = now
            return False
        after = t.silent_after(self.best.latency if self.best is not None else None)
        if now - since < after:
            return False
        last = self.last_silence_probe
        if last is not None and now - last < after:
            return False
        self.last_silence_probe = now
        return True

    def note_direct_answer(self, now: float) -> None:
        """An authenticated packet came from the best path's endpoint: it is not silent."""
        self.unanswered_since = None
        self.last_direct_answer = now

    def relayed_while_silent(self, now: float, t: Timings) -> bool:
        """Data from the peer came through DERP. True when we trust the direct path but have
        heard nothing over it for `t.silent_after(latency)`: the peer has given up on the
        direct path, so ours is most likely dead too."""
        if not self.trusted(now) or self.best is None:
            return False
        last = self.last_direct_answer
        return last is None or now - last >= t.silent_after(self.best.latency)

    def want_full_ping(self, now: float, t: Timings) -> bool:
        """tailscaled wantFullPingLocked: no trusted best, never full-pinged, or a slow best
        path and no full round for UPGRADE_UDP_DIRECT_INTERVAL."""
        last = self.schedule.last_full_ping
        if self.best is None or last is None or not self.trusted(now):
            return True
        return (
            self.best.latency > t.good_enough_latency
            and now - last >= t.upgrade_udp_direct_interval
        )

    def region(self, home_region: int | None) -> int | None:
        if self.derp_rx_region is not None:
            return self.derp_rx_region
        if self.configured_region is not None:
            return self.configured_region
        return home_region

    def targets(self, now: float, home_region: int | None) -> Targets:
        if self.trusted(now):
            assert self.best is not None
            return Targets(udp=self.best.endpoint)
        region = self.region(home_region)
        udp = self.best.endpoint if self.best is not None else None
        if udp is None and region is None:
            udp = self.configured_endpoint
        return Targets(udp=udp, derp=region)

    def status(self, now: float, home_region: int | None) -> PeerPathStatus:
        region = self.region(home_region)
        if self.trusted(now):
            assert self.best is not None
            return PeerPathStatus("direct", self.best.endpoint, region, self.best.latency)
        endpoint = self.best.endpoint if self.best is not None else self.configured_endpoint
        if region is not None:
            return PeerPathStatus("derp", endpoint, region, self.derp_latency)
        return PeerPathStatus("none", endpoint, None, None)

    def next_deadline(self, now: float) -> float | None:
        """The earliest of the heartbeat and the end of trust (to report the fallback)."""
        times = [self.schedule.heartbeat_at]
        if self.trusted(now):
            times.append(self.trust_until)
        armed = [x for x in times if x is not None]
        return min(armed) if armed else None
