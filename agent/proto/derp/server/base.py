"""The relay core's tables and output buffers, shared by its concern modules.

`RelayCore` is assembled from one class per concern (`login`, `routing`, `mesh`, `ratelimit`),
each a mixin over `RelayBase`. The base holds what they share: the connection table, the output
buffers, events, counters and drops, and names (as stubs) the few methods one concern calls in
another, so every cross-concern call is listed here.

Cost model (a relay holds many mostly idle connections): no input does work proportional to the
number of connections. Connections with output pending are kept in an ordered set that
`take_output()` drains, deadlines live in heaps with lazy invalidation, and watchers, mesh
connections and "who heard from key K" are indexed.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.proto.derp.server.conn import Conn, KeySet
from agent.proto.derp.server.events import RelayCounters, RelayEvent
from agent.proto.errors import DropReason

__all__ = ["RelayBase"]


class RelayBase:
    """Shared state of the relay core, and its outputs."""

    # Static after construction (set by RelayCore).
    public_key: bytes
    _private: bytes
    _server_key_frame: bytes
    _randbytes: Callable[[int], bytes]
    _verify_client: Callable[[bytes], bool] | None
    _mesh_key: bytes | None
    _client_info_timeout: float

    def __init__(self) -> None:
        # Owned by the core.
        self._conns: dict[int, Conn] = {}
        self._dirty: dict[int, None] = {}  # conns with output pending, in order (ordered set)
        self._timers: list[tuple[float, int]] = []  # heap; stale when != Conn.deadline
        self._events: list[RelayEvent] = []
        # Owned by routing.
        self._clients: dict[bytes, KeySet] = {}
        self._registered = 0  # registered conns, all keys
        self._listeners: dict[bytes, set[int]] = {}  # key -> conns whose heard_from holds it
        # Owned by mesh.
        self._remote: dict[bytes, list[str]] = {}  # key -> mesh nodes reporting it, oldest first
        self._remote_by_node: dict[str, set[bytes]] = {}
        self._watchers: set[int] = set()  # registered mesh conns that sent WatchConns
        self._mesh_ids: set[int] = set()  # registered mesh conns
        # Read by the shell. Keys are DropReason members (a StrEnum, so also str).
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

    def _out(self, conn: Conn) -> bytearray:
        """The connection's output buffer, created (and the connection marked dirty) if needed."""
        out = conn.out
        if out is None:
            out = conn.out = bytearray()
            self._dirty[conn.conn_id] = None
        return out

    def _drop(self, reason: DropReason) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _to_watchers(self, frame: bytes) -> None:
        for conn_id in self._watchers:
            self._out(self._conns[conn_id]).extend(frame)

    # --- calls across concerns: implemented where named -----------------------------------------

    def _close(self, conn: Conn, reason: str) -> None:  # core
        raise NotImplementedError

    def _arm(self, conn: Conn, deadline: float) -> None:  # core
        raise NotImplementedError

    def _frames(
        self, conn: Conn, data: bytes, pos: int, now: float, stop: int | None = None
    ) -> None:  # core
        raise NotImplementedError

    def _limit_new_client(self, conn: Conn, now: float) -> None:  # ratelimit
        raise NotImplementedError

    def _add_client(self, conn: Conn, key: bytes) -> None:  # routing
        raise NotImplementedError

    def _deliver_local(
        self, via: Conn, src: bytes, dst: bytes, packet: bytes, now: float, unknown: DropReason
    ) -> None:  # routing
        raise NotImplementedError

    def _gone_from_region(self, key: bytes) -> None:  # routing
        raise NotImplementedError
