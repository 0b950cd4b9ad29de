"""The home DERP region with hysteresis over recent reports (§7.5).

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from agent.engine.netcheck.report import (
    HISTORY_MAX_AGE,
    HISTORY_REPORTS,
)

__all__ = [
    "ABSOLUTE_DIFF",
    "DERP_FRAME_TIME",
    "HomeRegion",
]

ABSOLUTE_DIFF: Final = 0.010  # a new home must be at least this much faster (§7.5)
DERP_FRAME_TIME: Final = 8.0  # a frame from the home this recent keeps it accessible


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
