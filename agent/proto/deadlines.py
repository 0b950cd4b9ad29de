"""One optional deadline per key, in a heap with lazy invalidation.

Re-arming a key pushes a new entry; the stale ones are skipped when they surface (and the heap is
rebuilt when stale entries outnumber live ones by far). `next()` and `due(now)` cost O(log n)
per change instead of a scan over every key, which matters with a thousand peers and a timer
re-armed after every batch. Used by the WireGuard core (peer timers) and the path engine.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


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
