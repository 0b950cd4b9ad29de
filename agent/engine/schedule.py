"""When to ping: per-peer activity, heartbeat and CallMeMaybe pacing, and a deadline heap.

`PunchSchedule` is the per-peer clock of the hole-punch machinery (shared/spec/derp-disco.md
§8.5-§8.6), as named deadlines set by hooks:

    note_send(now)          we sent (or are about to send) data: the session is active; arms
                            the heartbeat if it is not running
    on_heartbeat(now)       the heartbeat fired: True and re-armed while the session is
                            active (data sent within SESSION_ACTIVE_TIMEOUT), else disarmed
    note_full_ping(now)     a discovery round ran (pings to every due candidate)
    may_call_me_maybe(now)  at most one CallMeMaybe per CALL_ME_MAYBE_INTERVAL
    note_call_me_maybe(now) one was sent

`Deadlines` keeps one deadline per key in a heap with lazy invalidation (re-arming pushes a new
entry; stale ones are skipped when they surface), so the engine can answer `next_deadline()`
and find due peers without scanning them all.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.engine.timings import Timings

__all__ = ["PunchSchedule", "Deadlines"]

K = TypeVar("K", bound=Hashable)


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


class Deadlines(Generic[K]):
    """One optional deadline per key; `due(now)` pops the keys whose deadline has come."""

    def __init__(self) -> None:
        self._at: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()

    def set(self, key: K, when: float | None) -> None:
        if when is None:
            self._at.pop(key, None)
            return
        if self._at.get(key) == when:
            return
        self._at[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        if len(self._heap) > 4 * len(self._at) + 64:
            self._heap = [e for e in self._heap if self._at.get(e[2]) == e[0]]
            heapq.heapify(self._heap)

    def get(self, key: K) -> float | None:
        return self._at.get(key)

    def due(self, now: float) -> list[K]:
        """Keys whose deadline is <= now, earliest first; their deadlines are cleared."""
        out: list[K] = []
        while self._heap and self._heap[0][0] <= now:
            when, _, key = heapq.heappop(self._heap)
            if self._at.get(key) == when:
                del self._at[key]
                out.append(key)
        return out

    def next(self) -> float | None:
        while self._heap and self._at.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None
