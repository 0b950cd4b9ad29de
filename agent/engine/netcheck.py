"""Netcheck: what the network lets us do, and which DERP region should be home. Sans-I/O.

Follows tailscale's net/netcheck/netcheck.go (home-region selection) and RFC 5389 (STUN). The
shell resolves each region's STUN servers to addresses (`RegionTargets`), sends the datagrams
this module asks for, feeds STUN answers back, and times HTTPS `GET /derp/latency-check` for the
regions STUN did not reach.

    Netchecker                        long-lived, one per daemon (or one per `agent netcheck`)
      new_run(regions, now)           a NetcheckRun with a full or an incremental probe plan
      finish(run, now, derp_heard)    the Report, its preferred region chosen by `home`
      home: HomeRegion                the home choice with hysteresis over recent reports
      next_run_at(now)                when the next periodic report is due (20-26 s, jittered)

    NetcheckRun                       one report being built
      on_timer(now)                   STUN requests due now -> [(datagram, endpoint)]
      receive(data, src, now)         True when `data` answered one of our requests
      next_deadline()                 when on_timer wants to run again (None: STUN phase over)
      stun_done(now)                  the STUN phase is over (all sets answered, stop timer,
                                      or the STUN time limit)
      https_wanted()                  regions to time over HTTPS: no STUN latency, a DERP node
      add_https_latency(region, s)
      report(now)                     the Report (preferred_region left for Netchecker.finish)

Probe plans (§7.2). A probe set is one region x one address family; it stops at its first
answer, and a later try is skipped unless it could still add information.
    full (first run, every FULL_INTERVAL, or when the region list changed):
        every region, 3 tries at 0, 100, 200 ms per family, rotating through the region's nodes
    incremental: the 3 regions fastest in the last report plus the current home; tries: 1,
        2 for the fastest two, 4 for the home; try i waits i x (1.2 x last latency, or 200 ms)
        (+ i x 50 ms when i > 1); IPv6 only if it worked last time; dual-stack hosts alternate
        the family for the 3rd and slower regions.
Once `enough_regions` regions answered, a stop timer of (slowest latency) x (2 full, 1
incremental) ends the STUN phase early; it never lasts more than `stun_timeout`.

Home region (§7.5), `HomeRegion.update`: each region's best latency over the recent reports
(times its score, when one is given) picks the candidate among the regions that answered this
time. "Recent" is the last HISTORY_REPORTS reports within HISTORY_MAX_AGE: tailscaled keeps every
report of the last 5 min, so a home that turns slow is kept up to 5 min; with the last 3 reports
one slow sample (a blip) is still smoothed, but a home slow in 3 reports in a row (about a
minute at the periodic cadence) loses.
The current home is kept while it is accessible (it answered now, or a DERP frame came from it
since the run began or within DERP_FRAME_TIME) unless the candidate is both ABSOLUTE_DIFF (10 ms)
faster and better than 2/3 of the home's current latency; and (our addition) a candidate whose
latency in this report is no better than the home's does not win on its history alone. When
nothing answered, the home stays. A pinned home always wins.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Final

from agent.proto import stun
from agent.proto.endpoint import format_endpoint
from agent.proto.errors import RemoteProtocolError

__all__ = [
    "ABSOLUTE_DIFF",
    "DERP_FRAME_TIME",
    "HISTORY_MAX_AGE",
    "HISTORY_REPORTS",
    "REPORT_INTERVAL",
    "Family",
    "HomeRegion",
    "NetcheckRun",
    "NetcheckTimings",
    "Netchecker",
    "Probe",
    "RegionTargets",
    "Report",
    "StunTarget",
    "make_probe_plan",
]

Endpoint = tuple[str, int]

REPORT_INTERVAL: Final = (20.0, 26.0)  # periodic re-check, uniform in this range (§7.1)
HISTORY_MAX_AGE: Final = 305.0  # reports kept for the home choice: 5 min + the report timeout
HISTORY_REPORTS: Final = 3  # ... and at most this many (the newest)
ABSOLUTE_DIFF: Final = 0.010  # a new home must be at least this much faster (§7.5)
DERP_FRAME_TIME: Final = 8.0  # a frame from the home this recent keeps it accessible
_INCREMENTAL_STEP_EXTRA: Final = 0.050  # added per try after the second (incremental plan)


class Family(IntEnum):
    V4 = 4
    V6 = 6


@dataclass(frozen=True, slots=True)
class NetcheckTimings:
    """Limits and intervals of one Netchecker; tests pass shorter ones."""

    stun_timeout: float = 3.0  # the STUN phase never lasts longer
    https_timeout: float = 5.0  # budget of the HTTPS latency checks (the shell enforces it)
    full_interval: float = 300.0  # a full report at least this often
    initial_retransmit: float = 0.100  # spacing of the full plan's tries
    active_retransmit: float = 0.200  # incremental spacing for a region with no last latency
    full_tries: int = 3
    enough_regions: int = 3  # answers from this many regions start the stop timer
    incremental_regions: int = 3
    home_history_age: float = HISTORY_MAX_AGE
    home_history_reports: int = HISTORY_REPORTS


@dataclass(frozen=True, slots=True)
class StunTarget:
    """One DERP node's STUN server, resolved: an address per family it has (or None)."""

    v4: Endpoint | None = None
    v6: Endpoint | None = None

    def addr(self, family: Family) -> Endpoint | None:
        return self.v4 if family is Family.V4 else self.v6


@dataclass(frozen=True, slots=True)
class RegionTargets:
    """A region as netcheck sees it: its STUN servers (node order) and whether it has a DERP
    node to time over HTTPS."""

    id: int
    stun: tuple[StunTarget, ...] = ()
    https: bool = True


@dataclass(frozen=True, slots=True)
class Probe:
    region: int
    family: Family
    endpoint: Endpoint
    delay: float  # seconds after the run started


ProbePlan = dict[tuple[int, Family], tuple[Probe, ...]]


@dataclass(frozen=True, slots=True)
class Report:
    """One netcheck result. Latencies are seconds; `region_latency` is the best per region over
    STUN and HTTPS, `region_v4_latency`/`region_v6_latency` are STUN only."""

    udp: bool
    ipv4: bool
    ipv6: bool
    ipv6_os: bool  # the host could send IPv6 (a socket and a route)
    global_v4: Endpoint | None
    global_v6: Endpoint | None
    endpoints: tuple[Endpoint, ...]  # every distinct public address STUN servers saw
    mapping_varies_by_dest_ip: bool | None  # None: fewer than two IPv4 STUN servers answered
    region_latency: Mapping[int, float]
    region_v4_latency: Mapping[int, float]
    region_v6_latency: Mapping[int, float]
    https_regions: frozenset[int]  # regions whose latency came from HTTPS
    full: bool
    started: float
    duration: float
    preferred_region: int | None = None  # the home after this report (Netchecker.finish)
    pinned: bool = False  # preferred_region is the config's pin

    @property
    def nearest_region(self) -> int | None:
        """The region with the lowest latency in this report alone (None: none answered)."""
        if not self.region_latency:
            return None
        return min(self.region_latency, key=lambda r: (self.region_latency[r], r))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: addresses as "ip:port" ("[v6]:port"), latencies in seconds."""

        def lat(m: Mapping[int, float]) -> dict[str, float]:
            return {str(r): round(m[r], 6) for r in sorted(m)}

        return {
            "udp": self.udp,
            "ipv4": self.ipv4,
            "ipv6": self.ipv6,
            "ipv6_os_support": self.ipv6_os,
            "global_v4": _fmt(self.global_v4),
            "global_v6": _fmt(self.global_v6),
            "endpoints": [_fmt(e) for e in self.endpoints],
            "mapping_varies_by_dest_ip": self.mapping_varies_by_dest_ip,
            "nearest_region": self.nearest_region,
            "preferred_region": self.preferred_region,
            "preferred_pinned": self.pinned,
            "region_latency": lat(self.region_latency),
            "region_v4_latency": lat(self.region_v4_latency),
            "region_v6_latency": lat(self.region_v6_latency),
            "https_regions": sorted(self.https_regions),
            "full": self.full,
            "duration": round(self.duration, 6),
        }


def _fmt(ep: Endpoint | None) -> str | None:
    if ep is None:
        return None
    return format_endpoint(ep)


# -- probe plans -----------------------------------------------------------------------------------


def make_probe_plan(
    regions: Sequence[RegionTargets],
    *,
    last: Report | None = None,
    preferred: int | None = None,
    have_v4: bool = True,
    have_v6: bool = False,
    timings: NetcheckTimings = NetcheckTimings(),
) -> ProbePlan:
    """The STUN probe sets of one run: full when `last` is None, else incremental (§7.2)."""
    if last is None:
        return _full_plan(regions, have_v4=have_v4, have_v6=have_v6, timings=timings)
    return _incremental_plan(
        regions, last, preferred, have_v4=have_v4, have_v6=have_v6, timings=timings
    )


def _families(have_v4: bool, have_v6: bool) -> list[Family]:
    return [f for f, ok in ((Family.V4, have_v4), (Family.V6, have_v6)) if ok]


def _full_plan(
    regions: Sequence[RegionTargets], *, have_v4: bool, have_v6: bool, timings: NetcheckTimings
) -> ProbePlan:
    plan: ProbePlan = {}
    for reg in regions:
        for fam in _families(have_v4, have_v6):
            addrs = [a for a in (t.addr(fam) for t in reg.stun) if a is not None]
            if not addrs:
                continue
            plan[(reg.id, fam)] = tuple(
                Probe(reg.id, fam, addrs[i % len(addrs)], i * timings.initial_retransmit)
                for i in range(timings.full_tries)
            )
    return plan


def _incremental_plan(
    regions: Sequence[RegionTargets],
    last: Report,
    preferred: int | None,
    *,
    have_v4: bool,
    have_v6: bool,
    timings: NetcheckTimings,
) -> ProbePlan:
    have_v6 = have_v6 and last.ipv6  # IPv6 is re-tried only if it worked last time
    both = have_v4 and have_v6
    ordered = sorted(
        regions,
        key=lambda r: (r.id not in last.region_latency, last.region_latency.get(r.id, 0.0), r.id),
    )
    plan: ProbePlan = {}
    for ri, reg in enumerate(ordered):
        is_home = reg.id == preferred
        if ri >= timings.incremental_regions and not is_home:
            continue
        fams = _families(have_v4, have_v6)
        tries = 1
        if ri < 2:
            tries = 2
        elif both:  # 3rd and slower regions of a dual-stack host alternate the family
            fams = [Family.V4] if ri % 2 == 0 else [Family.V6]
        if is_home:
            tries = 4
        prev = last.region_latency.get(reg.id)
        step = 1.2 * prev if prev else timings.active_retransmit
        for fam in fams:
            addrs = [a for a in (t.addr(fam) for t in reg.stun) if a is not None]
            if not addrs:
                continue
            plan[(reg.id, fam)] = tuple(
                Probe(
                    reg.id,
                    fam,
                    addrs[i % len(addrs)],
                    i * step + (i * _INCREMENTAL_STEP_EXTRA if i > 1 else 0.0),
                )
                for i in range(tries)
            )
    return plan


# -- one run ---------------------------------------------------------------------------------------


class NetcheckRun:
    """One report being built from STUN answers (and HTTPS latencies) fed by the shell."""

    def __init__(
        self,
        plan: ProbePlan,
        regions: Sequence[RegionTargets],
        now: float,
        *,
        full: bool,
        ipv6_os: bool = False,
        timings: NetcheckTimings = NetcheckTimings(),
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        # Static after construction.
        self.started = now
        self.full = full
        self.ipv6_os = ipv6_os
        self.timings = timings
        self._randbytes = randbytes
        self._regions = {r.id: r for r in regions}
        self._stun_regions = {region for region, _fam in plan}
        self._stun_deadline = now + timings.stun_timeout
        # Owned by on_timer / receive.
        self._queue: list[tuple[float, tuple[int, Family], Probe]] = sorted(
            ((now + p.delay, key, p) for key, probes in plan.items() for p in probes),
            key=lambda e: (e[0], e[1][0], e[1][1]),
        )
        self._sets = set(plan)
        self._sets_done: set[tuple[int, Family]] = set()
        self._inflight: dict[bytes, tuple[Probe, float]] = {}
        self._lat: dict[Family, dict[int, float]] = {Family.V4: {}, Family.V6: {}}
        self._https: dict[int, float] = {}
        self._v4_by_server: dict[Endpoint, Endpoint] = {}
        self._endpoints: list[Endpoint] = []
        self._global_v4: Endpoint | None = None
        self._global_v6: Endpoint | None = None
        self._stop_at: float | None = None
        self._finished = False
        self.sent = 0
        self.answered = 0

    # --- STUN phase -----------------------------------------------------------------------------

    def on_timer(self, now: float) -> list[tuple[bytes, Endpoint]]:
        """The STUN requests due at `now`; the caller sends each to its endpoint right away."""
        if self.stun_done(now):
            return []
        out: list[tuple[bytes, Endpoint]] = []
        while self._queue and self._queue[0][0] <= now:
            _at, key, probe = self._queue.pop(0)
            if key in self._sets_done:
                continue
            if not self._would_help(probe):
                self._sets_done.add(key)
                continue
            txid = stun.new_txid(self._randbytes)
            self._inflight[txid] = (probe, now)
            out.append((stun.binding_request(txid), probe.endpoint))
        self.sent += len(out)
        return out

    def _would_help(self, probe: Probe) -> bool:
        lat = self._lat[probe.family]
        if probe.region not in self._lat[Family.V4] and probe.region not in self._lat[Family.V6]:
            return True
        if probe.family is Family.V6:
            return not lat
        return len(self._v4_by_server) < 2 and probe.endpoint not in self._v4_by_server

    def next_deadline(self) -> float | None:
        if self._finished:
            return None
        times = [self._stun_deadline]
        if self._queue:
            times.append(self._queue[0][0])
        if self._stop_at is not None:
            times.append(self._stop_at)
        return min(times)

    def stun_done(self, now: float) -> bool:
        """True once the STUN phase is over; it stays over."""
        if not self._finished and (
            now >= self._stun_deadline
            or (self._stop_at is not None and now >= self._stop_at)
            or self._sets <= self._sets_done
        ):
            self._finished = True
            self._queue.clear()
        return self._finished

    def receive(self, data: bytes, src: Endpoint, now: float) -> bool:
        """A datagram that may answer one of our requests; True when it did (other STUN, late or
        foreign answers return False so the caller can offer them to someone else)."""
        if not stun.is_stun(data):
            return False
        try:
            txid, mapped = stun.parse_response(data)
        except RemoteProtocolError:
            return False
        entry = self._inflight.get(txid)
        if entry is None:
            return False
        del self._inflight[txid]
        probe, sent_at = entry
        self.answered += 1
        latency = max(now - sent_at, 0.0)
        lat = self._lat[probe.family]
        if probe.region not in lat or latency < lat[probe.region]:
            lat[probe.region] = latency
        self._sets_done.add((probe.region, probe.family))
        if mapped not in self._endpoints:
            self._endpoints.append(mapped)
        if ":" in mapped[0]:
            self._global_v6 = mapped  # the last IPv6 address seen
        else:
            if self._global_v4 is None:
                self._global_v4 = mapped  # the first IPv4 address seen
            self._v4_by_server[probe.endpoint] = mapped
        if self._stop_at is None and not self._finished:
            answered = self._lat[Family.V4].keys() | self._lat[Family.V6].keys()
            if len(answered) >= min(self.timings.enough_regions, len(self._stun_regions)):
                slowest = max(self._stun_latencies().values())
                self._stop_at = now + slowest * (2 if self.full else 1)
        return True

    def _stun_latencies(self) -> dict[int, float]:
        best: dict[int, float] = {}
        for lat in self._lat.values():
            for region, d in lat.items():
                if region not in best or d < best[region]:
                    best[region] = d
        return best

    # --- HTTPS phase ----------------------------------------------------------------------------

    def https_wanted(self) -> list[int]:
        """Regions with a DERP node that STUN did not measure (ascending id)."""
        measured = self._stun_latencies()
        return sorted(r for r, reg in self._regions.items() if reg.https and r not in measured)

    def add_https_latency(self, region: int, latency: float) -> None:
        if region not in self._https or latency < self._https[region]:
            self._https[region] = max(latency, 0.0)

    # --- result ---------------------------------------------------------------------------------

    def report(self, now: float) -> Report:
        stun_lat = self._stun_latencies()
        combined = dict(stun_lat)
        https_regions: set[int] = set()
        for region, d in self._https.items():
            if region not in combined or d < combined[region]:
                combined[region] = d
                https_regions.add(region)
        servers = set(self._v4_by_server.values())
        varies = len(servers) > 1 if len(self._v4_by_server) >= 2 else None
        return Report(
            udp=bool(stun_lat),
            ipv4=bool(self._lat[Family.V4]),
            ipv6=bool(self._lat[Family.V6]),
            ipv6_os=self.ipv6_os,
            global_v4=self._global_v4,
            global_v6=self._global_v6,
            endpoints=tuple(self._endpoints),
            mapping_varies_by_dest_ip=varies,
            region_latency=combined,
            region_v4_latency=dict(self._lat[Family.V4]),
            region_v6_latency=dict(self._lat[Family.V6]),
            https_regions=frozenset(https_regions),
            full=self.full,
            started=self.started,
            duration=max(now - self.started, 0.0),
        )


# -- home region -----------------------------------------------------------------------------------


@dataclass(slots=True)
class HomeRegion:
    """The home DERP region, moved only when another region is clearly better (§7.5)."""

    pinned: int | None = None  # the config's home_region: always the answer
    scores: Mapping[int, float] = field(default_factory=dict)  # latency multipliers, > 0
    max_age: float = HISTORY_MAX_AGE
    max_reports: int = HISTORY_REPORTS
    current: int | None = None
    _history: list[tuple[float, dict[int, float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pinned is not None:
            self.current = self.pinned

    def _scaled(self, region: int, d: float) -> float:
        score = self.scores.get(region, 0.0)
        return d * score if score > 0 else d

    def best_recent(self, now: float) -> dict[int, float]:
        """Each region's best (scaled) latency over the retained reports."""
        best: dict[int, float] = {}
        for at, lat in self._history:
            if now - at > self.max_age:
                continue
            for region, d in lat.items():
                if region not in best or d < best[region]:
                    best[region] = d
        return {r: self._scaled(r, d) for r, d in best.items()}

    def update(
        self,
        latencies: Mapping[int, float],
        now: float,
        *,
        derp_heard: Mapping[int, float] | None = None,
        started: float | None = None,
    ) -> int | None:
        """Add one report's region latencies (seconds) taken at `now` and return the home.

        `derp_heard` maps a region to when a DERP frame last came from it (same clock);
        `started` is when the report began (a frame since then counts too)."""
        self._history.append((now, dict(latencies)))
        kept = [(at, lat) for at, lat in self._history if now - at <= self.max_age]
        self._history = kept[-self.max_reports :]
        if self.pinned is not None:
            self.current = self.pinned
            return self.current
        prev = self.current
        best_recent = self.best_recent(now)
        candidate: int | None = None
        best_any = 0.0
        for region in sorted(latencies):
            d = best_recent[region]
            if candidate is None or d < best_any:
                candidate, best_any = region, d
        if candidate is None:
            return prev  # nothing answered: stay (there is nothing better to move to)
        if prev is None or candidate == prev:
            self.current = candidate
            return candidate
        heard = (derp_heard or {}).get(prev)
        heard_recently = heard is not None and (
            (started is not None and heard >= started) or heard >= now - DERP_FRAME_TIME
        )
        if prev in latencies or heard_recently:
            old = self._scaled(prev, latencies[prev]) if prev in latencies else 0.0
            if old - best_any < ABSOLUTE_DIFF or best_any > old * 2 / 3:
                return prev  # the old home is about as good: no flapping
            if prev in latencies and self._scaled(candidate, latencies[candidate]) >= old:
                return prev  # the candidate's history is better but it is not, right now
        self.current = candidate
        return candidate


# -- the long-lived part ---------------------------------------------------------------------------


class Netchecker:
    """Runs reports one after another: plan choice (full or incremental) and the home region."""

    def __init__(
        self,
        *,
        pinned_home: int | None = None,
        scores: Mapping[int, float] | None = None,
        timings: NetcheckTimings = NetcheckTimings(),
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.timings = timings
        self.home = HomeRegion(
            pinned=pinned_home,
            scores=dict(scores or {}),
            max_age=timings.home_history_age,
            max_reports=timings.home_history_reports,
        )
        self._randbytes = randbytes
        self.last: Report | None = None
        self._last_full: float | None = None
        self._region_ids: frozenset[int] | None = None
        self.reports = 0

    def new_run(
        self,
        regions: Sequence[RegionTargets],
        now: float,
        *,
        have_v4: bool = True,
        have_v6: bool = False,
        full: bool = False,
    ) -> NetcheckRun:
        """Start a report. It is full when asked, on the first run, when the region list
        changed, or when the last full one is older than `full_interval`."""
        ids = frozenset(r.id for r in regions)
        full = (
            full
            or self.last is None
            or self._last_full is None
            or now - self._last_full >= self.timings.full_interval
            or ids != self._region_ids
        )
        self._region_ids = ids
        plan = make_probe_plan(
            regions,
            last=None if full else self.last,
            preferred=self.home.current,
            have_v4=have_v4,
            have_v6=have_v6,
            timings=self.timings,
        )
        return NetcheckRun(
            plan,
            regions,
            now,
            full=full,
            ipv6_os=have_v6,
            timings=self.timings,
            randbytes=self._randbytes,
        )

    def finish(
        self, run: NetcheckRun, now: float, *, derp_heard: Mapping[int, float] | None = None
    ) -> Report:
        """The run's report with the home region decided; kept as `last`."""
        report = run.report(now)
        home = self.home.update(
            report.region_latency, now, derp_heard=derp_heard, started=run.started
        )
        report = replace(report, preferred_region=home, pinned=self.home.pinned is not None)
        self.last = report
        if report.full:
            self._last_full = run.started
        self.reports += 1
        return report

    def next_run_at(self, now: float) -> float:
        """When the next periodic report is due: REPORT_INTERVAL from `now`, jittered."""
        lo, hi = REPORT_INTERVAL
        jitter = int.from_bytes(self._randbytes(2), "big") / 65535
        return now + lo + (hi - lo) * jitter
