"""The long-lived part of netcheck: runs reports one after another (plan choice, home region)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Final

from agent.engine.netcheck.home import (
    HomeRegion,
)
from agent.engine.netcheck.plan import (
    make_probe_plan,
)
from agent.engine.netcheck.report import (
    DEFAULT_TIMINGS,
    NetcheckTimings,
    RegionTargets,
    Report,
)
from agent.engine.netcheck.run import (
    NetcheckRun,
)

__all__ = [
    "REPORT_INTERVAL",
    "Netchecker",
]

REPORT_INTERVAL: Final = (20.0, 26.0)  # periodic re-check, uniform in this range (§7.1)


class Netchecker:
    """Runs reports one after another: plan choice (full or incremental) and the home region."""

    def __init__(
        self,
        *,
        pinned_home: int | None = None,
        scores: Mapping[int, float] | None = None,
        timings: NetcheckTimings = DEFAULT_TIMINGS,
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
