"""DERP relay core over many connections, sans-I/O (tailscale derp/derpserver/derpserver.go).

Theory of operation: the shell picks an opaque int id per accepted stream, calls
`connection_made(id, now)` (which queues ServerKey), copies the stream's bytes into
`receive_data(id, data, now)`, writes `data_to_send(id)` back, drains `events()` and acts on
`CloseConnection` and `ForwardToMesh`, and calls `on_timer(now)` at `next_deadline()`. Per
connection:

    state               input                           action                      next state
    AWAIT_CLIENT_INFO   ClientInfo, opens, verified     send ServerInfo, register   REGISTERED
    AWAIT_CLIENT_INFO   anything else / bad box / reject, or CLIENT_INFO_TIMEOUT    CLOSED
    REGISTERED          SendPacket                      route (see `routing`)       REGISTERED
    REGISTERED          Ping                            Pong (one pending at most)  REGISTERED
    REGISTERED          NotePreferred, unknown types    noted / discarded           REGISTERED
    REGISTERED (mesh)   WatchConns                      flood PeerPresent, watch    REGISTERED
    REGISTERED (mesh)   ForwardPacket                   deliver locally or drop     REGISTERED
    REGISTERED (mesh)   ClosePeer                       close that key's conns      REGISTERED
    REGISTERED          mesh-only frame, no mesh key    NotPermitted                CLOSED

This module holds the connection lifecycle, the receive loop and frame dispatch, and the
per-connection deadline (ClientInfo timeout, then KeepAlive). The concerns it dispatches to
live beside it: `login`, `routing` (and duplicate keys), `mesh`, `ratelimit`; `base` holds the
tables they share. SendPacket frames are routed straight from the input bytes (`_frames` gathers
runs to one destination for `Routing._deliver_run`).
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable
from typing import Final

from nacl.public import PrivateKey

from agent.proto.derp.frames import (
    FRAME_HEADER,
    FRAME_HEADER_LEN,
    KEY_LEN,
    MAX_PACKET_SIZE,
    ClientInfo,
    FrameType,
    KeepAlive,
    NotePreferred,
    Ping,
    Pong,
    ServerKey,
)
from agent.proto.derp.server.conn import (
    OPEN,
    Conn,
    ConnState,
    check_length,
    endpoint,
    fill_frame,
)
from agent.proto.derp.server.events import CloseConnection
from agent.proto.derp.server.login import CLIENT_INFO_TIMEOUT, Login
from agent.proto.derp.server.mesh import MESH_KEY_LEN, MESH_ONLY, Mesh
from agent.proto.derp.server.ratelimit import RateLimit
from agent.proto.derp.server.routing import Routing
from agent.proto.errors import (
    LocalProtocolError,
    MalformedPacket,
    NotPermitted,
    RemoteProtocolError,
)

__all__ = ["RelayCore"]

_SEND: Final = int(FrameType.SEND_PACKET)
_SEND_MAX: Final = KEY_LEN + MAX_PACKET_SIZE  # largest SendPacket payload
_KEY_END: Final = FRAME_HEADER_LEN + KEY_LEN  # header | key: where a SendPacket's packet starts
_KEEPALIVE: Final = KeepAlive().encode()


class RelayCore(Login, Mesh, RateLimit, Routing):
    """The relay: registration, routing, PeerGone bookkeeping, Ping/Pong, keepalives, mesh."""

    def __init__(
        self,
        server_private: bytes,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        verify_client: Callable[[bytes], bool] | None = None,
        mesh_key: bytes | None = None,
        client_info_timeout: float = CLIENT_INFO_TIMEOUT,
    ) -> None:
        if len(server_private) != 32:
            raise LocalProtocolError("server private key must be 32 bytes")
        if mesh_key is not None and len(mesh_key) != MESH_KEY_LEN:
            raise LocalProtocolError(f"mesh key must be {MESH_KEY_LEN} bytes")
        super().__init__()
        # Static after construction.
        self._private = server_private
        self.public_key = bytes(PrivateKey(server_private).public_key)
        self._server_key_frame = ServerKey(self.public_key).encode()
        self._randbytes = randbytes
        self._verify_client = verify_client
        self._mesh_key = mesh_key
        self._client_info_timeout = client_info_timeout

    # --- connection lifecycle -------------------------------------------------------------------

    def connection_made(
        self, conn_id: int, now: float, peer_addr: tuple[str, int] | None = None
    ) -> None:
        """A new stream; `peer_addr` (IP, port), if known, goes into PeerPresent for watchers."""
        if conn_id in self._conns:
            raise LocalProtocolError(f"connection {conn_id} already exists")
        conn = Conn(conn_id, None, endpoint(peer_addr))
        self._conns[conn_id] = conn
        self._out(conn).extend(self._server_key_frame)
        self._arm(conn, now + self._client_info_timeout)

    def connection_lost(self, conn_id: int) -> None:
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        self._dirty.pop(conn_id, None)
        conn.deadline = None
        self._end_pause(conn, None)
        self._unregister(conn)
        self._forget_listener(conn)

    def _close(self, conn: Conn, reason: str) -> None:
        if conn.state is ConnState.CLOSED:
            return
        self._unregister(conn)
        conn.state = ConnState.CLOSED
        conn.deadline = None
        self._end_pause(conn, None)
        self._events.append(CloseConnection(conn.conn_id, reason))

    # --- timers ---------------------------------------------------------------------------------

    def _arm(self, conn: Conn, deadline: float) -> None:
        """Hook: the connection's one deadline (ClientInfo, then KeepAlive) is now `deadline`."""
        conn.deadline = deadline
        heapq.heappush(self._timers, (deadline, conn.conn_id))

    def next_deadline(self) -> float | None:
        timers, conns = self._timers, self._conns
        deadline: float | None = None
        while timers:
            deadline, conn_id = timers[0]
            conn = conns.get(conn_id)
            if conn is not None and conn.deadline == deadline:
                break
            heapq.heappop(timers)  # stale: re-armed, closed or gone
            deadline = None
        if self._throttle:
            resume = self._next_resume()
            if resume is not None and (deadline is None or resume < deadline):
                return resume
        return deadline

    def on_timer(self, now: float) -> None:
        if self._throttle:
            self._resume_throttled(now)
        timers, conns = self._timers, self._conns
        while timers and timers[0][0] <= now:
            deadline, conn_id = heapq.heappop(timers)
            conn = conns.get(conn_id)
            if conn is None or conn.deadline != deadline:
                continue
            if conn.state is ConnState.AWAIT_CLIENT_INFO:
                self._close(conn, "timeout waiting for ClientInfo")
            elif conn.state is ConnState.REGISTERED:
                self._out(conn).extend(_KEEPALIVE)
                while deadline <= now:
                    deadline += conn.keepalive_period
                self._arm(conn, deadline)

    # --- receive --------------------------------------------------------------------------------

    def receive_data(self, conn_id: int, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed one connection's bytes. A protocol error closes that connection only, emits
        CloseConnection and raises RemoteProtocolError. Frames before the bad one in the same
        input have been acted on."""
        conn = self._conns.get(conn_id)
        if conn is None:
            raise LocalProtocolError(f"unknown connection {conn_id}")
        if conn.state is ConnState.CLOSED:
            return
        chunk = data if isinstance(data, bytes) else bytes(data)
        try:
            if conn.rate:
                self._receive_limited(conn, chunk, now)
                return
            pos = 0
            if conn.partial is not None:
                pos = self._complete_partial(conn, conn.partial, chunk, now)
            if 0 <= pos < len(chunk) and conn.state in OPEN:
                if conn.rate:  # the frame completed above was its ClientInfo: charge the rest
                    self._receive_limited(conn, chunk[pos:], now)
                    return
                self._frames(conn, chunk, pos, now)
                if conn.rate and conn.partial is not None and conn.state is ConnState.REGISTERED:
                    self._drain_limited(conn, now)  # logged in mid-chunk: the rest is charged
        except RemoteProtocolError as exc:
            conn.partial = None
            self._close(conn, f"protocol error: {exc}")
            raise

    def _complete_partial(self, conn: Conn, partial: bytearray, data: bytes, now: float) -> int:
        """Fill the pending incomplete frame from `data`; process it when complete. Returns where
        the rest of `data` starts, or -1 when all of it went into the still incomplete frame."""
        pos = fill_frame(partial, data)
        if pos < 0:
            return -1
        conn.partial = None
        self._frames(conn, bytes(partial), 0, now)
        return pos

    def _frames(
        self, conn: Conn, data: bytes, pos: int, now: float, stop: int | None = None
    ) -> None:
        """Act on every complete frame in `data[pos:stop]`; keep an incomplete tail in
        conn.partial (a rate-limited connection passes `stop` at a frame boundary).

        SendPackets to a local client are gathered in runs (consecutive frames, same destination)
        and handed to `_deliver_run` as offsets into `data`; anything else goes to `_handle`."""
        end = len(data) if stop is None else stop
        unpack = FRAME_HEADER.unpack_from
        startswith = data.startswith
        run_dst = b""
        run_conn: Conn | None = None
        run: list[int] = []
        while end - pos >= FRAME_HEADER_LEN:
            frame_type, length = unpack(data, pos)
            frame_end = pos + FRAME_HEADER_LEN + length
            if frame_type == _SEND and conn.state is ConnState.REGISTERED:
                if length > _SEND_MAX:
                    check_length(frame_type, length)
                if frame_end > end:
                    break
                if length < KEY_LEN:
                    raise MalformedPacket(f"SendPacket: payload of {length} bytes, need 32..")
                if run_conn is not None and startswith(run_dst, pos + FRAME_HEADER_LEN):
                    run.append(pos)
                    pos = frame_end
                    continue
                if run_conn is not None:
                    self._deliver_run(conn, run_conn, data, run, pos)
                    run_conn = None
                self._note_activity(conn)
                dst = data[pos + FRAME_HEADER_LEN : pos + _KEY_END]
                run_conn = self._local_target(dst)
                if run_conn is not None:
                    run_dst = dst
                    run = [pos]
                else:  # unknown, duplicate or on a mesh node: one frame at a time
                    self._route(conn, dst, data[pos + _KEY_END : frame_end], now)
                pos = frame_end
                continue
            check_length(frame_type, length)
            if frame_end > end:
                break
            if run_conn is not None:
                self._deliver_run(conn, run_conn, data, run, pos)
                run_conn = None
            login = conn.state is ConnState.AWAIT_CLIENT_INFO
            self._handle(conn, frame_type, data[pos + FRAME_HEADER_LEN : frame_end], now)
            pos = frame_end
            if conn.state not in OPEN:  # closed by this frame: ignore the rest
                return
            if login and conn.rate:  # registered with a receive limit: the rest is charged
                break
        if run_conn is not None:
            self._deliver_run(conn, run_conn, data, run, pos)
        if pos < end:
            conn.partial = bytearray(data[pos:end])

    def _handle(self, conn: Conn, frame_type: int, payload: bytes, now: float) -> None:
        if conn.state is ConnState.AWAIT_CLIENT_INFO:
            if frame_type != FrameType.CLIENT_INFO:
                raise MalformedPacket(f"expected ClientInfo, got frame type {frame_type:#04x}")
            self._on_client_info(conn, ClientInfo.parse(payload), now)
            return
        self._note_activity(conn)
        if frame_type == FrameType.PING:
            ping = Ping.parse(payload)
            if not conn.pong_pending:
                self._out(conn).extend(Pong(ping.data).encode())
                conn.pong_pending = True
        elif frame_type == FrameType.NOTE_PREFERRED:
            conn.preferred = NotePreferred.parse(payload).preferred
        elif frame_type in MESH_ONLY:
            if not conn.mesh:
                raise NotPermitted("insufficient permissions")
            self._handle_mesh(conn, frame_type, payload, now)
        # Anything else is read and discarded, as derpserver.go does. SendPacket never gets here
        # (_frames).
