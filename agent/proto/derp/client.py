"""DERP client connection core, sans-I/O (tailscale derp/derp_client.go).

Theory of operation: the shell copies stream bytes (after the HTTP 101 upgrade, see `upgrade`) into
`receive_data`, writes out whatever `data_to_send` returns, drains `events()`, and calls
`on_timer(now)` when `next_deadline()` passes. The login is a small table-shaped machine:

    state               input frame     action                          next state
    AWAIT_SERVER_KEY    ServerKey       send ClientInfo (sealed box)    AWAIT_SERVER_INFO
    AWAIT_SERVER_INFO   ServerInfo      open box, emit Connected        CONNECTED
    CONNECTED           steady frames   emit events, answer Ping        CONNECTED
    any                 protocol error  emit Closed                     CLOSED

Any other frame during login, or a second ServerKey/ServerInfo later, is out of order: the
connection closes and `receive_data` raises RemoteProtocolError. Frames of unknown type (and
client-to-server types) are skipped once connected, as tailscaled does (derp/derp_client.go
Recv). The read watchdog closes with reason "read timeout" after CLIENT_READ_TIMEOUT seconds
without a frame.

A relay's region-mesh client (tailscale derp/derphttp/mesh_client.go) passes `mesh_key` (sent
as ClientInfo `meshKey`) and `can_ack_pings=False`, then uses `watch_conns`, `forward_packet`
and `close_peer`; the server answers those frames only on connections holding its mesh key.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Final, TypeAlias

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

from agent.proto.derp.frames import (
    CLIENT_READ_TIMEOUT,
    NONCE_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    FrameBuffer,
    FrameType,
    Health,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerPresent,
    PeerPresentFlags,
    Ping,
    Pong,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfo,
    ServerKey,
    WatchConns,
    open_server_info,
    parse_frame,
    seal_client_info,
)
from agent.proto.errors import LocalProtocolError, MalformedPacket, RemoteProtocolError

__all__ = [
    "ClientState",
    "DerpClientConn",
    "Connected",
    "PacketReceived",
    "PeerGoneEvent",
    "PeerPresentEvent",
    "PongReceived",
    "HealthChanged",
    "ServerRestarting",
    "Closed",
    "ClientEvent",
    "READ_TIMEOUT_REASON",
]


class ClientState(Enum):
    AWAIT_SERVER_KEY = auto()
    AWAIT_SERVER_INFO = auto()
    CONNECTED = auto()
    CLOSED = auto()


# Login transitions; in CONNECTED every frame type not listed in _OUT_OF_ORDER keeps the state.
_TRANSITIONS: Final[dict[tuple[ClientState, FrameType], ClientState]] = {
    (ClientState.AWAIT_SERVER_KEY, FrameType.SERVER_KEY): ClientState.AWAIT_SERVER_INFO,
    (ClientState.AWAIT_SERVER_INFO, FrameType.SERVER_INFO): ClientState.CONNECTED,
}
_OUT_OF_ORDER: Final = frozenset({FrameType.SERVER_KEY, FrameType.SERVER_INFO})

READ_TIMEOUT_REASON: Final = "read timeout"


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """ServerInfo opened: the connection is up (the "connected" of tailscale
    wgengine/magicsock/derp.go)."""

    server_key: bytes


@dataclass(frozen=True, slots=True)
class PacketReceived:
    src: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class PeerGoneEvent:
    key: bytes
    reason: int


@dataclass(frozen=True, slots=True)
class PeerPresentEvent:
    key: bytes
    endpoint: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None
    flags: PeerPresentFlags | None


@dataclass(frozen=True, slots=True)
class PongReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class HealthChanged:
    """Server health text; empty means healthy again."""

    text: str


@dataclass(frozen=True, slots=True)
class ServerRestarting:
    """Milliseconds, as on the wire."""

    reconnect_in: int
    try_for: int


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


ClientEvent: TypeAlias = (
    Connected | PacketReceived | PeerGoneEvent | PeerPresentEvent | PongReceived | HealthChanged
    | ServerRestarting | Closed
)  # fmt: skip


# --- connection ---------------------------------------------------------------------------------


class DerpClientConn:
    """One DERP client connection: login, steady-state frames and the read watchdog."""

    def __init__(
        self,
        private_key: bytes,
        *,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
        can_ack_pings: bool = True,
        mesh_key: bytes | None = None,
    ) -> None:
        if len(private_key) != 32:
            raise LocalProtocolError("private key must be 32 bytes")
        if mesh_key is not None and len(mesh_key) != 32:
            raise LocalProtocolError("mesh key must be 32 bytes")
        # Static after construction.
        self._private = private_key
        self.public_key = bytes(PrivateKey(private_key).public_key)
        self._randbytes = randbytes
        self._can_ack_pings = can_ack_pings
        self._mesh_key = mesh_key  # sent as ClientInfo "meshKey": this is a relay's mesh client
        # Owned by the receive path.
        self.state = ClientState.AWAIT_SERVER_KEY
        self.server_key: bytes | None = None
        self.server_info: dict[str, Any] | None = None
        self._frames = FrameBuffer()
        self._read_deadline: float | None = None
        # Outputs, drained by the shell.
        self._out = bytearray()
        self._events: list[ClientEvent] = []

    # --- outputs --------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def events(self) -> list[ClientEvent]:
        events, self._events = self._events, []
        return events

    # --- timers ---------------------------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The stream is up: arm the read watchdog (it is also armed by any received bytes)."""
        self._on_frame_received(now)

    def _on_frame_received(self, now: float) -> None:
        """Any frame (or the stream opening) pushes the read deadline CLIENT_READ_TIMEOUT away."""
        if self.state is not ClientState.CLOSED:
            self._read_deadline = now + CLIENT_READ_TIMEOUT

    def next_deadline(self) -> float | None:
        return self._read_deadline

    def on_timer(self, now: float) -> None:
        if self._read_deadline is not None and now >= self._read_deadline:
            self._close(READ_TIMEOUT_REASON)

    # --- inputs ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed stream bytes. Raises RemoteProtocolError (after closing) on a protocol error."""
        if self.state is ClientState.CLOSED:
            return
        try:
            raw = self._frames.feed_raw(data)
            for frame_type, payload in raw:
                self._on_frame_received(now)
                self._handle(frame_type, payload)
        except RemoteProtocolError as exc:
            self._close(f"protocol error: {exc}")
            raise

    def send_packet(self, dst: bytes, packet: bytes, now: float) -> None:
        self._check_can_send()
        self._out += SendPacket(dst, packet).encode()

    def send_ping(self, data: bytes, now: float) -> None:
        self._check_can_send()
        self._out += Ping(data).encode()

    def note_preferred(self, preferred: bool) -> None:
        self._check_can_send()
        self._out += NotePreferred(preferred).encode()

    # --- mesh (only a relay logged in with the server's mesh key may send these) ---------

    def watch_conns(self) -> None:
        """Ask for PeerPresent about every client of the server now and later, PeerGone after."""
        self._check_can_send()
        self._out += WatchConns().encode()

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes, now: float) -> None:
        """Hand the server a packet from `src` (a client of ours) for its local client `dst`."""
        self._check_can_send()
        self._out += ForwardPacket(src, dst, packet).encode()

    def close_peer(self, key: bytes) -> None:
        """Ask the server to close every local connection of `key`."""
        self._check_can_send()
        self._out += ClosePeer(key).encode()

    def close(self, reason: str = "closed locally") -> None:
        self._close(reason)

    # --- internals ------------------------------------------------------------------------------

    def _check_can_send(self) -> None:
        # The client may send right after ClientInfo, without waiting for ServerInfo, as
        # derp/derp_client.go does.
        if self.state in (ClientState.AWAIT_SERVER_KEY, ClientState.CLOSED):
            raise LocalProtocolError(f"cannot send in state {self.state.name}")

    def _close(self, reason: str) -> None:
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        self._read_deadline = None
        self._events.append(Closed(reason))

    def _handle(self, frame_type: int, payload: bytes) -> None:
        state = self.state
        if state is not ClientState.CONNECTED:
            try:
                next_state = _TRANSITIONS[(state, FrameType(frame_type))]
            except (KeyError, ValueError):
                raise MalformedPacket(
                    f"frame type {frame_type:#04x} out of order in {state.name}"
                ) from None
            if next_state is ClientState.AWAIT_SERVER_INFO:
                self._on_server_key(ServerKey.parse(payload))
            else:
                self._on_server_info(ServerInfo.parse(payload))
            self.state = next_state
            return
        if frame_type in _OUT_OF_ORDER:
            raise MalformedPacket(f"frame type {frame_type:#04x} after login")
        frame = parse_frame(frame_type, payload)
        match frame:
            case RecvPacket(src=src, packet=packet):
                self._events.append(PacketReceived(src, packet))
            case KeepAlive():
                pass
            case Ping(data=data):
                if self._can_ack_pings:
                    self._out += Pong(data).encode()
            case Pong(data=data):
                self._events.append(PongReceived(data))
            case PeerGone():
                self._events.append(PeerGoneEvent(frame.key, frame.effective_reason))
            case PeerPresent(key=key, endpoint=endpoint, flags=flags):
                self._events.append(PeerPresentEvent(key, endpoint, flags))
            case Health(text=text):
                self._events.append(HealthChanged(text))
            case Restarting(reconnect_in=reconnect_in, try_for=try_for):
                self._events.append(ServerRestarting(reconnect_in, try_for))
            case _:
                pass  # unknown and client-to-server types are skipped (derp_client.go Recv)

    def _on_server_key(self, frame: ServerKey) -> None:
        self.server_key = frame.key
        info: dict[str, Any] = {}
        if self._mesh_key is not None:  # derper's mesh client: meshKey first, as Go emits it
            info["meshKey"] = self._mesh_key.hex()
        info["version"] = PROTOCOL_VERSION
        info["CanAckPings"] = self._can_ack_pings
        try:
            sealed = seal_client_info(self._private, frame.key, info, self._randbytes(NONCE_LEN))
        except CryptoError as exc:  # low-order server key: no shared secret
            raise MalformedPacket("ServerKey: unusable server key") from exc
        self._out += ClientInfo(self.public_key, sealed).encode()

    def _on_server_info(self, frame: ServerInfo) -> None:
        if self.server_key is None:  # set by the AWAIT_SERVER_KEY transition
            raise LocalProtocolError("ServerInfo before ServerKey")
        self.server_info = open_server_info(self._private, self.server_key, frame.sealed)
        self._events.append(Connected(self.server_key))
