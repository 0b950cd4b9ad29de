"""Flows as the packet filter tracks them: the flows this node opened, a printable `Flow` and
the per-flow log limiter.

`FlowTable` holds the flows this node opened whose replies may come back (UDP and SCTP by
5-tuple, ICMP echo by identifier), keyed as the outbound packet reads: (protocol, source,
destination and the ports or echo identifier). A flow lives while packets pass either way and
is forgotten `idle` seconds after the last one, or sooner when the table is full (least
recently used first). Time is the caller's monotonic clock, passed in.

`LogLimiter.should_log(flow, now)` answers True at most once per flow per `interval` seconds
(`now` is the caller's monotonic clock). It remembers at most `capacity` flows; when full, it
forgets flows whose interval has passed and, if none has, declines to log rather than forget a
flow it logged recently, so the once-per-interval promise holds under a flood of new flows.
"""

from __future__ import annotations

from collections import OrderedDict
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from agent.policy.packet import Parsed

__all__ = ["Flow", "FlowKey", "FlowTable", "LogLimiter"]

FlowKey = tuple[int, bytes]  # protocol, then source + destination + ports (or echo id) as sent


class FlowTable:
    """Open flows, each with the time after which it is gone; least recently used first."""

    __slots__ = ("capacity", "deadlines", "idle")

    def __init__(self, idle: float, capacity: int) -> None:
        if idle <= 0 or capacity <= 0:
            raise ValueError("idle and capacity must be positive")
        self.idle = idle
        self.capacity = capacity
        # Ordered by last use, so by deadline: the first entry is the next to expire.
        self.deadlines: OrderedDict[FlowKey, float] = OrderedDict()

    def touch(self, key: FlowKey, now: float) -> bool:
        """A packet of flow `key` passed at `now`; True if the flow is new (or had expired)."""
        deadlines = self.deadlines
        old = deadlines.get(key)
        deadlines[key] = now + self.idle
        if old is not None:
            deadlines.move_to_end(key)
            return old < now
        if len(deadlines) > self.capacity:
            deadlines.popitem(last=False)
        return True

    def alive(self, key: FlowKey, now: float) -> bool:
        return self.deadlines.get(key, -1.0) >= now

    def refresh(self, key: FlowKey, now: float) -> bool:
        """Whether flow `key` is open at `now`; if it is, a packet of it keeps it open."""
        deadlines = self.deadlines
        if deadlines.get(key, -1.0) < now:
            return False
        deadlines[key] = now + self.idle
        deadlines.move_to_end(key)
        return True

    def expire(self, now: float) -> int:
        """Forget the flows idle since before `now - idle`; how many went."""
        deadlines = self.deadlines
        gone = 0
        while deadlines:
            key, deadline = next(iter(deadlines.items()))
            if deadline >= now:
                break
            del deadlines[key]
            gone += 1
        return gone

    def __len__(self) -> int:
        return len(self.deadlines)


class Flow(NamedTuple):
    """One direction of one flow, for logs and the log limiter."""

    protocol: int
    src: IPv4Address | IPv6Address
    src_port: int
    dst: IPv4Address | IPv6Address
    dst_port: int

    @classmethod
    def of(cls, parsed: Parsed) -> Flow:
        port = parsed.icmp_id if parsed.icmp_type >= 0 else parsed.src_port
        dport = parsed.icmp_id if parsed.icmp_type >= 0 else parsed.dst_port
        return cls(parsed.protocol, parsed.src_address, port, parsed.dst_address, dport)

    def __str__(self) -> str:
        names = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
        proto = names.get(self.protocol, f"proto-{self.protocol}")
        src = f"[{self.src}]" if self.src.version == 6 else str(self.src)
        dst = f"[{self.dst}]" if self.dst.version == 6 else str(self.dst)
        return f"{proto} {src}:{self.src_port} -> {dst}:{self.dst_port}"


class LogLimiter:
    """At most one log line per flow per `interval` seconds, remembering `capacity` flows."""

    def __init__(self, interval: float = 60.0, capacity: int = 4096) -> None:
        if interval <= 0 or capacity <= 0:
            raise ValueError("interval and capacity must be positive")
        self.interval = interval
        self.capacity = capacity
        self._last: dict[Flow, float] = {}  # insertion order = order of last logging

    def should_log(self, flow: Flow, now: float) -> bool:
        last = self._last.get(flow)
        if last is not None and now - last < self.interval:
            return False
        if last is None and len(self._last) >= self.capacity and not self._expire(now):
            return False
        self._last.pop(flow, None)
        self._last[flow] = now
        return True

    def _expire(self, now: float) -> bool:
        """Forget flows logged an interval ago or more; whether any room was made."""
        freed = False
        while self._last:
            oldest = next(iter(self._last))
            if now - self._last[oldest] < self.interval:
                break
            del self._last[oldest]
            freed = True
        return freed

    def __len__(self) -> int:
        return len(self._last)
