"""One netcheck run (`NetcheckRun`): STUN requests out, answers in, the Report out."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

from agent.engine.netcheck.report import (
    DEFAULT_TIMINGS,
    Endpoint,
    Family,
    NetcheckTimings,
    Probe,
    ProbePlan,
    RegionTargets,
    Report,
)
from agent.proto import stun
from agent.proto.errors import RemoteProtocolError

__all__ = [
    "NetcheckRun",
]


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
        timings: NetcheckTimings = DEFAULT_TIMINGS,
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
