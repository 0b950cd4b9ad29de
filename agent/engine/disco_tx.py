"""The DISCO transaction table: pings we sent and still wait a pong for.

Each sent ping is a `SentPing` (peer, destination, time, purpose). A destination is a UDP
endpoint or a DERP pseudo-endpoint (`derp_endpoint(region)`). Discovery and heartbeat pings get
one fresh 12-byte TxID per destination, as tailscaled does; a ping asked for by `agent ping`
goes to several destinations under one TxID, and its pongs are told apart by where they arrive.

A ping fails PING_TIMEOUT after it was sent; a heartbeat ping to the trusted best path is also
"late" after `Timings.heartbeat_late_after`; `due(now)` returns both kinds, which the engine
uses to stop trusting the path before its trust window lapses. The table is bounded
(MAX_OUTSTANDING_PINGS, the oldest ping is forgotten first). Deadlines live in a heap with lazy
invalidation: an entry whose ping is gone (answered or evicted) is skipped when popped.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from agent.engine.paths import Endpoint, derp_region_of
from agent.engine.timings import MAX_OUTSTANDING_PINGS
from agent.keys import NodePublic

__all__ = ["PingPurpose", "SentPing", "TxTable"]


class PingPurpose(Enum):
    DISCOVERY = "discovery"  # find or re-check candidate paths
    HEARTBEAT = "heartbeat"  # keep the best path trusted while the session is active
    CLI = "cli"  # `agent ping`
    BIRTHDAY = "birthday"  # a birthday round's ping (engine/birthday.py): no candidate's ping


@dataclass(frozen=True, slots=True)
class SentPing:
    tx_id: bytes
    key: NodePublic
    dest: Endpoint
    sent_at: float
    purpose: PingPurpose
    timeout_at: float
    late_at: float | None = None  # heartbeat to the trusted best path only

    @property
    def via_derp(self) -> bool:
        return derp_region_of(self.dest) is not None


_TIMEOUT = 0
_LATE = 1


class TxTable:
    """Outstanding pings by (TxID, destination). Owned by the PathEngine."""

    def __init__(self, capacity: int = MAX_OUTSTANDING_PINGS) -> None:
        self.capacity = capacity
        self._pings: OrderedDict[tuple[bytes, Endpoint], SentPing] = OrderedDict()
        self._by_tx: dict[bytes, list[Endpoint]] = {}
        self._heap: list[tuple[float, int, int, bytes, Endpoint]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pings)

    def add(self, ping: SentPing) -> None:
        ident = (ping.tx_id, ping.dest)
        if ident in self._pings:
            self._forget(ident)
        while len(self._pings) >= self.capacity:
            self._forget(next(iter(self._pings)))
        self._pings[ident] = ping
        self._by_tx.setdefault(ping.tx_id, []).append(ping.dest)
        heapq.heappush(self._heap, (ping.timeout_at, next(self._seq), _TIMEOUT, *ident))
        if ping.late_at is not None:
            heapq.heappush(self._heap, (ping.late_at, next(self._seq), _LATE, *ident))
        self._compact()

    def _forget(self, ident: tuple[bytes, Endpoint]) -> SentPing | None:
        ping = self._pings.pop(ident, None)
        if ping is None:
            return None
        dests = self._by_tx.get(ident[0])
        if dests is not None:
            dests.remove(ident[1])
            if not dests:
                del self._by_tx[ident[0]]
        return ping

    def match(self, tx_id: bytes, arrived_from: Endpoint, key: NodePublic) -> SentPing | None:
        """Remove and return the ping to peer `key` that a pong with `tx_id`, arriving from
        `arrived_from`, answers (None if there is none).

        A TxID sent to one destination matches whatever the pong's way back (tailscaled: the
        path is where the ping went). A TxID sent to several needs the pong to arrive from one
        of them, or through DERP for the DERP one.
        """
        dests = self._by_tx.get(tx_id)
        if not dests or self._pings[(tx_id, dests[0])].key != key:
            return None
        if len(dests) == 1:
            return self._forget((tx_id, dests[0]))
        if arrived_from in dests:
            return self._forget((tx_id, arrived_from))
        if derp_region_of(arrived_from) is not None:
            for dest in dests:
                if derp_region_of(dest) is not None:
                    return self._forget((tx_id, dest))
        return None

    def drop_peer(self, key: NodePublic) -> None:
        for ident in [i for i, p in self._pings.items() if p.key == key]:
            self._forget(ident)

    def due(self, now: float) -> tuple[list[SentPing], list[SentPing]]:
        """(late, expired) at `now`: late heartbeats stay outstanding, expired pings are removed."""
        late: list[SentPing] = []
        expired: list[SentPing] = []
        while self._heap and self._heap[0][0] <= now:
            when, _, kind, tx_id, dest = heapq.heappop(self._heap)
            ping = self._pings.get((tx_id, dest))
            if ping is None:
                continue
            if kind == _TIMEOUT and ping.timeout_at == when:
                self._forget((tx_id, dest))
                expired.append(ping)
            elif kind == _LATE and ping.late_at == when:
                late.append(ping)
        return late, expired

    def next_deadline(self) -> float | None:
        while self._heap and (self._heap[0][3], self._heap[0][4]) not in self._pings:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def _compact(self) -> None:
        if len(self._heap) > 4 * len(self._pings) + 64:
            self._heap = [e for e in self._heap if (e[3], e[4]) in self._pings]
            heapq.heapify(self._heap)
