"""Region mesh for `agent derper`: one outbound DERP client per other node of the region.

Upstream: tailscale cmd/derper/mesh.go. Every node of a region is started with the same mesh key
(`--mesh-key-file`, 64 hex digits) and the list of the region's nodes (`--mesh-with`). For each
other node a `MeshLink` keeps one connection:

    agent.netio.derp_dial (TLS, GET /derp, 101) -> DerpClientConn(our SERVER key, meshKey,
    CanAckPings false) -> Connected -> WatchConns
      PeerPresent(K)            core.mesh_peer_present(node, K)
      PeerGone(K) (any reason)  core.mesh_peer_gone(node, K)
      connection lost           core.mesh_peer_lost(node), retry after backoff with jitter
      remote server key == ours the node is ourselves: stop for good

The relay's flush turns the core's `ForwardToMesh(node, …)` events of one input into one
`MeshLink.forward_many` per node, which writes their ForwardPackets on that link in one write
(dropped, and counted, while the link is down or its write buffer is over MESH_MAX_BUFFER).
Nothing is ever forwarded across regions: only listed nodes are dialled, and the core forwards at
most one hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from structlog.typing import FilteringBoundLogger

from agent.netio.derp_dial import dial_derp
from agent.proto.derp.client import (
    Closed,
    Connected,
    DerpClientConn,
    PeerGoneEvent,
    PeerPresentEvent,
)
from agent.proto.derp.server import MESH_KEY_LEN, RelayCore
from agent.proto.endpoint import format_endpoint, host_header
from agent.proto.errors import RemoteProtocolError

__all__ = [
    "MESH_RETRY_BASE",
    "MESH_RETRY_MAX",
    "MESH_MAX_BUFFER",
    "MeshPeer",
    "MeshLink",
    "load_mesh_key",
    "parse_mesh_with",
]

MESH_RETRY_BASE: Final = 0.5  # first retry delay; doubles per failure
MESH_RETRY_MAX: Final = 5.0  # derper retries its mesh connections every 5 s
MESH_MAX_BUFFER: Final = 4 << 20  # one mesh link carries many clients' packets
_READ_SIZE: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class MeshPeer:
    """Another node of our region. `name` ("host:port") is its id in RelayCore and in logs."""

    host: str
    port: int

    @property
    def name(self) -> str:
        return format_endpoint((self.host, self.port))

    @property
    def host_header(self) -> str:
        return host_header(self.host, self.port)


def parse_mesh_with(text: str, *, own: Iterable[tuple[str, int]] = ()) -> list[MeshPeer]:
    """`--mesh-with`: comma-separated `https://HOST[:PORT]` (or bare `HOST[:PORT]`), port 443 by
    default. Entries equal to one of our own `(host, port)` are skipped; ValueError on a bad one."""
    skip = {(_norm_host(h), p) for h, p in own}
    peers: list[MeshPeer] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        url = urlsplit(entry if "://" in entry else f"https://{entry}")
        try:
            port = url.port or 443
        except ValueError:
            port = -1
        if url.scheme != "https" or not url.hostname or port < 1 or url.path not in ("", "/"):
            raise ValueError(f"--mesh-with {entry!r}: expected https://HOST[:PORT]")
        peer = MeshPeer(url.hostname, port)
        if (_norm_host(peer.host), port) not in skip and peer not in peers:
            peers.append(peer)
    return peers


def _norm_host(host: str) -> str:
    host = host.strip("[]").lower()
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return host


def load_mesh_key(path: Path) -> bytes:
    """The region's mesh key: a file holding 64 hex digits (whitespace around is ignored)."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != MESH_KEY_LEN or len(text) != 2 * MESH_KEY_LEN:
        raise ValueError(f"mesh key file {path}: expected {2 * MESH_KEY_LEN} hex digits")
    return key


class MeshLink:
    """Our outbound watch-and-forward connection to one other node of the region."""

    def __init__(
        self,
        peer: MeshPeer,
        *,
        core: RelayCore,
        private_key: bytes,
        mesh_key: bytes,
        ssl_context: ssl.SSLContext | None,
        on_change: Callable[[], None],
        log: FilteringBoundLogger,
        retry_base: float = MESH_RETRY_BASE,
        retry_max: float = MESH_RETRY_MAX,
    ) -> None:
        self.peer = peer
        self.core = core
        self._private = private_key
        self._mesh_key = mesh_key
        self._ssl = ssl_context
        self._on_change = on_change
        self.log = log.bind(mesh_peer=peer.name)
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._conn: DerpClientConn | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Counters for metrics and tests.
        self.connected = False
        self.sessions = 0  # logins that reached Connected
        self.forwarded = 0
        self.dropped = 0
        self.is_self = False

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn about it

    @property
    def running(self) -> bool:
        """The dial loop is alive (False once stopped, or after finding the peer is ourselves)."""
        return self._task is not None and not self._task.done()

    # --- forwarding -----------------------------------------------------------------------------

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Write ForwardPacket(src, dst, packet) to the peer; False (counted) if it cannot go."""
        return self.forward_many([(src, dst, packet)]) == 1

    def forward_many(self, packets: Sequence[tuple[bytes, bytes, bytes]]) -> int:
        """Write a ForwardPacket for each `(src, dst, packet)` in one write; returns how many
        went (all or none: none, counted as dropped, while the link is down or backed up)."""
        conn, writer = self._conn, self._writer
        if (
            not self.connected
            or conn is None
            or writer is None
            or writer.is_closing()
            or writer.transport.get_write_buffer_size() > MESH_MAX_BUFFER
        ):
            self.dropped += len(packets)
            return 0
        now = asyncio.get_running_loop().time()
        for src, dst, packet in packets:
            conn.forward_packet(src, dst, packet, now)
        writer.write(conn.data_to_send())
        self.forwarded += len(packets)
        return len(packets)

    # --- the connection loop --------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if await self._session():
                    failures = 0
            except (OSError, TimeoutError, RemoteProtocolError, ssl.SSLError) as exc:
                self.log.info("mesh_link_failed", error=str(exc) or type(exc).__name__)
            if self.is_self:
                self.log.info("mesh_link_is_self")
                return
            delay = min(self._retry_max, self._retry_base * 2**failures)
            failures = min(failures + 1, 16)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self) -> bool:
        """One connection, until it drops. True when it got as far as Connected."""
        loop = asyncio.get_running_loop()
        peer = self.peer
        upgraded = await dial_derp(peer.host, peer.port, ssl_context=self._ssl)
        reader, writer = upgraded.streams()
        conn = DerpClientConn(self._private, can_ack_pings=False, mesh_key=self._mesh_key)
        reached = False
        try:
            self._conn, self._writer = conn, writer
            conn.connection_made(loop.time())
            data = b""  # the bytes that came with the 101 are the reader's first
            while True:
                if data:
                    conn.receive_data(data, loop.time())
                if self._handle_events(conn):
                    return reached
                reached = reached or self.connected
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                try:
                    async with asyncio.timeout_at(conn.next_deadline()):
                        data = await reader.read(_READ_SIZE)
                except TimeoutError:
                    conn.on_timer(loop.time())
                    data = b""
                    continue
                if not data:
                    self.log.info("mesh_link_eof")
                    return reached
        finally:
            was_connected = self.connected
            self.connected = False
            self._conn = self._writer = None
            self.core.mesh_peer_lost(peer.name)
            self._on_change()
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            if was_connected:
                self.log.info("mesh_link_down")

    def _handle_events(self, conn: DerpClientConn) -> bool:
        """Apply the client's events to the core; True when the session must end."""
        changed = False
        for event in conn.events():
            if isinstance(event, Connected):
                if event.server_key == self.core.public_key:
                    self.is_self = True
                    return True
                conn.watch_conns()
                self.connected = True
                self.sessions += 1
                self.log.info("mesh_link_up", server_key=event.server_key.hex())
            elif isinstance(event, PeerPresentEvent):
                self.core.mesh_peer_present(self.peer.name, event.key)
                changed = True
            elif isinstance(event, PeerGoneEvent):
                self.core.mesh_peer_gone(self.peer.name, event.key)
                changed = True
            elif isinstance(event, Closed):
                self.log.info("mesh_link_closed", reason=event.reason)
                return True
        if changed:
            self._on_change()  # PeerGone to local clients may be pending in the core
        return False
