"""The path engine's timings and bounds: named constants, gathered in one frozen `Timings`.

Values follow tailscale's wgengine/magicsock/endpoint.go unless a comment says why
we differ. Everything is in seconds. Tests do not shorten them: they advance a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "HEARTBEAT_INTERVAL",
    "TRUST_UDP_ADDR_DURATION",
    "DISCO_PING_INTERVAL",
    "PING_TIMEOUT",
    "SESSION_ACTIVE_TIMEOUT",
    "UPGRADE_UDP_DIRECT_INTERVAL",
    "GOOD_ENOUGH_LATENCY",
    "HEARTBEAT_PONG_DEADLINE",
    "SILENT_PATH_PROBE",
    "PING_BACK_INTERVAL",
    "CALL_ME_MAYBE_INTERVAL",
    "CALL_ME_MAYBE_ANSWER_INTERVAL",
    "PONG_HISTORY_COUNT",
    "MAX_CANDIDATES",
    "MAX_CALL_ME_MAYBE_ENDPOINTS",
    "MAX_OUTSTANDING_PINGS",
    "Timings",
    "DEFAULT_TIMINGS",
]

# --- §8.7, as tailscaled -------------------------------------------------------------------------
HEARTBEAT_INTERVAL: Final = 3.0  # heartbeatInterval: ping the best path this often while active
TRUST_UDP_ADDR_DURATION: Final = 6.5  # trustUDPAddrDuration: direct used alone after a pong
DISCO_PING_INTERVAL: Final = 5.0  # discoPingInterval: min gap between discovery pings to one ep
PING_TIMEOUT: Final = 5.0  # pingTimeoutDuration: a ping without pong has failed
SESSION_ACTIVE_TIMEOUT: Final = 45.0  # sessionActiveTimeout: idle after this; also the lifetime
#                                       of an endpoint learned from an incoming ping
UPGRADE_UDP_DIRECT_INTERVAL: Final = 60.0  # upgradeUDPDirectInterval: look for better than best
GOOD_ENOUGH_LATENCY: Final = 0.005  # goodEnoughLatency: at or below, never look for better

# --- ours ----------------------------------------------------------------------------------------
# A heartbeat ping to the trusted best path that has no pong after this long (or 3x the path's
# latency, if larger) ends the trust at once, so traffic also goes through DERP. tailscaled waits
# for the trust window to lapse: up to 3 s + 6.5 s after the path died. A single lost or slow
# pong only costs duplicate sends over DERP until a pong comes back (a late one counts).
HEARTBEAT_PONG_DEADLINE: Final = 0.5
# Data sent over the trusted direct path and nothing back over it (no WireGuard packet from that
# endpoint, no pong) for this long (or 2x the path's latency, if larger): a heartbeat ping goes
# out at once instead of at the next heartbeat, at most once per this interval. With the pong
# deadline above, a direct path that dies under traffic falls back to DERP about 1 s later
# instead of up to 3 s + 0.5 s (a TCP stream's retransmission timer keeps doubling meanwhile, so
# every second of outage can cost as much again after it). An idle peer is never probed; a
# one-way stream costs one ping per interval.
SILENT_PATH_PROBE: Final = 0.5
# A ping that arrives over UDP from a peer we have no trusted path to is answered with a pong AND
# a ping back to its source (at most this often per endpoint). Without a coordinator handing out
# endpoints, this is what lets the second side of a hole punch finish in one round trip instead
# of waiting DISCO_PING_INTERVAL for its next discovery round.
PING_BACK_INTERVAL: Final = 1.0
# At most one CallMeMaybe per peer this often: from a discovery round, and in answer to the
# peer's CallMeMaybe (static mode has no coordinator to hand out endpoints, so both sides must
# tell each other).
CALL_ME_MAYBE_INTERVAL: Final = 5.0
CALL_ME_MAYBE_ANSWER_INTERVAL: Final = 1.0  # answers to a peer's CallMeMaybe, at most this often

# --- bounds --------------------------------------------------------------------------------------
PONG_HISTORY_COUNT: Final = 64  # pongHistoryCount: pong results kept per candidate
MAX_CANDIDATES: Final = 64  # candidate endpoints kept per peer (config + CallMeMaybe + learned)
MAX_CALL_ME_MAYBE_ENDPOINTS: Final = 32  # endpoints taken from one CallMeMaybe
MAX_OUTSTANDING_PINGS: Final = 4096  # pings awaiting a pong, all peers together


@dataclass(frozen=True, slots=True)
class Timings:
    """The engine's timing policy; the defaults are the constants above."""

    heartbeat_interval: float = HEARTBEAT_INTERVAL
    trust_udp_addr: float = TRUST_UDP_ADDR_DURATION
    disco_ping_interval: float = DISCO_PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    session_active_timeout: float = SESSION_ACTIVE_TIMEOUT
    upgrade_udp_direct_interval: float = UPGRADE_UDP_DIRECT_INTERVAL
    good_enough_latency: float = GOOD_ENOUGH_LATENCY
    heartbeat_pong_deadline: float = HEARTBEAT_PONG_DEADLINE
    silent_path_probe: float = SILENT_PATH_PROBE
    ping_back_interval: float = PING_BACK_INTERVAL
    call_me_maybe_interval: float = CALL_ME_MAYBE_INTERVAL
    call_me_maybe_answer_interval: float = CALL_ME_MAYBE_ANSWER_INTERVAL

    def heartbeat_late_after(self, latency: float | None) -> float:
        """How long a heartbeat pong may take before the best path loses its trust."""
        floor = self.heartbeat_pong_deadline
        return min(self.ping_timeout, max(floor, 3 * latency if latency is not None else floor))

    def silent_after(self, latency: float | None) -> float:
        """How long a trusted direct path we send on may return nothing before it is probed."""
        floor = self.silent_path_probe
        return max(floor, 2 * latency) if latency is not None else floor


DEFAULT_TIMINGS: Final = Timings()
