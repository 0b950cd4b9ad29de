"""DERP relay core over many connections, sans-I/O (spec: shared/spec/derp-disco.md §3, §4).

Theory of operation: the shell picks an opaque int id per accepted stream, calls
`connection_made(id, now)` (which queues ServerKey), copies the stream's bytes into
`receive_data(id, data, now)`, writes `data_to_send(id)` back, drains `events()` and acts on
`CloseConnection`, and calls `on_timer(now)` at `next_deadline()`. Per connection:

    state               input                           action                      next state
    AWAIT_CLIENT_INFO   ClientInfo, opens, verified     send ServerInfo, register   REGISTERED
    AWAIT_CLIENT_INFO   anything else / bad box / reject, or CLIENT_INFO_TIMEOUT    CLOSED
    REGISTERED          SendPacket                      route (§4.2)                REGISTERED
    REGISTERED          Ping                            Pong (one pending at most)  REGISTERED
    REGISTERED          NotePreferred, unknown types    noted / discarded           REGISTERED
    REGISTERED          mesh-only frames (no mesh yet)  "insufficient permissions"  CLOSED

Duplicate keys (§4.1) follow derper's "last writer is active" policy: the newest connection is
active on registration, and afterwards whichever connection of the set last sent a frame. A set of
2+ connections without an active one drops packets as `dup_client`. PeerGone(Disconnected) goes to
every client that has received a packet from a key once that key's last connection closes (§4.3).
Mesh (WatchConns, PeerPresent, ForwardPacket, ClosePeer) is not implemented: those frames close
the connection as derper does for connections without the mesh key.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Final, TypeAlias

from nacl.public import PrivateKey

from agent.proto.derp.frames import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    NONCE_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    FrameBuffer,
    FrameType,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    Ping,
    Pong,
    RecvPacket,
    SendPacket,
    ServerInfo,
    ServerKey,
    open_client_info,
    seal_server_info,
)
from agent.proto.errors import LocalProtocolError, MalformedPacket, RemoteProtocolError

__all__ = [
    "CLIENT_INFO_TIMEOUT",
    "ConnState",
    "RelayCore",
    "ClientRegistered",
    "CloseConnection",
    "RelayEvent",
]

CLIENT_INFO_TIMEOUT: Final = 10.0  # server deadline to receive ClientInfo (§3.1)
_DISCO_MAGIC: Final = "TS💬".encode()  # §8.1
_DISCO_MIN_LEN: Final = 62
_NOT_HERE_RATE: Final = 1.0  # PeerGone(NotHere) per second per connection, burst 3 (§4.2)
_NOT_HERE_BURST: Final = 3.0
_MESH_ONLY: Final = frozenset(
    {FrameType.FORWARD_PACKET, FrameType.WATCH_CONNS, FrameType.CLOSE_PEER}
)


class ConnState(Enum):
    AWAIT_CLIENT_INFO = auto()
    REGISTERED = auto()
    CLOSED = auto()


_OPEN: Final = frozenset({ConnState.AWAIT_CLIENT_INFO, ConnState.REGISTERED})


@dataclass(frozen=True, slots=True)
class ClientRegistered:
    conn_id: int
    key: bytes
    info: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """The shell must close this stream (after flushing `data_to_send`, if it likes)."""

    conn_id: int
    reason: str


RelayEvent: TypeAlias = ClientRegistered | CloseConnection


@dataclass(slots=True)
class _Conn:
    conn_id: int
    frames: FrameBuffer
    handshake_deadline: float
    state: ConnState = ConnState.AWAIT_CLIENT_INFO
    key: bytes | None = None
    out: bytearray = field(default_factory=bytearray)
    keepalive_at: float | None = None
    keepalive_period: float = KEEPALIVE_INTERVAL
    pong_pending: bool = False
    preferred: bool = False
    heard_from: set[bytes] = field(default_factory=set)  # keys that sent this conn a packet
    not_here_tokens: float = _NOT_HERE_BURST
    not_here_at: float = 0.0


@dataclass(slots=True)
class _KeySet:
    conns: list[int]
    active: int | None


def _looks_like_disco(packet: bytes) -> bool:
    return len(packet) >= _DISCO_MIN_LEN and packet.startswith(_DISCO_MAGIC)


class RelayCore:
    """The relay: registration, routing, PeerGone bookkeeping, Ping/Pong and keepalives."""

    def __init__(
        self,
        server_private: bytes,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        verify_client: Callable[[bytes], bool] | None = None,
    ) -> None:
        if len(server_private) != 32:
            raise LocalProtocolError("server private key must be 32 bytes")
        # Static after construction.
        self._private = server_private
        self.public_key = bytes(PrivateKey(server_private).public_key)
        self._randbytes = randbytes
        self._verify_client = verify_client
        # Owned by the core.
        self._conns: dict[int, _Conn] = {}
        self._clients: dict[bytes, _KeySet] = {}
        self._events: list[RelayEvent] = []
        self.drops: dict[str, int] = {}

    # --- outputs --------------------------------------------------------------------------------

    def data_to_send(self, conn_id: int) -> bytes:
        conn = self._conns.get(conn_id)
        if conn is None:
            return b""
        out = bytes(conn.out)
        conn.out.clear()
        conn.pong_pending = False
        return out

    def events(self) -> list[RelayEvent]:
        events, self._events = self._events, []
        return events

    def clients(self) -> dict[bytes, list[int]]:
        """Registered keys and their connection ids (active one first when there is one)."""
        result: dict[bytes, list[int]] = {}
        for key, kset in self._clients.items():
            ids = sorted(kset.conns, key=lambda c: c != kset.active)
            result[key] = ids
        return result

    # --- connection lifecycle -------------------------------------------------------------------

    def connection_made(self, conn_id: int, now: float) -> None:
        if conn_id in self._conns:
            raise LocalProtocolError(f"connection {conn_id} already exists")
        conn = _Conn(conn_id, FrameBuffer(), now + CLIENT_INFO_TIMEOUT)
        conn.out += ServerKey(self.public_key).encode()
        self._conns[conn_id] = conn

    def connection_lost(self, conn_id: int) -> None:
        conn = self._conns.pop(conn_id, None)
        if conn is not None:
            self._unregister(conn)

    # --- timers ---------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [d for conn in self._conns.values() for d in self._conn_deadlines(conn)]
        return min(deadlines, default=None)

    @staticmethod
    def _conn_deadlines(conn: _Conn) -> list[float]:
        if conn.state is ConnState.AWAIT_CLIENT_INFO:
            return [conn.handshake_deadline]
        if conn.state is ConnState.REGISTERED and conn.keepalive_at is not None:
            return [conn.keepalive_at]
        return []

    def on_timer(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.state is ConnState.AWAIT_CLIENT_INFO and now >= conn.handshake_deadline:
                self._close(conn, "timeout waiting for ClientInfo")
            elif (
                conn.state is ConnState.REGISTERED
                and conn.keepalive_at is not None
                and now >= conn.keepalive_at
            ):
                conn.out += KeepAlive().encode()
                while conn.keepalive_at <= now:
                    conn.keepalive_at += conn.keepalive_period

    # --- receive --------------------------------------------------------------------------------

    def receive_data(self, conn_id: int, data: bytes, now: float) -> None:
        """Feed one connection's bytes. A protocol error closes that connection only, emits
        CloseConnection and raises RemoteProtocolError."""
        conn = self._conns.get(conn_id)
        if conn is None:
            raise LocalProtocolError(f"unknown connection {conn_id}")
        if conn.state is ConnState.CLOSED:
            return
        try:
            for frame_type, payload in conn.frames.feed_raw(data):
                if conn.state not in _OPEN:  # closed by an earlier frame of this batch
                    break
                self._handle(conn, frame_type, payload, now)
        except RemoteProtocolError as exc:
            self._close(conn, f"protocol error: {exc}")
            raise

    def _handle(self, conn: _Conn, frame_type: int, payload: bytes, now: float) -> None:
        if conn.state is ConnState.AWAIT_CLIENT_INFO:
            if frame_type != FrameType.CLIENT_INFO:
                raise MalformedPacket(f"expected ClientInfo, got frame type {frame_type:#04x}")
            self._on_client_info(conn, ClientInfo.parse(payload), now)
            return
        self._note_activity(conn)
        if frame_type == FrameType.SEND_PACKET:
            frame = SendPacket.parse(payload)
            self._route(conn, frame.dst, frame.packet, now)
        elif frame_type == FrameType.PING:
            ping = Ping.parse(payload)
            if not conn.pong_pending:
                conn.out += Pong(ping.data).encode()
                conn.pong_pending = True
        elif frame_type == FrameType.NOTE_PREFERRED:
            conn.preferred = NotePreferred.parse(payload).preferred
        elif frame_type in _MESH_ONLY:
            raise MalformedPacket("insufficient permissions")
        # Anything else is read and discarded (§2.3).

    def _on_client_info(self, conn: _Conn, frame: ClientInfo, now: float) -> None:
        info = open_client_info(self._private, frame.key, frame.sealed)
        if self._verify_client is not None and not self._verify_client(frame.key):
            self._close(conn, "client not allowed")
            return
        conn.key = frame.key
        conn.state = ConnState.REGISTERED
        sealed = seal_server_info(
            self._private, frame.key, {"version": PROTOCOL_VERSION}, self._randbytes(NONCE_LEN)
        )
        conn.out += ServerInfo(sealed).encode()
        jitter = int.from_bytes(self._randbytes(4), "big") / 2**32 * KEEPALIVE_JITTER
        conn.keepalive_period = KEEPALIVE_INTERVAL + jitter
        conn.keepalive_at = now + conn.keepalive_period
        kset = self._clients.get(frame.key)
        if kset is None:
            self._clients[frame.key] = _KeySet([conn.conn_id], conn.conn_id)
        else:
            kset.conns.append(conn.conn_id)
            kset.active = conn.conn_id  # the newest connection is active on registration
        self._events.append(ClientRegistered(conn.conn_id, frame.key, info))

    def _note_activity(self, conn: _Conn) -> None:
        """Last writer is active: a frame from a dup connection makes it the active one."""
        if conn.key is None:
            return
        kset = self._clients.get(conn.key)
        if kset is not None and len(kset.conns) > 1:
            kset.active = conn.conn_id

    # --- routing --------------------------------------------------------------------------------

    def _route(self, src_conn: _Conn, dst: bytes, packet: bytes, now: float) -> None:
        src = src_conn.key
        if src is None:
            raise LocalProtocolError("routing from an unregistered connection")
        kset = self._clients.get(dst)
        if kset is None:
            self._drop("unknown_dest")
            if _looks_like_disco(packet) and self._take_not_here_token(src_conn, now):
                src_conn.out += PeerGone(dst, PeerGoneReason.NOT_HERE).encode()
            return
        if kset.active is None:
            self._drop("dup_client")
            return
        dst_conn = self._conns[kset.active]
        dst_conn.out += RecvPacket(src, packet).encode()
        dst_conn.heard_from.add(src)

    def _take_not_here_token(self, conn: _Conn, now: float) -> bool:
        elapsed = max(0.0, now - conn.not_here_at)
        conn.not_here_at = now
        conn.not_here_tokens = min(_NOT_HERE_BURST, conn.not_here_tokens + elapsed * _NOT_HERE_RATE)
        if conn.not_here_tokens < 1.0:
            return False
        conn.not_here_tokens -= 1.0
        return True

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    # --- closing --------------------------------------------------------------------------------

    def _close(self, conn: _Conn, reason: str) -> None:
        if conn.state is ConnState.CLOSED:
            return
        self._unregister(conn)
        conn.state = ConnState.CLOSED
        conn.keepalive_at = None
        self._events.append(CloseConnection(conn.conn_id, reason))

    def _unregister(self, conn: _Conn) -> None:
        key = conn.key
        if key is None or conn.state is not ConnState.REGISTERED:
            return
        conn.state = ConnState.CLOSED
        kset = self._clients[key]
        kset.conns.remove(conn.conn_id)
        if kset.conns:
            if len(kset.conns) == 1:
                kset.active = kset.conns[0]
            elif kset.active == conn.conn_id:
                kset.active = None
            return
        del self._clients[key]
        gone = PeerGone(key, PeerGoneReason.DISCONNECTED).encode()
        for other in self._conns.values():
            if key in other.heard_from:
                other.heard_from.discard(key)
                if other.state is ConnState.REGISTERED:
                    other.out += gone
