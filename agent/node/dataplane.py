"""The per-packet pipeline: TUN <-> WireGuard device <-> UDP, batched, on the event loop's thread.

Outbound (TUN readable; `on_tun_readable`):
  1. TUN read and segmentation, one `TunIo.read` (node/fastpath.py: the compiled batch or its
     Python twin): up to `max_tun_reads` reads until EAGAIN (one read after a quiet spell,
     see below); super-packets (TSO/USO, up to 64 KB, ~45 segments at MTU 1420) cut into
     wire-size IP packets with complete checksums, grouped in runs of one destination.
  2. Routing, once per run: a drained batch is mostly one flow.
  3. Encryption, once per peer per drained batch (`PeerLike.encrypt`, sealing in the Device's
     `Transport`): nonce order is the order of the batch, so a peer's packets keep their order.
  4. Transmission through the `PeerSender` (node/transport.py): UDP GSO, one `sendmsg` per
     run of up to 64 equal-size datagrams, and/or the peer's DERP region.

Inbound (UDP readable; `on_udp_readable`):
  1. UDP receive with GRO, draining up to `max_datagrams` datagrams until EAGAIN (one receive
     after a quiet spell); one receive is a run of datagrams of one source.
  2. Decryption, replay and allowed-IP checks, once per run of one receiver index
     (`DeviceLike.receive_batch`); handshake replies and keepalives come back in the same
     result and are sent at once.
  3. Coalescing and TUN write, one `TunIo.write`: in-order TCP segments of one flow become one
     GSO packet; with USO, equal-size UDP datagrams of one flow become one UDP_L4 GSO packet
     (up to 64 small datagrams per TUN write instead of one write each).

Relayed (a DERP link delivered datagrams; `on_relayed`): the same as inbound, with the region's
pseudo-endpoint as the source; replies go back through that region to the sending key.

Nothing here runs once per packet on the event loop: asyncio calls each handler once per
readiness and the handler drains a batch, then calls `on_activity()` once so the daemon can
re-arm its single timer. Drops are counted by `DropReason`; a `RemoteProtocolError` from the
device is counted by its `reason` and never raised.

With the compiled data plane (`lanes`, and `pump` as the daemon asks) one thread more reads both
fds in place of these readers (node/lane_pump.py): a known peer's packets go out the moment they
are readable, in compiled code, and `_on_pump` handles what it hands back here as the readers
would have (the Python path for the rest, the lanes' bookkeeping). The Python data plane has no
such thread (its batches hold the GIL throughout: a thread measured slower than one loop).

A lone packet (ping, request/response) pays for every syscall and every trip through the event
loop, so two things keep its path short. A wakeup more than SPARSE_GAP after the previous one on
the same fd reads once instead of draining (the read that finds the queue empty is saved; if
more was queued, the level-triggered reader fires again at once, and that wakeup drains). And a
lone packet written into a quiet TUN is followed by one TUN read in the same handler: what the
write provoked (an echo reply, a TCP ACK) is usually queued before the write returns, and goes
out without an epoll round trip.

A TUN read that fails with anything but EAGAIN (EBADFD once `ip link del` removed the interface
from under us) is fatal, as in wireguard-go: both fds are detached at once (a dead TUN fd stays
readable, so a level-triggered reader would spin), one error line names the interface and the
error, and `on_fatal` runs. The default raises SystemExit(1): the event loop unwinds, the daemon's
cleanup runs, the process exits 1 (a supervisor with Restart=on-failure recreates the interface).
"""

from __future__ import annotations

import asyncio
import errno
import math
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from agent.engine.paths import derp_endpoint, derp_region_of
from agent.keys import NodePublic
from agent.log import get_logger
from agent.node.access import Access
from agent.node.dataplane_stats import DataPlaneStats
from agent.node.fastpath import PythonTunIo, TunIo, TunRead
from agent.node.lane_keeper import BOOK_INTERVAL, LaneKeeper
from agent.node.lane_pump import PUMP_BOOK_DELAY, LanePump
from agent.node.lanes import Answer, FastRx, FastTx, LaneLike, LanePaths, NativeLanes
from agent.node.tun import Tun
from agent.node.udp import Endpoint, UdpSocket
from agent.proto.errors import DropReason, RemoteProtocolError
from agent.proto.offload import Buffer
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.peer import Peer

__all__ = [
    "Endpoint",
    "PeerLike",
    "PeerSender",
    "ForeignHandler",
    "LocalHandler",
    "RxResult",
    "DeviceLike",
    "DataPlaneStats",
    "DataPlane",
    "MAX_TUN_READS",
    "MAX_UDP_DATAGRAMS",
    "EXIT_TUN_FAILED",
    "exit_on_tun_failure",
]

log = get_logger("agent.dataplane")

MAX_TUN_READS = 64
MAX_UDP_DATAGRAMS = 512
# A wakeup more than this after the previous one on the same fd is "sparse": one read, no
# drain (the read that would find the queue empty costs a syscall and an exception; if more
# is queued, the level-triggered reader fires again at once and that wakeup drains).
SPARSE_GAP = 0.001
EXIT_TUN_FAILED = 1


def exit_on_tun_failure(error: OSError) -> None:
    """The default `on_fatal`: stop the process with status EXIT_TUN_FAILED."""
    raise SystemExit(EXIT_TUN_FAILED)


class PeerLike(Protocol):
    """One WireGuard peer as the data plane sees it."""

    @property
    def public_key(self) -> NodePublic: ...

    @property
    def endpoint(self) -> Endpoint | None:
        """Where WireGuard last heard this peer (None: not known yet)."""
        ...

    def encrypt(
        self, packets: Sequence[bytes | bytearray | memoryview], now: float
    ) -> Sequence[bytes | bytearray]:
        """Datagrams for `endpoint` (may include a handshake initiation; empty if staged)."""
        ...


class RxResult(Protocol):
    """What the device made of a run of received datagrams."""

    @property
    def packets(self) -> Sequence[bytes | bytearray | memoryview]:
        """Plaintext IP packets for the TUN."""
        ...

    @property
    def replies(self) -> Sequence[tuple[bytes | bytearray, Endpoint]]:
        """Handshake/cookie replies and keepalives to send."""
        ...

    @property
    def peers(self) -> Sequence[PeerLike]:
        """Peers that authenticated a message of the batch."""
        ...

    @property
    def foreign(self) -> Sequence[bytes | bytearray | memoryview]:
        """Datagrams that are not WireGuard messages (DISCO, STUN, junk)."""
        ...


# Non-WireGuard datagrams from one source (DISCO, STUN): (datagrams, src, DERP sender key, now)
ForeignHandler = Callable[[Sequence[Buffer], Endpoint, NodePublic | None, float], None]
# A packet from the TUN that no peer's allowed IPs take; True when this node serves it.
LocalHandler = Callable[[bytes], bool]


class PeerSender(Protocol):
    """Where a peer's datagrams go (node/transport.py): UDP, DERP, or both."""

    def has_path(self, peer: PeerLike, now: float) -> bool: ...

    def direct(self, peer: PeerLike, now: float) -> tuple[Endpoint, float] | None:
        """The WireGuard socket alone, to this endpoint, until this time unless something
        changes first; None when the peer's datagrams go elsewhere too (a lane may send
        only where this says)."""
        ...

    def note_sent(self, peer: PeerLike, now: float) -> None:
        """A lane sent `peer` data to `direct`'s endpoint."""
        ...

    def send_to_peer(
        self, peer: PeerLike, datagrams: Sequence[bytes | bytearray], now: float
    ) -> int:
        """Send; returns how many datagrams were dropped."""
        ...

    def send_to_endpoint(
        self, datagrams: Sequence[bytes | bytearray], endpoint: Endpoint, key: NodePublic | None
    ) -> int:
        """Reply to where a message came from (`key`: the sender, for DERP)."""
        ...

    def received(self, peers: Sequence[PeerLike], src: Endpoint, now: float) -> None:
        """`peers` authenticated messages from `src`."""
        ...


class _UdpOnly:
    """The default sender: everything over UDP to the peer's WireGuard endpoint."""

    def __init__(self, udp: UdpSocket) -> None:
        self.udp = udp

    def has_path(self, peer: PeerLike, now: float) -> bool:
        return peer.endpoint is not None

    def direct(self, peer: PeerLike, now: float) -> tuple[Endpoint, float] | None:
        ep = peer.endpoint
        return None if ep is None or derp_region_of(ep) is not None else (ep, math.inf)

    def note_sent(self, peer: PeerLike, now: float) -> None:
        pass

    def send_to_peer(
        self, peer: PeerLike, datagrams: Sequence[bytes | bytearray], now: float
    ) -> int:
        ep = peer.endpoint
        return len(datagrams) if ep is None else self.udp.send_batch(datagrams, ep)

    def send_to_endpoint(
        self, datagrams: Sequence[bytes | bytearray], endpoint: Endpoint, key: NodePublic | None
    ) -> int:
        return self.udp.send_batch(datagrams, endpoint)

    def received(self, peers: Sequence[PeerLike], src: Endpoint, now: float) -> None:
        pass


class DeviceLike(Protocol):
    """The sans-I/O WireGuard device driven by the data plane."""

    def route(self, dst: bytes) -> PeerLike | None:
        """The peer whose allowed IPs hold `dst` (4 or 16 raw address bytes)."""
        ...

    def receive_batch(
        self, datagrams: Sequence[bytes | bytearray | memoryview], src: Endpoint, now: float
    ) -> RxResult:
        """Handle datagrams from one source."""
        ...


class DataPlane:
    """Moves packets between a TUN and a UDP socket through a `DeviceLike`, in batches."""

    def __init__(
        self,
        tun: Tun,
        udp: UdpSocket,
        device: DeviceLike,
        clock: Callable[[], float],
        on_activity: Callable[[], None],
        *,
        max_tun_reads: int = MAX_TUN_READS,
        max_datagrams: int = MAX_UDP_DATAGRAMS,
        sender: PeerSender | None = None,
        on_foreign: ForeignHandler | None = None,
        on_fatal: Callable[[OSError], None] = exit_on_tun_failure,
        on_local: LocalHandler | None = None,
        access: Access | None = None,
        tun_io: TunIo | None = None,
        lanes: LanePaths | None = None,
        pump: bool = False,
    ) -> None:
        self.tun = tun
        # The TUN batches: the Python twin over `tun`, or the compiled ones (node/fastpath.py)
        self.tun_io: TunIo = tun_io if tun_io is not None else PythonTunIo(tun)
        self.on_local = on_local
        self.access = access if access is not None else Access(clock)
        self.on_fatal = on_fatal
        self.udp = udp
        self.sender: PeerSender = sender if sender is not None else _UdpOnly(udp)
        self.on_foreign = on_foreign
        self.device = device
        self.clock = clock
        self.on_activity = on_activity
        self.max_tun_reads = max_tun_reads
        self.max_datagrams = max_datagrams
        self.stats = DataPlaneStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        # When each fd last woke us (clock seconds): after a quiet spell a wakeup reads once
        self._tun_seen = -math.inf
        self._udp_seen = -math.inf
        # Lanes (node/lanes.py): a known peer's packets in one call each way; they need the
        # real WireGuard device (its route cache, sessions and peers)
        self.keeper: LaneKeeper | None = None
        if lanes is not None:
            dev = cast(Device, device)
            self.keeper = LaneKeeper(
                lanes,
                lambda: dev.peers,
                self.sender,
                self.stats,
                dev.count_drop,
                send=self._send_datagrams,
                reply=self._send_replies,
            )
        # The lanes' own thread (node/lane_pump.py): with the compiled lanes and `pump`, it
        # reads both fds in place of the loop's readers
        self._pump: LanePump | None = None
        self._threaded = False  # the pump reads the fds (not the loop's readers)
        if pump and isinstance(lanes, NativeLanes):
            self._pump = LanePump(
                lanes,
                max_reads=max_tun_reads,
                max_datagrams=max_datagrams,
                sparse_gap=SPARSE_GAP,
                book_delay=PUMP_BOOK_DELAY,
            )
        self._slow = False  # the current handler ran the Python path
        self._booked = False  # the current handler ran the lanes' timer bookkeeping
        self._fast_only = False  # the last handler ran lanes only (nothing to revalidate)
        self._book_timer: asyncio.TimerHandle | None = None  # runs what the lanes left due

    # ------------------------------------------------------------------ event loop

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register both fds with `loop` (level-triggered readers)."""
        if self._loop is not None:
            raise RuntimeError("data plane already attached")
        self._loop = loop
        pump = self._pump
        if pump is not None:
            self._configure_pump()
            loop.add_reader(pump.wake_fd, self._on_pump)
            pump.start()
            self._threaded = True
            return
        loop.add_reader(self.tun.fileno(), self.on_tun_readable)
        loop.add_reader(self.udp.fileno(), self.on_udp_readable)

    def detach(self) -> None:
        if self._book_timer is not None:
            self._book_timer.cancel()
            self._book_timer = None
        loop, self._loop = self._loop, None
        if loop is None:
            return
        pump = self._pump
        if self._threaded and pump is not None:
            self._threaded = False
            pump.stop()
            loop.remove_reader(pump.wake_fd)
        else:
            loop.remove_reader(self.tun.fileno())
            loop.remove_reader(self.udp.fileno())

    @property
    def threaded(self) -> bool:
        """The lanes' thread reads the fds (node/lane_pump.py)."""
        return self._threaded

    def _configure_pump(self) -> None:
        pump, keeper = self._pump, self.keeper
        if pump is not None and keeper is not None:
            pump.configure(
                cast(Device, self.device).route_cache,
                keeper.rx_lanes,
                self.access.fast_view(),
                self.access.filter is not None,
            )

    def _on_pump(self) -> None:
        """What the lanes' thread read and left for Python, handled as the readers would."""
        pump = self._pump
        assert pump is not None
        now = self.clock()
        self._slow = self._booked = False
        results, sums = pump.take()
        stats = self.stats
        stats.tun_reads += sums.tun_reads
        stats.udp_reads += sums.udp_reads
        self._book_received(
            sums.authentication,
            sums.replay,
            sums.not_ip,
            sums.malformed,
            sums.tun_writes,
            sums.write_failed,
            sums.used,
            now,
        )
        for r in results:
            stats.pump_batches += 1
            if isinstance(r, FastTx):
                if not self._tun_batch(r.rest, r.lanes, now) and r.rest.error is not None:
                    return  # the TUN failed: detached
            elif isinstance(r, FastRx):
                if r.answered is not None:
                    self._tun_batch(r.answered.rest, r.answered.lanes, now)
                self._lanes_received(r, now, answer=False)
            else:
                self._pump_failed(r)
                return
        if sums.used or sums.tun_reads or sums.udp_reads:
            stats.pump_batches += 1
        self._done(now)

    def _pump_failed(self, error: BaseException) -> None:
        """The thread ended on an error: say so, and read both fds from the loop again."""
        log.error("data plane thread failed; the event loop reads instead", error=repr(error))
        loop = self._loop
        pump = self._pump
        assert loop is not None
        assert pump is not None
        self._threaded = False
        pump.stop()
        loop.remove_reader(pump.wake_fd)
        loop.add_reader(self.tun.fileno(), self.on_tun_readable)
        loop.add_reader(self.udp.fileno(), self.on_udp_readable)

    # ------------------------------------------------------------------ outbound

    def on_tun_readable(self) -> None:
        """Drain the TUN: segment, route, encrypt per peer, send with GSO."""
        now = self.clock()
        sparse = now - self._tun_seen > SPARSE_GAP
        self._tun_seen = now
        self._slow = self._booked = False
        if self._from_tun(1 if sparse else self.max_tun_reads, now):
            self._done(now)

    def _done(self, now: float) -> None:
        """The end of a handler: the daemon hears of it (`on_activity`) unless only lanes ran
        and their timer bookkeeping waits (no deadline moved, nothing to log or revalidate)."""
        keeper = self.keeper
        if keeper is not None and keeper.due:
            self._book_later(now)
        if self._slow or self._booked or keeper is None:
            self._fast_only = not self._slow
            self.on_activity()

    def _book_later(self, now: float) -> None:
        if self._book_timer is not None:
            return
        if self._loop is None:
            self._book_due()
            return
        self._book_timer = self._loop.call_at(now + BOOK_INTERVAL, self._book_due)

    def _book_due(self) -> None:
        """The lanes' timer bookkeeping that waited (LaneKeeper.settle)."""
        self._book_timer = None
        if self.keeper is not None:
            self.keeper.book_due(self.clock())
        self._fast_only = False
        self.on_activity()

    def revalidate_lanes(self, now: float) -> None:
        """After any activity (the daemon's flush): unless only lanes ran since the last call,
        arm every lane again from its peer's state, before the next packet can take it."""
        if self._fast_only:
            self._fast_only = False
            return
        if self.keeper is not None:
            self.keeper.revalidate(now)
            if self.threaded:
                self._configure_pump()

    def _from_tun(self, max_reads: int, now: float) -> bool:
        """Up to `max_reads` TUN reads, sent on to their peers; False if nothing was read."""
        keeper = self.keeper
        if keeper is None:
            return self._tun_batch(self.tun_io.read(max_reads), [], now)
        fast = keeper.paths.tx(
            max_reads, cast(Device, self.device).route_cache, now, self.access.filter is not None
        )
        return self._tun_batch(fast.rest, fast.lanes, now)

    def _tun_batch(self, batch: TunRead, used: Sequence[LaneLike], now: float) -> bool:
        """What a drain of the TUN read: the lanes' part booked, the rest routed, encrypted and
        sent per peer; False if nothing was read."""
        keeper = self.keeper
        packets = batch.packets
        stats = self.stats
        drops = stats.drops
        stats.tun_reads += batch.reads
        if batch.not_ip:
            drops[DropReason.NOT_IP] += batch.not_ip
        if batch.malformed:
            drops[DropReason.MALFORMED] += batch.malformed
        route = self.device.route
        # With a policy, what we send opens flows whose replies its filter lets back in.
        note = self.access.outbound if self.access.filter is not None else None
        # A run is its own list (a slice, or the whole batch when it is the only run), so the
        # first run of a peer is taken as it is and later ones extend it.
        per_peer: dict[int, tuple[PeerLike, list[bytes]]] = {}
        pos = 0
        for dst, count in batch.runs:
            run = packets if count == len(packets) else packets[pos : pos + count]
            pos += count
            peer = route(dst)
            if peer is None:
                # No peer: a service of this node (the DNS resolver at 100.100.100.100) may
                # take it. Asked only here, so routed traffic pays nothing for it.
                local = self.on_local
                if local is not None:
                    for p in run:
                        if local(bytes(p)):
                            stats.local += 1
                            count -= 1
                if count:
                    drops[DropReason.NO_ROUTE] += count
                continue
            entry = per_peer.get(id(peer))
            if entry is None:
                per_peer[id(peer)] = (peer, run)
            else:
                entry[1].extend(run)
            if note is not None:
                for p in run:
                    note(p)
        for peer, pkts in per_peer.values():
            self._send_to_peer(peer, pkts, now)
            if keeper is not None:
                keeper.arm(cast(Peer, peer), now)  # its next packets may take the lane
        if used and keeper is not None and keeper.settle(used, now):
            self._booked = True
        if batch.runs or batch.not_ip or batch.malformed:
            self._slow = True
        if batch.error is not None:
            self._tun_failed(batch.error)
            return False
        return batch.reads > 0 or bool(used)

    def _tun_failed(self, error: OSError) -> None:
        self.detach()
        code = errno.errorcode.get(error.errno, "") if error.errno else ""
        text = error.strerror or str(error)
        log.error(
            "TUN device failed, stopping",
            interface=self.tun.name,
            error=f"{code}: {text}" if code else text,
        )
        self.on_fatal(error)

    def _send_to_peer(self, peer: PeerLike, packets: Sequence[Buffer], now: float) -> None:
        stats = self.stats
        sender = self.sender
        if not sender.has_path(peer, now):
            stats.drops[DropReason.NO_ENDPOINT] += len(packets)
            return
        try:
            datagrams = peer.encrypt(packets, now)
        except RemoteProtocolError as e:
            stats.drops[e.reason] += len(packets)
            return
        stats.tx_packets += len(packets)
        stats.tx_bytes += sum(map(len, packets))
        if datagrams:
            self._send_datagrams(peer, datagrams, now)

    def _send_datagrams(
        self, peer: PeerLike, datagrams: Sequence[bytes | bytearray], now: float
    ) -> None:
        """Datagrams for `peer` over its path, counted (failures as SEND_FAILED)."""
        stats = self.stats
        failed = self.sender.send_to_peer(peer, datagrams, now)
        if failed:
            stats.drops[DropReason.SEND_FAILED] += failed
        stats.tx_datagrams += len(datagrams) - failed
        stats.tx_wire_bytes += sum(map(len, datagrams))

    def _send_replies(
        self, replies: Sequence[tuple[bytes | bytearray, Endpoint]], key: NodePublic | None
    ) -> None:
        """Handshake replies and keepalives, each back where its message came from."""
        stats = self.stats
        for data, endpoint in replies:
            failed = self.sender.send_to_endpoint([data], endpoint, key)
            if failed:
                stats.drops[DropReason.SEND_FAILED] += failed
            else:
                stats.tx_datagrams += 1
                stats.tx_wire_bytes += len(data)

    # ------------------------------------------------------------------ inbound

    def on_udp_readable(self) -> None:
        """Drain the socket: decrypt per GRO run, send replies, coalesce and write the TUN."""
        now = self.clock()
        sparse = now - self._udp_seen > SPARSE_GAP
        self._udp_seen = now
        self._slow = self._booked = False
        if self.keeper is not None:
            self._udp_lanes(1 if sparse else self.max_datagrams, now, sparse)
            return
        batches = self.udp.recv_batch(1 if sparse else self.max_datagrams)
        if not batches:
            return
        self.stats.udp_reads += len(batches)
        self._inbound(batches, None, now, answer=sparse)

    def _udp_lanes(self, max_datagrams: int, now: float, sparse: bool) -> None:
        """`on_udp_readable` with lanes: theirs opened and written in one call, the rest the
        Python way (`_inbound`)."""
        keeper = self.keeper
        assert keeper is not None
        device = cast(Device, self.device)
        # A lone packet into a quiet TUN: its answer (an echo reply, an ACK) leaves in the same
        # call, before any bookkeeping (see _answer)
        answer = (
            Answer(1, self.access.filter is not None)
            if sparse and now - self._tun_seen > SPARSE_GAP
            else None
        )
        r = keeper.paths.rx(
            max_datagrams,
            keeper.rx_lanes,
            device.route_cache,
            now,
            self.access.fast_view(),
            answer,
        )
        if not r.receives:
            return
        if r.answered is not None and self._tun_batch(r.answered.rest, r.answered.lanes, now):
            self._tun_seen = now
        self._lanes_received(r, now, answer=sparse and r.answered is None)
        self._done(now)

    def _lanes_received(self, r: FastRx, now: float, *, answer: bool) -> None:
        """A fast_rx batch's bookkeeping, then its packets to judge and its datagrams for the
        Python path (`answer` as `_inbound` takes it)."""
        self.stats.udp_reads += r.receives
        self._book_received(
            r.authentication, r.replay, r.not_ip, r.malformed, r.writes, r.failed, r.lanes, now
        )
        if r.checks:
            self._slow = True
            self._check_sources(r.checks, cast(Device, self.device))
        if r.slow:
            self._inbound(r.slow, None, now, answer=answer, done=False)

    def _book_received(
        self,
        authentication: int,
        replay: int,
        not_ip: int,
        malformed: int,
        writes: int,
        failed: int,
        lanes: Sequence[LaneLike],
        now: float,
    ) -> None:
        """Counts of lanes' receive batches, and what their lanes did (`LaneKeeper.settle`)."""
        keeper = self.keeper
        assert keeper is not None
        stats = self.stats
        if authentication or replay or not_ip or malformed:
            stats.rx_datagrams += authentication + replay
            keeper.count_rx_drops(authentication, replay, not_ip, malformed)
        if writes:
            stats.tun_writes += writes
        if failed:
            stats.drops[DropReason.TUN_WRITE_FAILED] += failed
            stats.rx_packets -= failed
        if lanes and keeper.settle(lanes, now):
            self._booked = True

    def _check_sources(self, checks: Sequence[tuple[LaneLike, bytes]], device: Device) -> None:
        """Packets a lane opened whose source its route cache did not vouch for: cryptokey
        routing (the source's longest prefix must be the sender's), then the filter."""
        keeper = self.keeper
        assert keeper is not None
        route = device.route
        keep: list[Buffer] = []
        for lane, pkt in checks:
            src = pkt[12:16] if pkt[0] >> 4 == 4 else pkt[8:24]
            peer = keeper.peer_of(lane)
            if peer is not None and route(src) is peer:
                keep.append(pkt)
            else:
                device.count_drop(DropReason.DISALLOWED_SOURCE)
        if keep and self.access.filter is not None:
            keep = self.access.inbound(keep, self.stats.drops)
        if keep:
            self._write_tun(keep)

    def on_relayed(self, region: int, src_key: NodePublic, datagrams: list[bytes]) -> None:
        """Datagrams that `src_key` sent us through DERP region `region`."""
        batch = [(datagrams, derp_endpoint(region))]
        self._inbound(batch, src_key, self.clock(), answer=len(datagrams) == 1)

    def on_datagrams(self, batches: Sequence[tuple[Sequence[Buffer], Endpoint]]) -> None:
        """Datagrams another UDP socket of this node read (node/birthday_io.py): inbound as
        from the WireGuard socket; replies leave through the sender, which picks the socket."""
        self._inbound(batches, None, self.clock(), answer=False)

    def _inbound(
        self,
        batches: Sequence[tuple[Sequence[Buffer], Endpoint]],
        key: NodePublic | None,
        now: float,
        *,
        answer: bool,
        done: bool = True,
    ) -> None:
        """Open, filter and write to the TUN what arrived; `answer`: a lone packet into a quiet
        TUN, whose answer is read at once (`_answer`); `done`: end the handler (`_done`)."""
        self._slow = True
        plaintext: list[Buffer] = []
        for datagrams, src in batches:
            self._receive(datagrams, src, key, now, plaintext)
        if plaintext:
            self._write_tun(plaintext)
            if answer:
                self._answer(now)
        if done:
            self._done(now)

    def _answer(self, now: float) -> None:
        """After a lone packet went into a quiet TUN: its answer (an echo reply, a TCP ACK)
        is usually queued before the write returns, so read it now rather than after a trip
        through the event loop. Not when we sent recently: then the packet is more likely the
        answer to ours, and nothing follows it. (With the lanes' thread, it reads the answer.)"""
        if self.threaded:
            return
        if now - self._tun_seen > SPARSE_GAP and self._from_tun(1, now):
            self._tun_seen = now

    def _receive(
        self,
        datagrams: Sequence[Buffer],
        src: Endpoint,
        key: NodePublic | None,
        now: float,
        plaintext: list[Buffer],
    ) -> None:
        stats = self.stats
        stats.rx_datagrams += len(datagrams)
        stats.rx_wire_bytes += sum(map(len, datagrams))
        try:
            result = self.device.receive_batch(datagrams, src, now)
        except RemoteProtocolError as e:
            stats.drops[e.reason] += len(datagrams)
            return
        if result.packets:
            if self.access.filter is None:
                plaintext.extend(result.packets)
            else:
                plaintext.extend(self.access.inbound(result.packets, stats.drops))
        if result.foreign:
            if self.on_foreign is not None:
                self.on_foreign(result.foreign, src, key, now)
            else:
                stats.drops[DropReason.MALFORMED] += len(result.foreign)
        sender = self.sender
        if result.peers:
            sender.received(result.peers, src, now)
            keeper = self.keeper
            if keeper is not None:
                for peer in result.peers:
                    keeper.arm(cast(Peer, peer), now)
        if result.replies:
            self._send_replies(result.replies, key)

    def _write_tun(self, packets: list[Buffer]) -> None:
        stats = self.stats
        writes, failed = self.tun_io.write(packets)
        stats.tun_writes += writes
        if failed:
            stats.drops[DropReason.TUN_WRITE_FAILED] += failed
        stats.rx_packets += len(packets) - failed
        stats.rx_bytes += sum(map(len, packets))
