"""DERP relay core over many connections, sans-I/O (tailscale derpserver.go).

Theory of operation: the shell picks an opaque int id per accepted stream, calls
`connection_made(id, now)` (which queues ServerKey), copies the stream's bytes into
`receive_data(id, data, now)`, writes `data_to_send(id)` back, drains `events()` and acts on
`CloseConnection` and `ForwardToMesh`, and calls `on_timer(now)` at `next_deadline()`. Per
connection:

    state               input                           action                      next state
    AWAIT_CLIENT_INFO   ClientInfo, opens, verified     send ServerInfo, register   REGISTERED
    AWAIT_CLIENT_INFO   anything else / bad box / reject, or CLIENT_INFO_TIMEOUT    CLOSED
    REGISTERED          SendPacket                      route (§4.2)                REGISTERED
    REGISTERED          Ping                            Pong (one pending at most)  REGISTERED
    REGISTERED          NotePreferred, unknown types    noted / discarded           REGISTERED
    REGISTERED (mesh)   WatchConns                      flood PeerPresent, watch    REGISTERED
    REGISTERED (mesh)   ForwardPacket                   deliver locally or drop     REGISTERED
    REGISTERED (mesh)   ClosePeer                       close that key's conns      REGISTERED
    REGISTERED          mesh-only frame, no mesh key    "insufficient permissions"  CLOSED

A connection is a mesh peer when its ClientInfo carries `meshKey` equal to ours (constant-time
compare); mesh peers skip `verify_client`. Region mesh (§4.4), as the shell drives it:

    node 1 shell ──(outbound DERP client, meshKey, WatchConns)──> node 3 RelayCore
      PeerPresent(K) / PeerGone(K)  ->  core1.mesh_peer_present("n3", K) / mesh_peer_gone("n3", K)
      connection to n3 lost         ->  core1.mesh_peer_lost("n3")
    core1 SendPacket(dst=K), K not local but on n3 -> event ForwardToMesh("n3", src, K, packet)
      -> shell sends ForwardPacket over its outbound connection to n3
    core3 ForwardPacket(src, K) from a mesh conn -> RecvPacket to a LOCAL K only (one hop), else
      drop `unknown_dest_on_fwd` and (disco, rate-limited) PeerGone(K, NotHere) back to n3

Duplicate keys (§4.1) follow derper's "last writer is active" policy: the newest connection is
active on registration, and afterwards whichever connection of the set last sent a frame. A set of
2+ connections without an active one drops packets as `dup_client`. Watchers get PeerPresent for
every new connection and PeerGone when a key's last local connection closes. PeerGone(Disconnected)
goes to every client that has received a packet from a key once that key is gone from the whole
region: no local connection and no mesh node reporting it (§4.3).

Cost model (a relay holds many mostly idle connections): no input does work proportional to the
number of connections. Connections with output pending are kept in an ordered set that
`take_output()` drains, deadlines live in a heap of `(deadline, conn_id)` with lazy invalidation,
and watchers, mesh connections and "who heard from key K" are indexed. SendPacket frames are
routed straight from the input bytes: a run of consecutive SendPackets to one destination is
copied into that destination's output once and patched in place into RecvPackets (same length:
type 0x04 -> 0x05 and the 32-byte destination key -> the source key), with no per-frame objects.

Receive rate limit (§4.6; off until `set_rate_limit`): a token bucket per registered non-mesh
connection, `burst` bytes deep (at least RATE_LIMIT_MIN_BURST), refilled at `bytes_per_sec`. Each
frame's payload length, capped at RATE_LIMIT_MIN_BURST, is charged before the frame is acted on.
A frame the bucket cannot pay for waits, it is never dropped: the core keeps it and everything
after it (in `_Conn.partial`), emits PauseReading and arms a throttle deadline for when the
tokens will be there (RATE_LIMIT_MIN_WAIT at least, so a throttled sender wakes the loop at most
1/RATE_LIMIT_MIN_WAIT times a second). The shell stops reading that stream (TCP back-pressure
reaches the sender); `on_timer` acts on what the tokens then cover, and emits ResumeReading once
nothing waits. Unthrottled connections never reach that code: `receive_data` checks one field.
"""

from __future__ import annotations

import heapq
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Final, TypeAlias

from nacl.public import PrivateKey

from agent.proto.derp.frames import (
    FRAME_HEADER,
    FRAME_HEADER_LEN,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    KEY_LEN,
    MAX_FRAME_SIZE,
    MAX_PACKET_SIZE,
    NONCE_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    FrameTooLarge,
    FrameType,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    PeerPresentFlags,
    Ping,
    Pong,
    RecvPacket,
    ServerInfo,
    ServerKey,
    WatchConns,
    max_payload_len,
    open_client_info,
    seal_server_info,
)
from agent.proto.errors import LocalProtocolError, MalformedPacket, RemoteProtocolError

__all__ = [
    "CLIENT_INFO_TIMEOUT",
    "MESH_KEY_LEN",
    "RATE_LIMIT_MIN_BURST",
    "RATE_LIMIT_MIN_WAIT",
    "ConnState",
    "RelayCore",
    "RelayCounters",
    "ClientRegistered",
    "CloseConnection",
    "ForwardToMesh",
    "PauseReading",
    "ResumeReading",
    "RelayEvent",
]

CLIENT_INFO_TIMEOUT: Final = 10.0  # server deadline to receive ClientInfo (§3.1)
MESH_KEY_LEN: Final = 32  # 64 hex digits in ClientInfo and in the key file
_DISCO_MAGIC: Final = "TS💬".encode()  # §8.1
_DISCO_MIN_LEN: Final = 62
_NOT_HERE_RATE: Final = 1.0  # PeerGone(NotHere) per second per connection, burst 3 (§4.2)
_NOT_HERE_BURST: Final = 3.0
RATE_LIMIT_MIN_BURST: Final = MAX_PACKET_SIZE + KEY_LEN  # 65568: bucket floor and charge cap (§4.6)
RATE_LIMIT_MIN_WAIT: Final = 0.01  # a throttled connection is looked at again after >= 10 ms
_MESH_ONLY: Final = frozenset(
    {FrameType.FORWARD_PACKET, FrameType.WATCH_CONNS, FrameType.CLOSE_PEER}
)
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")
_SEND: Final = int(FrameType.SEND_PACKET)
_RECV: Final = int(FrameType.RECV_PACKET)
_SEND_MAX: Final = KEY_LEN + MAX_PACKET_SIZE  # largest SendPacket payload
_KEY_END: Final = FRAME_HEADER_LEN + KEY_LEN  # header | key: where a SendPacket's packet starts
_KEEPALIVE: Final = KeepAlive().encode()

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


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
    mesh: bool = False


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """The shell must close this stream (after flushing `data_to_send`, if it likes)."""

    conn_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class ForwardToMesh:
    """The shell must send ForwardPacket(src, dst, packet) over its outbound mesh connection to
    `node` (the name it used in `mesh_peer_present`); if that connection is down, drop it."""

    node: str
    src: bytes
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class PauseReading:
    """The connection ran out of receive tokens: the shell stops reading the stream (the core
    holds what it already got) until ResumeReading. `until` is when the core looks again."""

    conn_id: int
    until: float


@dataclass(frozen=True, slots=True)
class ResumeReading:
    """Everything held for the connection was acted on: the shell reads the stream again."""

    conn_id: int


RelayEvent: TypeAlias = (
    ClientRegistered | CloseConnection | ForwardToMesh | PauseReading | ResumeReading
)


@dataclass(slots=True)
class RelayCounters:
    """Monotonic counters for metrics; drops by reason live in `RelayCore.drops`."""

    clients_total: int = 0  # registrations, mesh peers included
    packets_relayed: int = 0  # RecvPacket queued for a local client (local or mesh sender)
    bytes_relayed: int = 0
    packets_forwarded_out: int = 0  # ForwardToMesh events
    bytes_forwarded_out: int = 0
    packets_forwarded_in: int = 0  # ForwardPacket frames accepted from mesh peers
    peer_gone_not_here: int = 0
    peer_gone_disconnected: int = 0
    throttle_pauses: int = 0  # PauseReading events: a client ran out of receive tokens
    throttled_seconds: float = 0.0  # summed over connections, counted when each pause ends


@dataclass(slots=True, eq=False)
class _Conn:
    """One stream. Buffers and sets are created on first use: most connections are idle."""

    conn_id: int
    deadline: float | None  # ClientInfo deadline, then the next KeepAlive; None once closed
    endpoint: tuple[_IPAddress, int] | None = None
    state: ConnState = ConnState.AWAIT_CLIENT_INFO
    key: bytes | None = None
    out: bytearray | None = None  # pending output; the id is in RelayCore._dirty while set
    partial: bytearray | None = None  # an incomplete frame (header first) from the last input
    keepalive_period: float = KEEPALIVE_INTERVAL
    pong_pending: bool = False
    preferred: bool = False
    heard_from: set[bytes] | None = None  # keys that sent this conn a packet
    not_here_tokens: float = _NOT_HERE_BURST
    not_here_at: float = 0.0
    mesh: bool = False  # logged in with our mesh key
    watching: bool = False  # mesh peer that sent WatchConns
    flags: PeerPresentFlags = PeerPresentFlags.IS_REGULAR
    # Receive rate limit. rate 0: unlimited, and `partial` means an incomplete frame as above;
    # rate > 0: `partial` holds every byte received and not yet acted on (complete frames too).
    rate: float = 0.0  # bytes/s
    burst: float = 0.0
    tokens: float = 0.0
    tokens_at: float = 0.0
    paused_at: float | None = None  # since when the shell was told to stop reading
    resume_at: float | None = None  # throttle deadline; in RelayCore._throttle while set


@dataclass(slots=True)
class _KeySet:
    conns: list[int]
    active: int | None


def _looks_like_disco(packet: bytes) -> bool:
    return len(packet) >= _DISCO_MIN_LEN and packet.startswith(_DISCO_MAGIC)


def _info_field(info: dict[str, Any], name: str) -> Any:
    """A ClientInfo JSON field, matched case-insensitively as Go's decoder does (§3.3)."""
    for key, value in info.items():
        if key.lower() == name:
            return value
    return None


def _endpoint(peer_addr: tuple[str, int] | None) -> tuple[_IPAddress, int] | None:
    if peer_addr is None:
        return None
    try:
        return ipaddress.ip_address(peer_addr[0].partition("%")[0]), peer_addr[1]
    except ValueError:
        return None


def _fill_frame(partial: bytearray, data: bytes) -> int:
    """Move bytes from `data` into the incomplete frame `partial` (header first, its length
    checked) until it is complete: how many were taken, or -1 if all of `data` went in and
    it is still incomplete."""
    pos = 0
    if len(partial) < FRAME_HEADER_LEN:
        pos = min(FRAME_HEADER_LEN - len(partial), len(data))
        partial += data[:pos]
        if len(partial) < FRAME_HEADER_LEN:
            return -1
        _check_length(*FRAME_HEADER.unpack_from(partial))
    length: int = FRAME_HEADER.unpack_from(partial)[1]
    need = FRAME_HEADER_LEN + length - len(partial)
    take = min(need, len(data) - pos)
    partial += memoryview(data)[pos : pos + take]
    return pos + take if take == need else -1


def _check_length(frame_type: int, length: int) -> None:
    """FrameTooLarge for a header announcing more than its type (or any frame) may carry."""
    limit = max_payload_len(frame_type)
    if limit is None or limit > MAX_FRAME_SIZE:
        limit = MAX_FRAME_SIZE
    if length > limit:
        raise FrameTooLarge(f"frame type {frame_type:#04x} of {length} bytes (limit {limit})")


class RelayCore:
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
        # Static after construction.
        self._private = server_private
        self.public_key = bytes(PrivateKey(server_private).public_key)
        self._server_key_frame = ServerKey(self.public_key).encode()
        self._randbytes = randbytes
        self._verify_client = verify_client
        self._mesh_key = mesh_key
        self._client_info_timeout = client_info_timeout
        # Owned by the core.
        self._conns: dict[int, _Conn] = {}
        self._clients: dict[bytes, _KeySet] = {}
        self._remote: dict[bytes, list[str]] = {}  # key -> mesh nodes reporting it, oldest first
        self._remote_by_node: dict[str, set[bytes]] = {}
        self._dirty: dict[int, None] = {}  # conns with output pending, in order (ordered set)
        self._timers: list[tuple[float, int]] = []  # heap; stale when != _Conn.deadline
        self._watchers: set[int] = set()  # registered mesh conns that sent WatchConns
        self._mesh_ids: set[int] = set()  # registered mesh conns
        self._registered = 0  # registered conns, all keys
        self._listeners: dict[bytes, set[int]] = {}  # key -> conns whose heard_from holds it
        self._events: list[RelayEvent] = []
        self._rate = 0.0  # receive limit for new non-mesh registrations, bytes/s (0: none)
        self._burst = float(RATE_LIMIT_MIN_BURST)
        self._throttle: list[tuple[float, int]] = []  # heap; stale when != _Conn.resume_at
        self._paused = 0  # connections the shell was told to stop reading
        self.drops: dict[str, int] = {}
        self.counters = RelayCounters()

    # --- outputs --------------------------------------------------------------------------------

    def data_to_send(self, conn_id: int) -> bytes:
        conn = self._conns.get(conn_id)
        if conn is None:
            return b""
        conn.pong_pending = False
        out = conn.out
        if out is None:
            return b""
        conn.out = None
        del self._dirty[conn_id]
        return bytes(out)

    def take_output(self) -> list[tuple[int, bytearray]]:
        """`(conn_id, bytes)` for every connection with output pending, in the order they got it;
        the buffers are handed over (the core keeps no reference). Costs O(connections with
        output), so the shell calls this instead of `data_to_send` for every connection."""
        result: list[tuple[int, bytearray]] = []
        conns = self._conns
        for conn_id in self._dirty:
            conn = conns[conn_id]
            out = conn.out
            if out is not None:
                result.append((conn_id, out))
                conn.out = None
                conn.pong_pending = False
        self._dirty.clear()
        return result

    def has_output(self) -> bool:
        return bool(self._dirty)

    def events(self) -> list[RelayEvent]:
        events, self._events = self._events, []
        return events

    def has_events(self) -> bool:
        return bool(self._events)

    def clients(self) -> dict[bytes, list[int]]:
        """Registered keys and their connection ids (active one first when there is one)."""
        result: dict[bytes, list[int]] = {}
        for key, kset in self._clients.items():
            ids = sorted(kset.conns, key=lambda c: c != kset.active)
            result[key] = ids
        return result

    def client_counts(self) -> tuple[int, int]:
        """(registered connections, distinct keys), in O(1)."""
        return self._registered, len(self._clients)

    def remote_clients(self) -> dict[bytes, list[str]]:
        """Keys learned from mesh nodes, with the nodes reporting each (preferred one first)."""
        return {key: list(nodes) for key, nodes in self._remote.items()}

    def remote_count(self) -> int:
        return len(self._remote)

    def rate_limit(self) -> tuple[float, float]:
        """(bytes per second, burst bytes) of the receive limit; (0, ...) when it is off."""
        return self._rate, self._burst

    def paused_count(self) -> int:
        """Connections currently throttled (the shell is not reading them)."""
        return self._paused

    def mesh_conns(self) -> list[int]:
        """Registered inbound connections that logged in with our mesh key."""
        return sorted(self._mesh_ids)

    def _out(self, conn: _Conn) -> bytearray:
        """The connection's output buffer, created (and the connection marked dirty) if needed."""
        out = conn.out
        if out is None:
            out = conn.out = bytearray()
            self._dirty[conn.conn_id] = None
        return out

    # --- connection lifecycle -------------------------------------------------------------------

    def connection_made(
        self, conn_id: int, now: float, peer_addr: tuple[str, int] | None = None
    ) -> None:
        """A new stream; `peer_addr` (IP, port), if known, goes into PeerPresent for watchers."""
        if conn_id in self._conns:
            raise LocalProtocolError(f"connection {conn_id} already exists")
        conn = _Conn(conn_id, None, _endpoint(peer_addr))
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
        for key in conn.heard_from or ():
            ids = self._listeners.get(key)
            if ids is not None:
                ids.discard(conn_id)
                if not ids:
                    del self._listeners[key]
        conn.heard_from = None

    # --- mesh: what our outbound watcher connections report -------------------------------------

    def mesh_peer_present(self, node: str, key: bytes) -> None:
        """Mesh node `node` has a client `key` (PeerPresent on our watch connection to it)."""
        if key == self.public_key:
            return  # our own watcher connection, as seen from there
        nodes = self._remote.setdefault(key, [])
        if node not in nodes:
            nodes.append(node)
        self._remote_by_node.setdefault(node, set()).add(key)

    def mesh_peer_gone(self, node: str, key: bytes) -> None:
        """Mesh node `node` no longer has `key` (PeerGone, any reason)."""
        keys = self._remote_by_node.get(node)
        if keys is not None:
            keys.discard(key)
        self._forget_remote(node, key)

    def mesh_peer_lost(self, node: str) -> None:
        """Our connection to mesh node `node` dropped: forget every key it reported."""
        for key in self._remote_by_node.pop(node, set()):
            self._forget_remote(node, key)

    def _forget_remote(self, node: str, key: bytes) -> None:
        nodes = self._remote.get(key)
        if nodes is None or node not in nodes:
            return
        nodes.remove(node)
        if nodes:
            return
        del self._remote[key]
        if key not in self._clients:
            self._gone_from_region(key)

    # --- timers ---------------------------------------------------------------------------------

    def _arm(self, conn: _Conn, deadline: float) -> None:
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

    def _next_resume(self) -> float | None:
        throttle, conns = self._throttle, self._conns
        while throttle:
            deadline, conn_id = throttle[0]
            conn = conns.get(conn_id)
            if conn is not None and conn.resume_at == deadline:
                return deadline
            heapq.heappop(throttle)
        return None

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
            if 0 <= pos < len(chunk) and conn.state in _OPEN:
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

    def _complete_partial(self, conn: _Conn, partial: bytearray, data: bytes, now: float) -> int:
        """Fill the pending incomplete frame from `data`; process it when complete. Returns where
        the rest of `data` starts, or -1 when all of it went into the still incomplete frame."""
        pos = _fill_frame(partial, data)
        if pos < 0:
            return -1
        conn.partial = None
        self._frames(conn, bytes(partial), 0, now)
        return pos

    def _frames(
        self, conn: _Conn, data: bytes, pos: int, now: float, stop: int | None = None
    ) -> None:
        """Act on every complete frame in `data[pos:stop]`; keep an incomplete tail in
        conn.partial (a rate-limited connection passes `stop` at a frame boundary).

        SendPackets to a local client are gathered in runs (consecutive frames, same destination)
        and handed to `_deliver_run` as offsets into `data`; anything else goes to `_handle`."""
        end = len(data) if stop is None else stop
        unpack = FRAME_HEADER.unpack_from
        startswith = data.startswith
        run_dst = b""
        run_conn: _Conn | None = None
        run: list[int] = []
        while end - pos >= FRAME_HEADER_LEN:
            frame_type, length = unpack(data, pos)
            frame_end = pos + FRAME_HEADER_LEN + length
            if frame_type == _SEND and conn.state is ConnState.REGISTERED:
                if length > _SEND_MAX:
                    _check_length(frame_type, length)
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
            _check_length(frame_type, length)
            if frame_end > end:
                break
            if run_conn is not None:
                self._deliver_run(conn, run_conn, data, run, pos)
                run_conn = None
            login = conn.state is ConnState.AWAIT_CLIENT_INFO
            self._handle(conn, frame_type, data[pos + FRAME_HEADER_LEN : frame_end], now)
            pos = frame_end
            if conn.state not in _OPEN:  # closed by this frame: ignore the rest
                return
            if login and conn.rate:  # registered with a receive limit: the rest is charged
                break
        if run_conn is not None:
            self._deliver_run(conn, run_conn, data, run, pos)
        if pos < end:
            conn.partial = bytearray(data[pos:end])

    def _handle(self, conn: _Conn, frame_type: int, payload: bytes, now: float) -> None:
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
        elif frame_type in _MESH_ONLY:
            if not conn.mesh:
                raise MalformedPacket("insufficient permissions")
            self._handle_mesh(conn, frame_type, payload, now)
        # Anything else is read and discarded (§2.3). SendPacket never gets here (_frames).

    def _handle_mesh(self, conn: _Conn, frame_type: int, payload: bytes, now: float) -> None:
        if frame_type == FrameType.FORWARD_PACKET:
            fwd = ForwardPacket.parse(payload)
            self.counters.packets_forwarded_in += 1
            self._deliver_local(conn, fwd.src, fwd.dst, fwd.packet, now, "unknown_dest_on_fwd")
        elif frame_type == FrameType.WATCH_CONNS:
            WatchConns.parse(payload)
            if conn.key == self.public_key or conn.watching:
                return  # our own mesh client looped back, or a repeat
            conn.watching = True
            self._watchers.add(conn.conn_id)
            out = self._out(conn)
            for key, kset in self._clients.items():
                shown = self._conns[kset.active if kset.active is not None else kset.conns[0]]
                out += PeerPresent(key, shown.endpoint, shown.flags).encode()
        else:
            target = self._clients.get(ClosePeer.parse(payload).key)
            for conn_id in list(target.conns) if target is not None else []:
                self._close(self._conns[conn_id], "closed by mesh peer")

    def _on_client_info(self, conn: _Conn, frame: ClientInfo, now: float) -> None:
        info = open_client_info(self._private, frame.key, frame.sealed)
        mesh = self._is_mesh_peer(info)
        if not mesh and self._verify_client is not None and not self._verify_client(frame.key):
            self._close(conn, "client not allowed")
            return
        conn.key = frame.key
        conn.state = ConnState.REGISTERED
        conn.mesh = mesh
        if mesh:
            conn.flags = PeerPresentFlags.IS_MESH_PEER
            self._mesh_ids.add(conn.conn_id)
        elif _info_field(info, "isprober") is True:
            conn.flags = PeerPresentFlags.IS_PROBER
        sealed = seal_server_info(
            self._private, frame.key, {"version": PROTOCOL_VERSION}, self._randbytes(NONCE_LEN)
        )
        self._out(conn).extend(ServerInfo(sealed).encode())
        jitter = int.from_bytes(self._randbytes(4), "big") / 2**32 * KEEPALIVE_JITTER
        conn.keepalive_period = KEEPALIVE_INTERVAL + jitter
        self._arm(conn, now + conn.keepalive_period)
        if self._rate and not mesh:
            self._start_bucket(conn, now)
        kset = self._clients.get(frame.key)
        if kset is None:
            self._clients[frame.key] = _KeySet([conn.conn_id], conn.conn_id)
        else:
            kset.conns.append(conn.conn_id)
            kset.active = conn.conn_id  # the newest connection is active on registration
        self.counters.clients_total += 1
        self._registered += 1
        self._to_watchers(PeerPresent(frame.key, conn.endpoint, conn.flags).encode())
        self._events.append(ClientRegistered(conn.conn_id, frame.key, info, mesh))

    def _is_mesh_peer(self, info: dict[str, Any]) -> bool:
        """True when `meshKey` equals ours; a present but malformed meshKey is an error (§3.3)."""
        text = _info_field(info, "meshkey")
        if text is None:
            return False
        if not isinstance(text, str) or not _HEX64.fullmatch(text):
            raise MalformedPacket("ClientInfo: meshKey is not 64 hex digits")
        return self._mesh_key is not None and hmac.compare_digest(
            bytes.fromhex(text), self._mesh_key
        )

    def _note_activity(self, conn: _Conn) -> None:
        """Last writer is active: a frame from a dup connection makes it the active one."""
        if conn.key is None:
            return
        kset = self._clients.get(conn.key)
        if kset is not None and len(kset.conns) > 1:
            kset.active = conn.conn_id

    # --- receive rate limit (§4.6) -----------------------------------------------------------

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

    def _start_bucket(self, conn: _Conn, now: float) -> None:
        conn.rate = self._rate
        conn.burst = self._burst
        conn.tokens = self._burst
        conn.tokens_at = now

    def _receive_limited(self, conn: _Conn, chunk: bytes, now: float) -> None:
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
            start = _fill_frame(held, chunk)
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
        self, conn: _Conn, now: float, chunk: bytes | None = None, start: int = 0
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
                _check_length(frame_type, length)  # _frames checks the complete ones
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

    def _wake(self, conn: _Conn, now: float) -> None:
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

    def _end_pause(self, conn: _Conn, now: float | None, *, resume: bool = False) -> None:
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

    # --- routing --------------------------------------------------------------------------------

    def _local_target(self, dst: bytes) -> _Conn | None:
        """dst's active local connection, or None (unknown here, or a set with none active)."""
        kset = self._clients.get(dst)
        if kset is None or kset.active is None:
            return None
        return self._conns[kset.active]

    def _deliver_run(
        self, src_conn: _Conn, dst_conn: _Conn, data: bytes, offsets: list[int], end: int
    ) -> None:
        """SendPacket frames at `offsets` (contiguous, up to `end`) become RecvPackets for
        dst_conn: one copy into its output, then each frame's type and key patched in place."""
        src = src_conn.key
        if src is None:
            raise LocalProtocolError("routing from an unregistered connection")
        start = offsets[0]
        out = self._out(dst_conn)
        shift = len(out) - start
        out += memoryview(data)[start:end]
        for pos in offsets:
            at = pos + shift
            out[at] = _RECV
            out[at + FRAME_HEADER_LEN : at + _KEY_END] = src
        count = len(offsets)
        self.counters.packets_relayed += count
        self.counters.bytes_relayed += end - start - count * _KEY_END
        self._heard(dst_conn, src)

    def _route(self, src_conn: _Conn, dst: bytes, packet: bytes, now: float) -> None:
        src = src_conn.key
        if src is None:
            raise LocalProtocolError("routing from an unregistered connection")
        if dst not in self._clients:
            nodes = self._remote.get(dst)
            if nodes:
                self.counters.packets_forwarded_out += 1
                self.counters.bytes_forwarded_out += len(packet)
                self._events.append(ForwardToMesh(nodes[0], src, dst, packet))
                return
        self._deliver_local(src_conn, src, dst, packet, now, "unknown_dest")

    def _deliver_local(
        self, via: _Conn, src: bytes, dst: bytes, packet: bytes, now: float, unknown: str
    ) -> None:
        """RecvPacket to dst's active local connection; never forwards (the one-hop rule)."""
        kset = self._clients.get(dst)
        if kset is None:
            self._drop(unknown)
            if _looks_like_disco(packet) and self._take_not_here_token(via, now):
                self._out(via).extend(PeerGone(dst, PeerGoneReason.NOT_HERE).encode())
                self.counters.peer_gone_not_here += 1
            return
        if kset.active is None:
            self._drop("dup_client")
            return
        dst_conn = self._conns[kset.active]
        self._out(dst_conn).extend(RecvPacket(src, packet).encode())
        self._heard(dst_conn, src)
        self.counters.packets_relayed += 1
        self.counters.bytes_relayed += len(packet)

    def _heard(self, dst_conn: _Conn, src: bytes) -> None:
        """Hook: dst_conn got a packet from `src` (it gets PeerGone when src leaves the region)."""
        heard = dst_conn.heard_from
        if heard is None:
            heard = dst_conn.heard_from = set()
        elif src in heard:
            return
        heard.add(src)
        self._listeners.setdefault(src, set()).add(dst_conn.conn_id)

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

    def _to_watchers(self, frame: bytes) -> None:
        for conn_id in self._watchers:
            self._out(self._conns[conn_id]).extend(frame)

    # --- closing --------------------------------------------------------------------------------

    def _close(self, conn: _Conn, reason: str) -> None:
        if conn.state is ConnState.CLOSED:
            return
        self._unregister(conn)
        conn.state = ConnState.CLOSED
        conn.deadline = None
        self._end_pause(conn, None)
        self._events.append(CloseConnection(conn.conn_id, reason))

    def _unregister(self, conn: _Conn) -> None:
        key = conn.key
        if key is None or conn.state is not ConnState.REGISTERED:
            return
        conn.state = ConnState.CLOSED
        conn.watching = False
        self._registered -= 1
        self._watchers.discard(conn.conn_id)
        self._mesh_ids.discard(conn.conn_id)
        kset = self._clients[key]
        kset.conns.remove(conn.conn_id)
        if kset.conns:
            if len(kset.conns) == 1:
                kset.active = kset.conns[0]
            elif kset.active == conn.conn_id:
                kset.active = None
            return
        del self._clients[key]
        self._to_watchers(PeerGone(key, PeerGoneReason.DISCONNECTED).encode())
        if key not in self._remote:
            self._gone_from_region(key)

    def _gone_from_region(self, key: bytes) -> None:
        """PeerGone(Disconnected) to every open connection that has heard from `key` (§4.3)."""
        listeners = self._listeners.pop(key, None)
        if not listeners:
            return
        gone = PeerGone(key, PeerGoneReason.DISCONNECTED).encode()
        for conn_id in sorted(listeners):
            other = self._conns.get(conn_id)
            if other is None:  # connection_lost of a client that sent packets to its own key
                continue
            if other.heard_from is not None:
                other.heard_from.discard(key)
            if other.state is ConnState.REGISTERED:
                self._out(other).extend(gone)
                self.counters.peer_gone_disconnected += 1
