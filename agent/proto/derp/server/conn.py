"""One relay connection's state, and how its byte stream is cut into frames.

A connection is a row in the core's table, not an object with behaviour: the concern modules
(`login`, `routing`, `mesh`, `ratelimit`) each own some of its fields, named in the comments.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, TypeAlias

from agent.proto.derp.frames import (
    FRAME_HEADER,
    FRAME_HEADER_LEN,
    KEEPALIVE_INTERVAL,
    MAX_FRAME_SIZE,
    FrameTooLarge,
    PeerPresentFlags,
    max_payload_len,
)

__all__ = [
    "NOT_HERE_BURST",
    "NOT_HERE_RATE",
    "OPEN",
    "Conn",
    "ConnState",
    "IPAddress",
    "KeySet",
    "check_length",
    "endpoint",
    "fill_frame",
]

NOT_HERE_RATE: Final = (
    1.0  # PeerGone(NotHere) per second per connection, burst 3 (derpserver.go peerGoneLim)
)
NOT_HERE_BURST: Final = 3.0

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConnState(Enum):
    AWAIT_CLIENT_INFO = auto()
    REGISTERED = auto()
    CLOSED = auto()


OPEN: Final = frozenset({ConnState.AWAIT_CLIENT_INFO, ConnState.REGISTERED})


@dataclass(slots=True, eq=False)
class Conn:
    """One stream. Buffers and sets are created on first use: most connections are idle."""

    conn_id: int
    deadline: float | None  # ClientInfo deadline, then the next KeepAlive; None once closed
    endpoint: tuple[IPAddress, int] | None = None
    state: ConnState = ConnState.AWAIT_CLIENT_INFO
    key: bytes | None = None
    out: bytearray | None = None  # pending output; the id is in RelayCore._dirty while set
    partial: bytearray | None = None  # an incomplete frame (header first) from the last input
    keepalive_period: float = KEEPALIVE_INTERVAL
    pong_pending: bool = False
    preferred: bool = False
    # Owned by routing.
    heard_from: set[bytes] | None = None  # keys that sent this conn a packet
    not_here_tokens: float = NOT_HERE_BURST
    not_here_at: float = 0.0
    # Owned by login and mesh.
    mesh: bool = False  # logged in with our mesh key
    watching: bool = False  # mesh peer that sent WatchConns
    flags: PeerPresentFlags = PeerPresentFlags.IS_REGULAR
    # Owned by ratelimit. rate 0: unlimited, and `partial` means an incomplete frame as above;
    # rate > 0: `partial` holds every byte received and not yet acted on (complete frames too).
    rate: float = 0.0  # bytes/s
    burst: float = 0.0
    tokens: float = 0.0
    tokens_at: float = 0.0
    paused_at: float | None = None  # since when the shell was told to stop reading
    resume_at: float | None = None  # throttle deadline; in RelayCore._throttle while set


@dataclass(slots=True)
class KeySet:
    """The local connections of one client key; `active` is the one packets go to
    (derpserver.go dupClientSet, last writer is active)."""

    conns: list[int]
    active: int | None


def endpoint(peer_addr: tuple[str, int] | None) -> tuple[IPAddress, int] | None:
    if peer_addr is None:
        return None
    try:
        return ipaddress.ip_address(peer_addr[0].partition("%")[0]), peer_addr[1]
    except ValueError:
        return None


def fill_frame(partial: bytearray, data: bytes) -> int:
    """Move bytes from `data` into the incomplete frame `partial` (header first, its length
    checked) until it is complete: how many were taken, or -1 if all of `data` went in and
    it is still incomplete."""
    pos = 0
    if len(partial) < FRAME_HEADER_LEN:
        pos = min(FRAME_HEADER_LEN - len(partial), len(data))
        partial += data[:pos]
        if len(partial) < FRAME_HEADER_LEN:
            return -1
        check_length(*FRAME_HEADER.unpack_from(partial))
    length: int = FRAME_HEADER.unpack_from(partial)[1]
    need = FRAME_HEADER_LEN + length - len(partial)
    take = min(need, len(data) - pos)
    partial += memoryview(data)[pos : pos + take]
    return pos + take if take == need else -1


def check_length(frame_type: int, length: int) -> None:
    """FrameTooLarge for a header announcing more than its type (or any frame) may carry."""
    limit = max_payload_len(frame_type)
    if limit is None or limit > MAX_FRAME_SIZE:
        limit = MAX_FRAME_SIZE
    if length > limit:
        raise FrameTooLarge(f"frame type {frame_type:#04x} of {length} bytes (limit {limit})")
