"""Relay region mesh: what our watcher connections report, and mesh peers' frames.

A connection is a mesh peer when its ClientInfo carries `meshKey` equal to ours (see `login`);
only mesh peers may send WatchConns, ForwardPacket and ClosePeer. As the shell drives it
(tailscale derp/derpserver/derpserver.go, addWatcher and the mesh forwarders):

    node 1 shell ──(outbound DERP client, meshKey, WatchConns)──> node 3 RelayCore
      PeerPresent(K) / PeerGone(K)  ->  core1.mesh_peer_present("n3", K) / mesh_peer_gone("n3", K)
      connection to n3 lost         ->  core1.mesh_peer_lost("n3")
    core1 SendPacket(dst=K), K not local but on n3 -> event ForwardToMesh("n3", src, K, packet)
      -> shell sends ForwardPacket over its outbound connection to n3
    core3 ForwardPacket(src, K) from a mesh conn -> RecvPacket to a LOCAL K only (one hop), else
      drop `unknown_dest_on_fwd` and (disco, rate-limited) PeerGone(K, NotHere) back to n3
"""

from __future__ import annotations

from typing import Final

from agent.proto.derp.frames import ClosePeer, ForwardPacket, FrameType, PeerPresent, WatchConns
from agent.proto.derp.server.base import RelayBase
from agent.proto.derp.server.conn import Conn
from agent.proto.errors import DropReason

__all__ = ["MESH_KEY_LEN", "MESH_ONLY", "Mesh"]

MESH_KEY_LEN: Final = 32  # 64 hex digits in ClientInfo and in the key file
MESH_ONLY: Final = frozenset(
    {FrameType.FORWARD_PACKET, FrameType.WATCH_CONNS, FrameType.CLOSE_PEER}
)


class Mesh(RelayBase):
    """Keys other mesh nodes report, and the frames only mesh peers may send."""

    def remote_clients(self) -> dict[bytes, list[str]]:
        """Keys learned from mesh nodes, with the nodes reporting each (preferred one first)."""
        return {key: list(nodes) for key, nodes in self._remote.items()}

    def remote_count(self) -> int:
        return len(self._remote)

    def mesh_conns(self) -> list[int]:
        """Registered inbound connections that logged in with our mesh key."""
        return sorted(self._mesh_ids)

    # --- what our outbound watcher connections report -------------------------------------------

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

    # --- frames from inbound mesh peers ---------------------------------------------------------

    def _handle_mesh(self, conn: Conn, frame_type: int, payload: bytes, now: float) -> None:
        """A mesh-only frame from a connection that logged in with our mesh key."""
        if frame_type == FrameType.FORWARD_PACKET:
            fwd = ForwardPacket.parse(payload)
            self.counters.packets_forwarded_in += 1
            self._deliver_local(
                conn, fwd.src, fwd.dst, fwd.packet, now, DropReason.UNKNOWN_DEST_ON_FWD
            )
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
