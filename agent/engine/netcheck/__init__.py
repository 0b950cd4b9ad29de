"""Netcheck: what the network lets us do, and which DERP region should be home. Sans-I/O.

Follows tailscale net/netcheck (§7 netcheck and home-region selection, §6 STUN). The
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

Modules: `report` (targets, probes, the Report, timings), `plan` (probe plans), `run` (one
run), `home` (home-region choice), `checker` (the long-lived Netchecker).
"""

from agent.engine.netcheck.checker import REPORT_INTERVAL, Netchecker
from agent.engine.netcheck.home import ABSOLUTE_DIFF, DERP_FRAME_TIME, HomeRegion
from agent.engine.netcheck.plan import make_probe_plan
from agent.engine.netcheck.report import (
    HISTORY_MAX_AGE,
    HISTORY_REPORTS,
    Family,
    NetcheckTimings,
    Probe,
    RegionTargets,
    Report,
    StunTarget,
)
from agent.engine.netcheck.run import NetcheckRun

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
