"""Relay routing: clients by key, the duplicate-key policy, delivery and PeerGone bookkeeping.

SendPacket(dst) from a registered client becomes RecvPacket(src) on dst's active local
connection; a key not here but reported by a mesh node becomes a ForwardToMesh event (the shell
sends ForwardPacket); otherwise the packet is dropped as `unknown_dest`, answered (for DISCO,
rate-limited) with PeerGone(NotHere). Runs of SendPackets to one destination are copied into
its output once and patched in place into RecvPackets (same length: type 0x04 -> 0x05 and the
32-byte destination key -> the source key), with no per-frame objects.

Duplicate keys follow derper's "last writer is active" policy (tailscale
derp/derpserver/derpserver.go, dupClientSet): the newest connection is active on registration,
and afterwards whichever connection of the set last sent a frame. A set of 2+ connections
without an active one drops packets as `dup_client`. Watchers get PeerPresent for every new
connection and PeerGone when a key's last local connection closes. PeerGone(Disconnected) goes to
every client that has received a packet from a key once that key is gone from the whole region:
no local connection and no mesh node reporting it (derpserver.go peerGoneWatchers).
"""

from __future__ import annotations

from typing import Final

from agent.proto.derp.frames import (
    FRAME_HEADER_LEN,
    KEY_LEN,
    FrameType,
    PeerGone,
    PeerGoneReason,
    PeerPresent,
    RecvPacket,
)
from agent.proto.derp.server.base import RelayBase
from agent.proto.derp.server.conn import (
    NOT_HERE_BURST,
    NOT_HERE_RATE,
    Conn,
    ConnState,
    KeySet,
)
from agent.proto.derp.server.events import ForwardToMesh
from agent.proto.errors import DropReason, LocalProtocolError

__all__ = ["Routing"]

_DISCO_MAGIC: Final = "TS💬".encode()  # tailscale disco/disco.go Magic
_DISCO_MIN_LEN: Final = 62
_RECV: Final = int(FrameType.RECV_PACKET)
_KEY_END: Final = FRAME_HEADER_LEN + KEY_LEN  # header | key: where a SendPacket's packet starts


def _looks_like_disco(packet: bytes) -> bool:
    return len(packet) >= _DISCO_MIN_LEN and packet.startswith(_DISCO_MAGIC)


class Routing(RelayBase):
    """Key sets, delivery to local clients, PeerGone to those who heard from a departed key."""

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

    # --- key sets -------------------------------------------------------------------------------

    def _add_client(self, conn: Conn, key: bytes) -> None:
        """Hook: `conn` registered as `key`; it is the key's active connection."""
        kset = self._clients.get(key)
        if kset is None:
            self._clients[key] = KeySet([conn.conn_id], conn.conn_id)
        else:
            kset.conns.append(conn.conn_id)
            kset.active = conn.conn_id  # the newest connection is active on registration
        self._registered += 1
        self._to_watchers(PeerPresent(key, conn.endpoint, conn.flags).encode())

    def _note_activity(self, conn: Conn) -> None:
        """Last writer is active: a frame from a dup connection makes it the active one."""
        if conn.key is None:
            return
        kset = self._clients.get(conn.key)
        if kset is not None and len(kset.conns) > 1:
            kset.active = conn.conn_id

    def _unregister(self, conn: Conn) -> None:
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

    # --- delivery -------------------------------------------------------------------------------

    def _local_target(self, dst: bytes) -> Conn | None:
        """dst's active local connection, or None (unknown here, or a set with none active)."""
        kset = self._clients.get(dst)
        if kset is None or kset.active is None:
            return None
        return self._conns[kset.active]

    def _deliver_run(
        self, src_conn: Conn, dst_conn: Conn, data: bytes, offsets: list[int], end: int
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

    def _route(self, src_conn: Conn, dst: bytes, packet: bytes, now: float) -> None:
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
        self._deliver_local(src_conn, src, dst, packet, now, DropReason.UNKNOWN_DEST)

    def _deliver_local(
        self, via: Conn, src: bytes, dst: bytes, packet: bytes, now: float, unknown: DropReason
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
            self._drop(DropReason.DUP_CLIENT)
            return
        dst_conn = self._conns[kset.active]
        self._out(dst_conn).extend(RecvPacket(src, packet).encode())
        self._heard(dst_conn, src)
        self.counters.packets_relayed += 1
        self.counters.bytes_relayed += len(packet)

    def _take_not_here_token(self, conn: Conn, now: float) -> bool:
        elapsed = max(0.0, now - conn.not_here_at)
        conn.not_here_at = now
        conn.not_here_tokens = min(NOT_HERE_BURST, conn.not_here_tokens + elapsed * NOT_HERE_RATE)
        if conn.not_here_tokens < 1.0:
            return False
        conn.not_here_tokens -= 1.0
        return True

    # --- who heard from whom --------------------------------------------------------------------

    def _heard(self, dst_conn: Conn, src: bytes) -> None:
        """Hook: dst_conn got a packet from `src` (it gets PeerGone when src leaves the region)."""
        heard = dst_conn.heard_from
        if heard is None:
            heard = dst_conn.heard_from = set()
        elif src in heard:
            return
        heard.add(src)
        self._listeners.setdefault(src, set()).add(dst_conn.conn_id)

    def _forget_listener(self, conn: Conn) -> None:
        """Hook: `conn` is gone; it no longer waits for PeerGone of the keys it heard from."""
        for key in conn.heard_from or ():
            ids = self._listeners.get(key)
            if ids is not None:
                ids.discard(conn.conn_id)
                if not ids:
                    del self._listeners[key]
        conn.heard_from = None

    def _gone_from_region(self, key: bytes) -> None:
        """PeerGone(Disconnected) to every open connection that has heard from `key`."""
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
