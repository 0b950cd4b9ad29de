"""Handshake load: when the device counts as under load, and the per-source token buckets that
then limit handshake messages (whitepaper §5.3; wireguard-go device/device.go IsUnderLoad and
ratelimiter/ratelimiter.go).

Under load, a handshake message must carry a valid mac2 (else it gets a cookie reply) and pass
its source address's bucket before the device spends a Diffie-Hellman on it.
"""

from __future__ import annotations

import ipaddress

from agent.proto.wireguard.constants import RATELIMIT_BURST, RATELIMIT_PACKETS_PER_SECOND
from agent.proto.wireguard.events import Endpoint

__all__ = [
    "LoadMonitor",
    "RateLimiter",
    "source_bytes",
]


class LoadMonitor:
    """Counts handshake messages per one-second window; more than `threshold` in a window puts
    the device under load for the next second."""

    __slots__ = ("_threshold", "_until", "_window")

    def __init__(self, threshold: int) -> None:
        self._threshold = threshold
        self._window = (0.0, 0)  # (window start, handshake messages in it)
        self._until = -1.0

    def under_load(self, now: float) -> bool:
        """Count one handshake message at `now`; whether the device is under load."""
        start, count = self._window
        if now - start >= 1.0:
            start, count = now, 0
        count += 1
        self._window = (start, count)
        if count > self._threshold:
            self._until = now + 1.0
        return now < self._until


class RateLimiter:
    """Token bucket per source address, used only while under load (wireguard-go ratelimiter)."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def allow(self, source: bytes, now: float) -> bool:
        tokens, last = self._buckets.get(source, (float(RATELIMIT_BURST), now))
        tokens = min(float(RATELIMIT_BURST), tokens + (now - last) * RATELIMIT_PACKETS_PER_SECOND)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > 65536:
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 1.0}
        return allowed


def source_bytes(src: Endpoint) -> bytes:
    """The source as mac2 and the buckets key it: packed address + big-endian port."""
    try:
        return ipaddress.ip_address(src[0]).packed + src[1].to_bytes(2, "big")
    except ValueError:
        return src[0].encode() + src[1].to_bytes(2, "big")
