"""Probe plans: which STUN requests a netcheck run sends, and when (§7.2).

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from agent.engine.netcheck.report import (
    DEFAULT_TIMINGS,
    Family,
    NetcheckTimings,
    Probe,
    ProbePlan,
    RegionTargets,
    Report,
)

__all__ = [
    "make_probe_plan",
]

_INCREMENTAL_STEP_EXTRA: Final = 0.050  # added per try after the second (incremental plan)


def make_probe_plan(
    regions: Sequence[RegionTargets],
    *,
    last: Report | None = None,
    preferred: int | None = None,
    have_v4: bool = True,
    have_v6: bool = False,
    timings: NetcheckTimings = DEFAULT_TIMINGS,
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
