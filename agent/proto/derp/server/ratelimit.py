"""Relay receive rate limit (off until `set_rate_limit`), as derper's per-client limiter
(tailscale derp/derpserver/derpserver.go, set from cmd/derper's --rate-config).

A token bucket per registered non-mesh connection, `burst` bytes deep (at least
RATE_LIMIT_MIN_BURST), refilled at `bytes_per_sec`. Each frame's payload length, capped at
RATE_LIMIT_MIN_BURST, is charged before the frame is acted on. A frame the bucket cannot pay for
waits, it is never dropped: the core keeps it and everything after it (in `Conn.partial`), emits
PauseReading and arms a throttle deadline for when the tokens will be there (RATE_LIMIT_MIN_WAIT
at least, so a throttled sender wakes the loop at most 1/RATE_LIMIT_MIN_WAIT times a second).
The shell stops reading that stream (TCP back-pressure reaches the sender); `on_timer` acts on
what the tokens then cover, and emits ResumeReading once nothing waits. Unthrottled connections
never reach this code: `receive_data` checks one field.
"""

from __future__ import annotations

import heapq
from typing import Final

from agent.proto.derp.frames import FRAME_HEADER, FRAME_HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE
from agent.proto.derp.server.base import RelayBase
from agent.proto.derp.server.conn import Conn, ConnState, check_length, fill_frame
from agent.proto.derp.server.events import PauseReading, ResumeReading
from agent.proto.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["RATE_LIMIT_MIN_BURST", "RATE_LIMIT_MIN_WAIT", "RateLimit"]

RATE_LIMIT_MIN_BURST: Final = MAX_PACKET_SIZE + KEY_LEN  # 65568: bucket floor and charge cap
RATE_LIMIT_MIN_WAIT: Final = 0.01  # a throttled connection is looked at again after >= 10 ms


class RateLimit(RelayBase):
    """Token buckets, pausing and resuming reads, and the throttle deadline heap."""

    def __init__(self) -> None:
        super().__init__()
        self._rate = 0.0  # receive limit for new non-mesh registrations, bytes/s (0: none)
        self._burst = float(RATE_LIMIT_MIN_BURST)
        self._throttle: list[tuple[float, int]] = []  # heap; stale when != Conn.resume_at
        self._paused = 0  # connections the shell was told to stop reading

    def rate_limit(self) -> tuple[float, float]:
        """(bytes per second, burst bytes) of the receive limit; (0, ...) when it is off."""
        return self._rate, self._burst

    def paused_count(self) -> int:
        """Connections currently throttled (the shell is not reading them)."""
        return self._paused

    def set_rate_limit(self, bytes_per_sec: float, burst: float, now: float) -> None:
        """Limit every non-mesh client's receive rate (0 turns the limit off); `burst` is raised
        to RATE_LIMIT_MIN_BURST. Applies to connections already registered too, each with a full
        bucket (derper's UpdateRateLimits); the only call that walks every connection."""
        if bytes_per_sec < 0 or burst < 0:
            raise LocalProtocolError("rate limit and burst must not be negative")
        self._rate = float(bytes_per_sec)
        self._burst = max(float(burst), float(RATE_LIMIT_MIN_BURST))
        for conn in list(self._conns.values()):
            if conn.state is not ConnState.REGISTERED or conn.mesh:
                continue
            if self._rate:
                was_limited = bool(conn.rate)
                self._start_bucket(conn, now)
                if not was_limited:
                    continue  # its `partial` is at most one incomplete frame: still valid
            else:
                conn.rate = 0.0
            self._wake(conn, now)

    def _limit_new_client(self, conn: Conn, now: float) -> None:
        """Hook: a non-mesh client registered; it gets a full bucket if a limit is on."""
        if self._rate:
            self._start_bucket(conn, now)

    def _start_bucket(self, conn: Conn, now: float) -> None:
        conn.rate = self._rate
        conn.burst = self._burst
        conn.tokens = self._burst
        conn.tokens_at = now

    def _receive_limited(self, conn: Conn, chunk: bytes, now: float) -> None:
        """Input for a rate-limited connection: queued behind what waits already, then acted
        on as far as its tokens go."""
        held = conn.partial
        start = 0
        if held is not None:
            if conn.resume_at is not None:  # throttled: its deadline comes first
                held += chunk
                return
            # Not throttled, so `held` is one incomplete frame: complete it, act on it (or wait
            # for its tokens), then go on in the chunk itself.
            start = fill_frame(held, chunk)
            if start < 0:
                return
            self._drain_limited(conn, now)
            if conn.partial is not None:  # it waits for tokens: so does the rest
                if conn.state is ConnState.REGISTERED:
                    conn.partial += memoryview(chunk)[start:]
                return
            if conn.state is not ConnState.REGISTERED:
                return
        if start < len(chunk):
            self._drain_limited(conn, now, chunk, start)  # in place: no copy of what is paid for

    def _drain_limited(
        self, conn: Conn, now: float, chunk: bytes | None = None, start: int = 0
    ) -> None:
        """Act on the complete frames the bucket pays for, from `chunk[start:]` (nothing held)
        or else from what is held; keep the rest; pause or resume reading."""
        held = conn.partial
        rate = conn.rate
        buf: bytes | bytearray
        if chunk is not None:
            buf = chunk
        elif held is not None:
            buf = held
        else:
            self._end_pause(conn, now, resume=True)
            return
        tokens = conn.tokens
        if rate:
            tokens = min(conn.burst, tokens + (now - conn.tokens_at) * rate)
            conn.tokens_at = now
        end = len(buf)
        pos = start
        short = 0.0
        unpack = FRAME_HEADER.unpack_from
        while end - pos >= FRAME_HEADER_LEN:
            frame_type, length = unpack(buf, pos)
            if end - pos - FRAME_HEADER_LEN < length:
                check_length(frame_type, length)  # _frames checks the complete ones
                break  # incomplete
            if rate:
                cost = length if length < RATE_LIMIT_MIN_BURST else RATE_LIMIT_MIN_BURST
                if tokens < cost:
                    short = cost - tokens
                    break
                tokens -= cost
            pos += FRAME_HEADER_LEN + length
        conn.tokens = tokens
        if chunk is not None:
            if pos < end:
                conn.partial = bytearray(memoryview(chunk)[pos:])
            if pos > start:
                self._frames(conn, chunk, start, now, pos)
        elif held is not None and pos:
            if rate:
                frames = bytes(memoryview(held)[:pos])
                del held[:pos]  # O(1): bytearray moves its start
                if not held:
                    conn.partial = None
            else:  # the limit was lifted: everything as usual, an incomplete tail included
                frames = bytes(held)
                conn.partial = None
            self._frames(conn, frames, 0, now)
        if conn.state is not ConnState.REGISTERED:
            return
        if not short:
            self._end_pause(conn, now, resume=True)
            return
        until = now + max(short / rate, RATE_LIMIT_MIN_WAIT)
        conn.resume_at = until
        heapq.heappush(self._throttle, (until, conn.conn_id))
        if conn.paused_at is None:
            conn.paused_at = now
            self._paused += 1
            self.counters.throttle_pauses += 1
            self._events.append(PauseReading(conn.conn_id, until))
        else:
            self.counters.throttled_seconds += now - conn.paused_at
            conn.paused_at = now

    def _wake(self, conn: Conn, now: float) -> None:
        conn.resume_at = None
        try:
            self._drain_limited(conn, now)
        except RemoteProtocolError as exc:  # a held frame turned out bad: as in receive_data
            conn.partial = None
            self._close(conn, f"protocol error: {exc}")

    def _resume_throttled(self, now: float) -> None:
        throttle, conns = self._throttle, self._conns
        while throttle and throttle[0][0] <= now:
            deadline, conn_id = heapq.heappop(throttle)
            conn = conns.get(conn_id)
            if conn is not None and conn.resume_at == deadline:
                self._wake(conn, now)

    def _next_resume(self) -> float | None:
        throttle, conns = self._throttle, self._conns
        while throttle:
            deadline, conn_id = throttle[0]
            conn = conns.get(conn_id)
            if conn is not None and conn.resume_at == deadline:
                return deadline
            heapq.heappop(throttle)
        return None

    def _end_pause(self, conn: Conn, now: float | None, *, resume: bool = False) -> None:
        """Hook: nothing waits on the bucket any more (or the connection is going away)."""
        conn.resume_at = None
        if conn.paused_at is None:
            return
        if now is not None:
            self.counters.throttled_seconds += now - conn.paused_at
        conn.paused_at = None
        self._paused -= 1
        if resume:
            self._events.append(ResumeReading(conn.conn_id))
