"""DERP relay core over many connections, sans-I/O (spec: shared/spec/derp-disco.md §3, §4).

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
"""

from __future__ import annotations

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
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    NONCE_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    FrameBuffer,
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
    SendPacket,
    ServerInfo,
    ServerKey,
    WatchConns,
    open_client_info,
    seal_server_info,
)
from agent.proto.errors import LocalProtocolError, MalformedPacket, RemoteProtocolError

__all__ = [
    "CLIENT_INFO_TIMEOUT",
    "MESH_KEY_LEN",
    "ConnState",
    "RelayCore",
    "RelayCounters",
    "ClientRegistered",
    "CloseConnection",
    "ForwardToMesh",
    "RelayEvent",
]

CLIENT_INFO_TIMEOUT: Final = 10.0  # server deadline to receive ClientInfo (§3.1)
MESH_KEY_LEN: Final = 32  # 64 hex digits in ClientInfo and in the key file
_DISCO_MAGIC: Final = "TS💬".encode()  # §8.1
_DISCO_MIN_LEN: Final = 62
_NOT_HERE_RATE: Final = 1.0  # PeerGone(NotHere) per second per connection, burst 3 (§4.2)
_NOT_HERE_BURST: Final = 3.0
_MESH_ONLY: Final = frozenset(
    {FrameType.FORWARD_PACKET, FrameType.WATCH_CONNS, FrameType.CLOSE_PEER}
)
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")

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


RelayEvent: TypeAlias = ClientRegistered | CloseConnection | ForwardToMesh


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


@dataclass(slots=True)
class _Conn:
    conn_id: int
    frames: FrameBuffer
    handshake_deadline: float
    endpoint: tuple[_IPAddress, int] | None = None
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
    mesh: bool = False  # logged in with our mesh key
    watching: bool = False  # mesh peer that sent WatchConns
    flags: PeerPresentFlags = PeerPresentFlags.IS_REGULAR


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


class RelayCore:
    """The relay: registration, routing, PeerGone bookkeeping, Ping/Pong, keepalives, mesh."""

    def __init__(
        self,
        server_private: bytes,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        verify_client: Callable[[bytes], bool] | None = None,
        mesh_key: bytes | None = None,
    ) -> None:
        if len(server_private) != 32:
            raise LocalProtocolError("server private key must be 32 bytes")
        if mesh_key is not None and len(mesh_key) != MESH_KEY_LEN:
            raise LocalProtocolError(f"mesh key must be {MESH_KEY_LEN} bytes")
        # Static after construction.
        self._private = server_private
        self.public_key = bytes(PrivateKey(server_private).public_key)
        self._randbytes = randbytes
        self._verify_client = verify_client
        self._mesh_key = mesh_key
        # Owned by the core.
        self._conns: dict[int, _Conn] = {}
        self._clients: dict[bytes, _KeySet] = {}
        self._remote: dict[bytes, list[str]] = {}  # key -> mesh nodes reporting it, oldest first
        self._remote_by_node: dict[str, set[bytes]] = {}
        self._events: list[RelayEvent] = []
        self.drops: dict[str, int] = {}
        self.counters = RelayCounters()

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

    def remote_clients(self) -> dict[bytes, list[str]]:
        """Keys learned from mesh nodes, with the nodes reporting each (preferred one first)."""
        return {key: list(nodes) for key, nodes in self._remote.items()}

    def mesh_conns(self) -> list[int]:
        """Registered inbound connections that logged in with our mesh key."""
        return [
            c.conn_id for c in self._conns.values() if c.mesh and c.state is ConnState.REGISTERED
        ]

    # --- connection lifecycle -------------------------------------------------------------------

    def connection_made(
        self, conn_id: int, now: float, peer_addr: tuple[str, int] | None = None
    ) -> None:
        """A new stream; `peer_addr` (IP, port), if known, goes into PeerPresent for watchers."""
        if conn_id in self._conns:
            raise LocalProtocolError(f"connection {conn_id} already exists")
        conn = _Conn(conn_id, FrameBuffer(), now + CLIENT_INFO_TIMEOUT, _endpoint(peer_addr))
        conn.out += ServerKey(self.public_key).encode()
        self._conns[conn_id] = conn

    def connection_lost(self, conn_id: int) -> None:
        conn = self._conns.pop(conn_id, None)
        if conn is not None:
            self._unregister(conn)

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
            if not conn.mesh:
                raise MalformedPacket("insufficient permissions")
            self._handle_mesh(conn, frame_type, payload, now)
        # Anything else is read and discarded (§2.3).

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
            for key, kset in self._clients.items():
                shown = self._conns[kset.active if kset.active is not None else kset.conns[0]]
                conn.out += PeerPresent(key, shown.endpoint, shown.flags).encode()
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
        elif _info_field(info, "isprober") is True:
            conn.flags = PeerPresentFlags.IS_PROBER
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
        self.counters.clients_total += 1
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

    # --- routing --------------------------------------------------------------------------------

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
                via.out += PeerGone(dst, PeerGoneReason.NOT_HERE).encode()
                self.counters.peer_gone_not_here += 1
            return
        if kset.active is None:
            self._drop("dup_client")
            return
        dst_conn = self._conns[kset.active]
        dst_conn.out += RecvPacket(src, packet).encode()
        dst_conn.heard_from.add(src)
        self.counters.packets_relayed += 1
        self.counters.bytes_relayed += len(packet)

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
        for conn in self._conns.values():
            if conn.watching and conn.state is ConnState.REGISTERED:
                conn.out += frame

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
        conn.watching = False
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
        gone = PeerGone(key, PeerGoneReason.DISCONNECTED).encode()
        for other in self._conns.values():
            if key in other.heard_from:
                other.heard_from.discard(key)
                if other.state is ConnState.REGISTERED:
                    other.out += gone
                    self.counters.peer_gone_disconnected += 1
