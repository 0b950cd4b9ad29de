"""Which peers' packets take a lane (agent/node/lanes.py), and the bookkeeping after they did.

A lane runs what the Python path would have decided for a peer, so it is armed only while that
decision cannot change without Python running first:

  sending    the current session can send (`Keypair.can_send`), nothing is staged, and the
             path layer sends over the WireGuard socket alone (`PeerSender.direct`). Armed with
             the session's `Sealer` (its one send counter), that endpoint, at most
             REKEY_AFTER_MESSAGES, and until the earliest of the path's end of trust and the
             session's rekey (initiator, REKEY_AFTER_TIME) or end (REJECT_AFTER_TIME): the
             packet after any of these goes the Python way, which starts the handshake or
             picks the relay.
  receiving  messages on the current session (not `next`: its first packet rotates keys)
             from the endpoint the peer was last heard from (not a roam), until the session's
             REJECT_AFTER_TIME. With a packet filter, a packet passes in the lane only where
             the filter's cached decisions pass it; the rest goes to the filter in Python.

Everything else that could change a decision runs Python: a handshake, a roam, a DISCO pong,
a timer, a netmap, `wg set`. The data plane then calls `revalidate`, which arms every lane
again from scratch, before the next packet: a handler that ran only lanes says so, and only
then is revalidation skipped.

`settle(lanes, now)` is the per-batch bookkeeping of the lanes a call used, once the packets
are on their way: the counters at once (the data plane's, the peer's bytes), then the peer's
timers (`Peer.note_sent`, `Peer.on_transport`, exactly what the Python path runs), the path
layer's (`note_sent`, `received`) and an initiation or keepalive that they ask for. Those run
at most once per BOOK_INTERVAL per lane: a batch within that time of the last one leaves them
`due`, and the data plane runs `book_due` when the interval is over. WireGuard's timers count
in seconds, so a millisecond changes nothing they decide, and a stream of small batches no
longer pays for them each time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from agent.engine.paths import derp_region_of
from agent.keys import NodePublic
from agent.node.dataplane_stats import DataPlaneStats
from agent.node.lanes import LaneCounts, LaneLike, LanePaths
from agent.node.udp import Endpoint
from agent.proto.errors import DropReason
from agent.proto.wireguard.constants import (
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
)
from agent.proto.wireguard.peer import Peer
from agent.proto.wireguard.session import Keypair

__all__ = ["LaneKeeper", "LaneSender"]


class LaneSender(Protocol):
    """What the keeper asks of the data plane's sender (dataplane.PeerSender)."""

    def direct(self, peer: Peer, now: float) -> tuple[Endpoint, float] | None: ...

    def note_sent(self, peer: Peer, now: float) -> None: ...

    def received(self, peers: Sequence[Peer], src: Endpoint, now: float) -> None: ...


# The data plane's own sends, counted there: datagrams for a peer over its path, and replies
# back where a message came from (the key: DERP's sender, None over UDP).
SendToPeer = Callable[[Peer, list[bytes], float], None]
SendReplies = Callable[[list[tuple[bytes, Endpoint]], NodePublic | None], None]


BOOK_INTERVAL = 0.001  # seconds between two runs of one lane's timer bookkeeping


@dataclass(slots=True)
class _Armed:
    peer: Peer
    rx: Keypair | None  # the session the lane receives on
    source: Endpoint | None  # and from where
    booked: float = -math.inf  # when its timers were last told
    tx_due: bool = False  # data went out since
    rx_due: bool = False  # messages came in since
    rx_data: bool = False  # one of them carried a packet


class LaneKeeper:
    """Arms and settles the lanes of one data plane."""

    def __init__(
        self,
        paths: LanePaths,
        peers: Callable[[], dict[NodePublic, Peer]],
        sender: LaneSender,
        stats: DataPlaneStats,
        device_drop: Callable[[DropReason, int], None],
        *,
        send: SendToPeer,
        reply: SendReplies,
    ) -> None:
        self.paths = paths
        self._peers = peers  # the device's peers, to notice removed ones
        self.sender = sender
        self.stats = stats
        self._device_drop = device_drop
        self._send = send
        self._reply = reply
        self.rx_lanes: dict[int, LaneLike] = {}  # receiver index -> lane (read by the rx batch)
        self._armed: dict[LaneLike, _Armed] = {}
        self._due: list[LaneLike] = []  # lanes whose bookkeeping waits (settle)

    def __len__(self) -> int:
        return len(self._armed)

    def peer_of(self, lane: LaneLike) -> Peer | None:
        a = self._armed.get(lane)
        return a.peer if a is not None else None

    # -- arming -------------------------------------------------------------------------------
    def arm(self, peer: Peer, now: float) -> None:
        """Arm (or disarm) `peer`'s lane from its state now."""
        if peer.lane is None:
            peer.lane = self.paths.new_lane()
        armed_lane = cast(LaneLike, peer.lane)
        self._book_now(armed_lane, now)  # what waits belongs to the lane as it was armed
        kp = peer.keypairs.current
        tx = rx = False
        if kp is not None and not peer.staged and kp.can_send(now):
            d = self.sender.direct(peer, now)
            if d is not None:
                end = kp.created + (REKEY_AFTER_TIME if kp.is_initiator else REJECT_AFTER_TIME)
                tx = self.paths.arm_tx(
                    armed_lane, kp.sealer, d[0], REKEY_AFTER_MESSAGES, min(d[1], end)
                )
        if not tx:
            armed_lane.disarm_tx()
        old = armed_lane.rx_index
        src = peer.endpoint
        if (
            kp is not None
            and src is not None
            and derp_region_of(src) is None
            and kp.can_receive(now)
        ):
            rx = self.paths.arm_rx(
                armed_lane,
                kp.recv_aead,
                kp.replay,
                kp.local_index,
                src,
                kp.created + REJECT_AFTER_TIME,
            )
        index = kp.local_index if rx and kp is not None else None
        if old is not None and old != index and self.rx_lanes.get(old) is armed_lane:
            del self.rx_lanes[old]
        if index is not None:
            self.rx_lanes[index] = armed_lane
        else:
            armed_lane.disarm_rx()
        if tx or rx:
            self._armed[armed_lane] = _Armed(peer, kp if rx else None, src if rx else None)
        else:
            self._armed.pop(armed_lane, None)

    def revalidate(self, now: float) -> None:
        """Arm every armed lane again from its peer's state (a removed peer's lane goes)."""
        peers = self._peers()
        for lane, a in list(self._armed.items()):
            if peers.get(a.peer.public_key) is a.peer:
                self.arm(a.peer, now)
            else:
                self._drop(lane)

    def _drop(self, lane: LaneLike) -> None:
        """Disarm a removed peer's lane; what its bookkeeping waited for goes with it (the
        peer's timers stopped: telling them now would start them again)."""
        lane.disarm_tx()
        lane.disarm_rx()
        self._armed.pop(lane, None)
        for index in [i for i, v in self.rx_lanes.items() if v is lane]:
            del self.rx_lanes[index]

    # -- bookkeeping --------------------------------------------------------------------------
    def settle(self, lanes: Sequence[LaneLike], now: float) -> bool:
        """After a batch: what each used lane did, booked as the Python path books it. False
        when all of the timer bookkeeping waits (`due`): then no deadline moved."""
        stats = self.stats
        drops = stats.drops
        booked = False
        for lane in lanes:
            c = LaneCounts._make(lane.take())
            a = self._armed.get(lane)
            if a is None:
                continue  # disarmed in between (cannot happen within one handler)
            peer = a.peer
            if c.tx_packets:
                stats.tx_packets += c.tx_packets
                stats.lane_tx_packets += c.tx_packets
                stats.tx_bytes += c.tx_bytes
                stats.tx_datagrams += c.tx_datagrams
                stats.tx_wire_bytes += c.tx_wire_bytes
                if c.tx_failed:
                    drops[DropReason.SEND_FAILED] += c.tx_failed
                peer.tx_bytes += c.tx_wire_bytes
                a.tx_due = True
            if c.rx_datagrams and a.rx is not None:
                stats.rx_datagrams += c.rx_datagrams
                stats.rx_wire_bytes += c.rx_wire_bytes
                stats.rx_packets += c.rx_packets
                stats.lane_rx_packets += c.rx_packets
                stats.rx_bytes += c.rx_bytes
                peer.rx_bytes += c.rx_wire_bytes
                a.rx_due = True
                a.rx_data = a.rx_data or c.rx_data
            if not (a.tx_due or a.rx_due):
                continue
            if now - a.booked >= BOOK_INTERVAL:
                self._book(a, now)
                booked = True
            elif lane not in self._due:
                self._due.append(lane)
        return booked

    @property
    def due(self) -> bool:
        """Some lane's timer bookkeeping waits for `book_due`."""
        return bool(self._due)

    def book_due(self, now: float) -> None:
        """The bookkeeping `settle` left waiting."""
        due, self._due = self._due, []
        for lane in due:
            a = self._armed.get(lane)
            if a is not None:
                self._book(a, now)

    def _book_now(self, lane: LaneLike, now: float) -> None:
        a = self._armed.get(lane)
        if a is not None and (a.tx_due or a.rx_due):
            self._book(a, now)

    def _book(self, a: _Armed, now: float) -> None:
        """Tell the peer's timers and the path layer what the lane did since the last time
        (the bytes were counted already)."""
        peer, sender = a.peer, self.sender
        a.booked = now
        if a.tx_due:
            a.tx_due = False
            more = peer.note_sent(now)
            sender.note_sent(peer, now)
            if more:
                self._send(peer, more, now)
        if a.rx_due and a.rx is not None and a.source is not None:
            a.rx_due, data, a.rx_data = False, a.rx_data, False
            src = a.source
            out = peer.on_transport(a.rx, src, now, nbytes=0, data=data)
            sender.received([peer], src, now)
            if out:
                self._reply([(d, src) for d in out], None)

    def count_rx_drops(self, authentication: int, replay: int, not_ip: int, malformed: int) -> None:
        """Messages a lane opened and dropped, counted where the device counts its own."""
        drop = self._device_drop
        for reason, n in (
            (DropReason.AUTHENTICATION, authentication),
            (DropReason.REPLAY, replay),
            (DropReason.NOT_IP, not_ip),
            (DropReason.MALFORMED, malformed),
        ):
            if n:
                drop(reason, n)
