"""Any DERP frame: the `Frame` union, parsing by type byte, and the streaming `FrameBuffer`.

`FrameBuffer` turns a byte stream into frames, refusing a header whose length is over the limit
before any of its body is buffered. Receive paths raise only RemoteProtocolError subclasses:
MalformedPacket, FrameTooLarge, AuthenticationFailed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeAlias

from agent.proto.derp.frames.control import (
    Health,
    KeepAlive,
    Ping,
    Pong,
    Restarting,
    UnknownFrame,
)
from agent.proto.derp.frames.header import (
    FRAME_HEADER,
    FRAME_HEADER_LEN,
    MAX_FRAME_SIZE,
    MAX_PAYLOAD,
    Buffer,
    FrameTooLarge,
)
from agent.proto.derp.frames.login import (
    ClientInfo,
    ServerInfo,
    ServerKey,
)
from agent.proto.derp.frames.packets import (
    ForwardPacket,
    RecvPacket,
    SendPacket,
)
from agent.proto.derp.frames.peers import (
    ClosePeer,
    NotePreferred,
    PeerGone,
    PeerPresent,
    WatchConns,
)
from agent.proto.errors import (
    LocalProtocolError,
    MalformedPacket,
    RemoteProtocolError,
)

__all__ = [
    "Frame",
    "parse_frame",
    "parse_any",
    "FrameBuffer",
]

Frame: TypeAlias = (
    ServerKey | ClientInfo | ServerInfo | SendPacket | RecvPacket | KeepAlive | NotePreferred
    | PeerGone | PeerPresent | ForwardPacket | WatchConns | ClosePeer | Ping | Pong | Health
    | Restarting | UnknownFrame
)  # fmt: skip

_KNOWN: Final = (
    ServerKey, ClientInfo, ServerInfo, SendPacket, RecvPacket, KeepAlive, NotePreferred, PeerGone,
    PeerPresent, ForwardPacket, WatchConns, ClosePeer, Ping, Pong, Health, Restarting,
)  # fmt: skip
_PARSERS: Final[dict[int, Callable[[Buffer], Frame]]] = {
    cls.frame_type: cls.parse for cls in _KNOWN
}


def parse_frame(frame_type: int, payload: Buffer) -> Frame:
    """Parse one payload by its type byte; unknown types become UnknownFrame."""
    parse = _PARSERS.get(frame_type)
    if parse is None:
        if not 0 <= frame_type <= 0xFF:
            raise MalformedPacket(f"frame type {frame_type} is not a byte")
        return UnknownFrame(frame_type, bytes(payload))
    return parse(payload)


def parse_any(data: Buffer) -> Frame:
    """Parse exactly one complete frame, header included."""
    if len(data) < FRAME_HEADER_LEN:
        raise MalformedPacket(f"frame of {len(data)} bytes is shorter than its header")
    frame_type, length = FRAME_HEADER.unpack_from(data)
    if length != len(data) - FRAME_HEADER_LEN:
        raise MalformedPacket(f"header says {length} bytes, got {len(data) - FRAME_HEADER_LEN}")
    return parse_frame(frame_type, memoryview(data)[FRAME_HEADER_LEN:])


class FrameBuffer:
    """Streaming frame parser: `feed` stream bytes, get back every frame they complete.

    A header over `max_frame_size` (or its known type's largest payload) raises FrameTooLarge as
    soon as its 5 bytes are in, before any body is kept. Any error, including a complete frame
    that does not parse, is fatal as it is for derper: frames completed earlier in the same call
    go with it, and every later call raises. `feed_raw` frames without parsing, for callers that
    prefer to parse (and drop) frames one at a time.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if max_frame_size < 0:
            raise LocalProtocolError("max_frame_size must not be negative")
        # Static after construction.
        self.max_frame_size = max_frame_size
        # Owned by feed_raw.
        self._buf = bytearray()
        self._type = 0
        self._need: int | None = None  # payload length of the frame being read; None = in header
        self._error: RemoteProtocolError | None = None

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete header or frame."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[Frame]:
        """Add stream bytes; return the frames they complete, parsed."""
        raw = self.feed_raw(data)
        try:
            return [parse_frame(frame_type, payload) for frame_type, payload in raw]
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def feed_raw(self, data: Buffer) -> list[tuple[int, bytes]]:
        """Add stream bytes; return `(type, payload)` for each frame they complete."""
        if self._error is not None:
            raise type(self._error)(f"stream failed earlier: {self._error}")
        view = memoryview(data).cast("B")
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(view)
        buf = self._buf
        try:
            while True:
                if self._need is None:
                    take = min(FRAME_HEADER_LEN - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < FRAME_HEADER_LEN:
                        break
                    frame_type, length = FRAME_HEADER.unpack(buf)
                    buf.clear()
                    self._check_length(frame_type, length)
                    self._type, self._need = frame_type, length
                need = self._need
                if not buf and end - pos >= need:
                    out.append((self._type, bytes(view[pos : pos + need])))
                    pos += need
                else:
                    take = min(need - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < need:
                        break
                    out.append((self._type, bytes(buf)))
                    buf.clear()
                self._need = None
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return out

    def _check_length(self, frame_type: int, length: int) -> None:
        limit = self.max_frame_size
        type_limit = MAX_PAYLOAD.get(frame_type)
        if type_limit is not None:
            limit = min(limit, type_limit)
        if length > limit:
            raise FrameTooLarge(f"frame type {frame_type:#04x} of {length} bytes (limit {limit})")

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._buf = bytearray()
        self._need = None
