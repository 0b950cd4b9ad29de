"""LaneKeeper: a lane is armed only with what the Python path would decide, and settled as the
Python path books its packets. Two real WireGuard devices in memory (tests/proto/test_device.py);
the lanes are the Python twin's, armed through a recording stand-in for the batches."""

from __future__ import annotations

import math
from collections.abc import Sequence

from agent.keys import NodePublic
from agent.node.dataplane import DataPlaneStats
from agent.node.lane_keeper import BOOK_INTERVAL, LaneKeeper
from agent.node.lanes import Lane, PythonLanes
from agent.node.udp import Endpoint
from agent.proto.errors import DropReason
from agent.proto.wireguard.constants import (
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
)
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.peer import Peer
from tests.proto.test_device import A_EP, A_IP, B_EP, B_IP, Pair, ipv4


class Paths(PythonLanes):
    """The twin's lanes, armed for real (PythonLanes' own arming); the batches are not run
    here, so there is no TUN or socket under them."""

    def __init__(self) -> None:
        pass


class Sender:
    """The path layer's answers, set by the test; what the keeper told it, recorded."""

    def __init__(self) -> None:
        self.path: tuple[Endpoint, float] | None = (B_EP, math.inf)
        self.sent_notes: list[Peer] = []
        self.received_from: list[tuple[Peer, Endpoint]] = []
        self.out: list[tuple[list[bytes], Endpoint | None]] = []

    def direct(self, peer: Peer, now: float) -> tuple[Endpoint, float] | None:
        return self.path

    def note_sent(self, peer: Peer, now: float) -> None:
        self.sent_notes.append(peer)

    def received(self, peers: Sequence[Peer], src: Endpoint, now: float) -> None:
        self.received_from += [(p, src) for p in peers]

    def send_to_peer(self, peer: Peer, datagrams: Sequence[bytes | bytearray], now: float) -> int:
        self.out.append(([bytes(d) for d in datagrams], None))
        return 0

    def send_to_endpoint(
        self, datagrams: Sequence[bytes | bytearray], endpoint: Endpoint, key: NodePublic | None
    ) -> int:
        self.out.append(([bytes(d) for d in datagrams], endpoint))
        return 0


def keeper_for(pair: Pair, sender: Sender) -> tuple[LaneKeeper, DataPlaneStats]:
    stats = DataPlaneStats()
    return new_keeper(pair.a, sender, stats), stats


def new_keeper(dev: Device, sender: Sender, stats: DataPlaneStats) -> LaneKeeper:
    """A keeper whose sends and replies go to `sender` (the data plane's helpers count them)."""

    def send(peer: Peer, datagrams: list[bytes], now: float) -> None:
        sender.send_to_peer(peer, datagrams, now)

    def reply(replies: list[tuple[bytes, Endpoint]], key: NodePublic | None) -> None:
        for data, endpoint in replies:
            sender.send_to_endpoint([data], endpoint, key)

    return LaneKeeper(
        Paths(),
        lambda: dev.peers,
        sender,
        stats,
        dev.count_drop,
        send=send,
        reply=reply,
    )


def lane(peer: Peer) -> Lane:
    assert isinstance(peer.lane, Lane)
    return peer.lane


def connected() -> Pair:
    pair = Pair()
    pair.send_a([ipv4(A_IP, B_IP)])  # handshake; the staged packet follows on the new session
    assert pair.send_a([ipv4(A_IP, B_IP)])
    assert pair.send_b([ipv4(B_IP, A_IP)])
    return pair


def test_without_a_session_nothing_is_armed() -> None:
    pair = Pair()
    keeper, _ = keeper_for(pair, Sender())
    keeper.arm(pair.pa, pair.now)
    assert not lane(pair.pa).tx_armed
    assert not lane(pair.pa).rx_armed
    assert keeper.rx_lanes == {}
    assert len(keeper) == 0


def test_a_session_on_a_direct_path_arms_both_ways_with_the_session_s_own_state() -> None:
    pair = connected()
    keeper, _ = keeper_for(pair, Sender())
    keeper.arm(pair.pa, pair.now)
    kp = pair.pa.keypairs.current
    assert kp is not None
    assert kp.is_initiator
    ln = lane(pair.pa)
    assert ln.sealer is kp.sealer  # one counter, shared with the keypair
    assert ln.target == B_EP
    assert ln.tx_limit == REKEY_AFTER_MESSAGES
    assert ln.tx_deadline == kp.created + REKEY_AFTER_TIME  # the initiator rekeys then
    assert ln.rx_index == kp.local_index
    assert ln.rx_source == pair.pa.endpoint == B_EP
    assert ln.rx_deadline == kp.created + REJECT_AFTER_TIME
    assert keeper.rx_lanes == {kp.local_index: ln}


def test_the_responder_sends_until_the_session_ends_and_the_path_s_trust_bounds_it() -> None:
    pair = connected()
    sender = Sender()
    sender.path = (A_EP, pair.now + 5.0)
    dev = pair.b
    keeper = new_keeper(dev, sender, DataPlaneStats())
    keeper.arm(pair.pb, pair.now)
    kp = pair.pb.keypairs.current
    assert kp is not None
    assert not kp.is_initiator
    assert lane(pair.pb).tx_deadline == pair.now + 5.0
    sender.path = (A_EP, math.inf)
    keeper.arm(pair.pb, pair.now)
    assert lane(pair.pb).tx_deadline == kp.created + REJECT_AFTER_TIME


def test_relayed_or_staged_peers_send_the_python_way() -> None:
    pair = connected()
    sender = Sender()
    keeper, _ = keeper_for(pair, sender)
    sender.path = None  # DERP as well, or no path: the Python path picks
    keeper.arm(pair.pa, pair.now)
    assert not lane(pair.pa).tx_armed
    assert lane(pair.pa).rx_armed  # receiving does not depend on where we send
    sender.path = (B_EP, math.inf)
    pair.pa.staged.append(b"waiting")  # staged packets go first, through Python
    keeper.arm(pair.pa, pair.now)
    assert not lane(pair.pa).tx_armed
    pair.pa.staged.clear()
    keeper.arm(pair.pa, pair.now)
    assert lane(pair.pa).tx_armed


def test_an_expired_session_is_not_armed() -> None:
    pair = connected()
    keeper, _ = keeper_for(pair, Sender())
    kp = pair.pa.keypairs.current
    assert kp is not None
    keeper.arm(pair.pa, kp.created + REJECT_AFTER_TIME + 1)
    assert not lane(pair.pa).tx_armed
    assert not lane(pair.pa).rx_armed


def test_revalidate_follows_a_new_session_and_drops_a_removed_peer() -> None:
    pair = connected()
    keeper, _ = keeper_for(pair, Sender())
    keeper.arm(pair.pa, pair.now)
    old = pair.pa.keypairs.current
    assert old is not None
    # a new handshake (a's timer after REKEY_AFTER_TIME), answered by b
    pair.now += REKEY_AFTER_TIME + 1
    pair.deliver(pair.b, A_EP, pair.pa.encrypt([ipv4(A_IP, B_IP)], pair.now))
    new = pair.pa.keypairs.current
    assert new is not None
    assert new is not old
    keeper.revalidate(pair.now)
    assert lane(pair.pa).sealer is new.sealer
    assert keeper.rx_lanes == {new.local_index: lane(pair.pa)}
    pair.a.remove_peer(pair.pa.public_key)
    keeper.revalidate(pair.now)
    assert not lane(pair.pa).tx_armed
    assert not lane(pair.pa).rx_armed
    assert keeper.rx_lanes == {}
    assert len(keeper) == 0


def test_settle_books_a_lane_s_batch_as_the_python_path_does() -> None:
    pair = connected()
    sender = Sender()
    keeper, stats = keeper_for(pair, sender)
    keeper.arm(pair.pa, pair.now)
    ln = lane(pair.pa)
    tx_before, rx_before = pair.pa.tx_bytes, pair.pa.rx_bytes
    ln.counts = [3, 300, 2, 400, 1, 4, 512, 3, 250]
    ln.rx_data = True
    keeper.settle([ln], pair.now)
    assert (stats.tx_packets, stats.tx_bytes, stats.tx_datagrams, stats.tx_wire_bytes) == (
        3,
        300,
        2,
        400,
    )
    assert stats.drops[DropReason.SEND_FAILED] == 1
    assert (stats.rx_packets, stats.rx_bytes) == (3, 250)
    assert (stats.rx_datagrams, stats.rx_wire_bytes) == (4, 512)  # as _receive counts them
    assert (stats.lane_tx_packets, stats.lane_rx_packets) == (3, 3)
    assert pair.pa.tx_bytes == tx_before + 400
    assert pair.pa.rx_bytes == rx_before + 512
    assert sender.sent_notes == [pair.pa]
    assert sender.received_from == [(pair.pa, B_EP)]
    assert ln.take() == (0, 0, 0, 0, 0, 0, 0, 0, 0, False)  # settled once


def test_settle_sends_what_the_session_s_bookkeeping_asks_for() -> None:
    """The initiator's session is about to expire: the first received batch after that point
    starts the last-minute handshake, exactly as Peer.on_transport does on the Python path."""
    pair = connected()
    sender = Sender()
    keeper, _ = keeper_for(pair, sender)
    keeper.arm(pair.pa, pair.now)
    kp = pair.pa.keypairs.current
    assert kp is not None
    ln = lane(pair.pa)
    ln.counts = [0, 0, 0, 0, 0, 1, 32, 0, 0]
    keeper.settle([ln], kp.created + REJECT_AFTER_TIME - 1)
    assert sender.out
    initiation = sender.out[0][0][0]
    assert initiation[0] == 1  # a handshake initiation, back to where the peer sent from
    assert sender.out[0][1] == B_EP


def test_lane_drops_count_where_the_device_counts_its_own() -> None:
    pair = connected()
    keeper, _ = keeper_for(pair, Sender())
    keeper.count_rx_drops(2, 3, 0, 1)
    assert pair.a.drops[DropReason.AUTHENTICATION] == 2
    assert pair.a.drops[DropReason.REPLAY] == 3
    assert pair.a.drops[DropReason.MALFORMED] == 1


def test_timer_bookkeeping_runs_at_most_once_per_interval_and_what_waits_is_booked_later() -> None:
    pair = connected()
    sender = Sender()
    keeper, stats = keeper_for(pair, sender)
    keeper.arm(pair.pa, pair.now)
    ln = lane(pair.pa)
    tx_before = pair.pa.tx_bytes
    ln.counts = [1, 100, 1, 132, 0, 0, 0, 0, 0]
    assert keeper.settle([ln], pair.now)  # booked at once
    assert sender.sent_notes == [pair.pa]
    ln.counts = [1, 100, 1, 132, 0, 1, 64, 1, 32]
    ln.rx_data = True
    assert not keeper.settle([ln], pair.now + BOOK_INTERVAL / 2)  # within the interval: waits
    assert keeper.due
    assert pair.pa.tx_bytes == tx_before + 264  # the counters do not wait
    assert stats.tx_packets == 2
    assert sender.sent_notes == [pair.pa]
    assert sender.received_from == []
    keeper.book_due(pair.now + BOOK_INTERVAL)
    assert not keeper.due
    assert sender.sent_notes == [pair.pa, pair.pa]
    assert sender.received_from == [(pair.pa, B_EP)]


def test_waiting_bookkeeping_is_booked_before_the_lane_is_armed_again() -> None:
    pair = connected()
    sender = Sender()
    keeper, _ = keeper_for(pair, sender)
    keeper.arm(pair.pa, pair.now)
    ln = lane(pair.pa)
    ln.counts = [1, 100, 1, 132, 0, 0, 0, 0, 0]
    keeper.settle([ln], pair.now)
    ln.counts = [1, 100, 1, 132, 0, 0, 0, 0, 0]
    keeper.settle([ln], pair.now)
    assert sender.sent_notes == [pair.pa]
    keeper.revalidate(pair.now)
    assert sender.sent_notes == [pair.pa, pair.pa]
    keeper.book_due(pair.now)  # nothing left
    assert sender.sent_notes == [pair.pa, pair.pa]
