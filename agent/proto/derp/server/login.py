"""Relay login: ServerKey on connect, then ClientInfo within CLIENT_INFO_TIMEOUT (tailscale
derp/derpserver/derpserver.go accept).

ClientInfo is a NaCl box to our key; when it opens, the client is a mesh peer if its `meshKey`
equals ours (constant-time compare), and otherwise must pass `verify_client`. Registration sends
ServerInfo, arms the first KeepAlive (jittered, as tailscale derp/derpserver/derpserver.go
does), starts the receive bucket when a rate limit is set, and tells watchers (PeerPresent).
"""

from __future__ import annotations

import hmac
import re
from typing import Any, Final

from agent.proto.derp.frames import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    NONCE_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    PeerPresentFlags,
    ServerInfo,
    open_client_info,
    seal_server_info,
)
from agent.proto.derp.server.base import RelayBase
from agent.proto.derp.server.conn import Conn, ConnState
from agent.proto.derp.server.events import ClientRegistered
from agent.proto.errors import MalformedPacket

__all__ = ["CLIENT_INFO_TIMEOUT", "Login"]

CLIENT_INFO_TIMEOUT: Final = 10.0  # server deadline to receive ClientInfo
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")


def _info_field(info: dict[str, Any], name: str) -> Any:
    """A ClientInfo JSON field, matched case-insensitively as Go's decoder does
    (encoding/json, which derpserver.go recvClientKey uses)."""
    for key, value in info.items():
        if key.lower() == name:
            return value
    return None


class Login(RelayBase):
    """AWAIT_CLIENT_INFO -> REGISTERED (or closed)."""

    def _on_client_info(self, conn: Conn, frame: ClientInfo, now: float) -> None:
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
        if not mesh:
            self._limit_new_client(conn, now)
        self.counters.clients_total += 1
        self._add_client(conn, frame.key)
        self._events.append(ClientRegistered(conn.conn_id, frame.key, info, mesh))

    def _is_mesh_peer(self, info: dict[str, Any]) -> bool:
        """True when `meshKey` equals ours; a present but malformed meshKey is an error
        (derpserver.go isMeshPeer)."""
        text = _info_field(info, "meshkey")
        if text is None:
            return False
        if not isinstance(text, str) or not _HEX64.fullmatch(text):
            raise MalformedPacket("ClientInfo: meshKey is not 64 hex digits")
        return self._mesh_key is not None and hmac.compare_digest(
            bytes.fromhex(text), self._mesh_key
        )
