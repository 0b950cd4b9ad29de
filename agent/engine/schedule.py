"""When to ping: per-peer activity, heartbeat and CallMeMaybe pacing, and a deadline heap.

`PunchSchedule` is the per-peer clock of the hole-punch machinery (tailscale's
wgengine/magicsock/endpoint.go), as named deadlines set by hooks:

    note_send(now)          we sent (or are about to send) data: the session is active; arms
                            the heartbeat if it is not running
    on_heartbeat(now)       the heartbeat fired: True and re-armed while the session is
                            active (data sent within SESSION_ACTIVE_TIMEOUT), else disarmed
    note_full_ping(now)     a discovery round ran (pings to every due candidate)
    may_call_me_maybe(now)  at most one CallMeMaybe per CALL_ME_MAYBE_INTERVAL
    note_call_me_maybe(now) one was sent

`Deadlines` (agent/proto/deadlines.py, shared with the WireGuard core) keeps one deadline per
peer in a heap, so the engine can answer `next_deadline()` and find due peers without scanning
them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.engine.timings import Timings
from agent.proto.deadlines import Deadlines

__all__ = ["PunchSchedule", "Deadlines"]


@dataclass(slots=True)
class PunchSchedule:
    """One peer's activity and pacing state. Owned by its PeerPath."""

    last_send: float | None = None  # lastSendExt: data or `agent ping` towards the peer
    heartbeat_at: float | None = None
    last_full_ping: float | None = None
    last_call_me_maybe: float | None = None
    last_call_me_maybe_answer: float | None = None

    def note_send(self, now: float, t: Timings) -> None:
        """Outgoing data: the session is active; start heartbeating if not already."""
        self.last_send = now
        if self.heartbeat_at is None:
            self.heartbeat_at = now + t.heartbeat_interval

    def active(self, now: float, t: Timings) -> bool:
        return self.last_send is not None and now - self.last_send <= t.session_active_timeout

    def heartbeat_due(self, now: float) -> bool:
        return self.heartbeat_at is not None and self.heartbeat_at <= now

    def on_heartbeat(self, now: float, t: Timings) -> bool:
        """The heartbeat fired: re-armed and True while active; disarmed and False when idle."""
        if not self.active(now, t):
            self.heartbeat_at = None
            return False
        self.heartbeat_at = now + t.heartbeat_interval
        return True

    def note_full_ping(self, now: float) -> None:
        self.last_full_ping = now

    def may_call_me_maybe(self, now: float, t: Timings) -> bool:
        last = self.last_call_me_maybe
        return last is None or now - last >= t.call_me_maybe_interval

    def note_call_me_maybe(self, now: float) -> None:
        self.last_call_me_maybe = now

    def may_answer_call_me_maybe(self, now: float, t: Timings) -> bool:
        """An answer to a received CallMeMaybe may go out inside the pacing interval (our last
        one may have been lost before the peer joined the relay), but at most one per
        `call_me_maybe_answer_interval`: two nodes answering each other cannot loop."""
        last = self.last_call_me_maybe_answer
        return last is None or now - last >= t.call_me_maybe_answer_interval

    def note_call_me_maybe_answer(self, now: float) -> None:
        self.last_call_me_maybe_answer = now
        self.last_call_me_maybe = now
