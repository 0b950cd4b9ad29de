"""The lanes' thread (native/pump.c, agent/node/lane_pump.py) over real fds: a SOCK_SEQPACKET
socketpair as the TUN (one message per read or write) and UDP sockets on loopback.

What it must do: send and receive a lane's packets with no call from this thread; hand back
what Python must handle, waking `wake_fd` at once for that and only after `book_delay` for
lanes alone; stop reading while `queue_max` results wait; share a Sealer's counter with Python's
own seals without ever reusing one; stop cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from agent.keys import NodePrivate
from agent.node.dataplane import DataPlane
from agent.node.lane_pump import LanePump, PumpResult, PumpSums
from agent.node.lanes import FastRx, FastTx, LaneLike, NativeLanes
from agent.node.tun import OFFLOAD_NONE
from agent.node.udp import Endpoint, UdpSocket, open_udp
from agent.proto.errors import DropReason
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.transport import PYTHON

from .packets import udp_packet

fp = pytest.importorskip(
    "agent._fastpath", reason="agent._fastpath is not built (pip install -e . with gcc, libssl-dev)"
)

from agent.node.fastpath import NativeTunIo, native_transport  # noqa: E402

NATIVE = native_transport(fp)
TX_KEY, RX_KEY = b"\x21" * 32, b"\x42" * 32
REMOTE_INDEX, LOCAL_INDEX = 0x11223344, 0x55667788
PEER_ADDR, OTHER_ADDR = bytes([100, 64, 0, 2]), bytes([100, 64, 0, 9])
ME = bytes([100, 64, 0, 1])
LONG = 30.0  # a book_delay no test waits for


class Peer:
    __slots__ = ("lane",)

    def __init__(self, lane: object) -> None:
        self.lane = lane


class SeqTun:
    """What NativeLanes needs of a TUN: an fd and its offload (none: plain IP packets)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.offload = OFFLOAD_NONE
        self.vnet_hdr = False

    def fileno(self) -> int:
        return self.sock.fileno()


@dataclass
class Rig:
    pump: LanePump
    feed: socket.socket  # the TUN's other end
    udp: UdpSocket
    remote: socket.socket  # the peer's UDP socket
    lane: LaneLike
    lanes: NativeLanes
    routes: dict[bytes, object]
    rx_lanes: dict[int, LaneLike]
    tun_sock: socket.socket  # the pump's TUN end

    def configure(self) -> None:
        self.pump.configure(self.routes, self.rx_lanes, None, False)

    def arm_tx(self, sealer: object | None = None) -> object:
        s = sealer if sealer is not None else NATIVE.sealer(NATIVE.aead(TX_KEY), REMOTE_INDEX)
        assert self.lanes.arm_tx(self.lane, s, endpoint_of(self.remote), 2**60, math.inf)
        return s

    def arm_rx(self) -> None:
        assert self.lanes.arm_rx(
            self.lane,
            NATIVE.aead(RX_KEY),
            NATIVE.replay(),
            LOCAL_INDEX,
            endpoint_of(self.remote),
            math.inf,
        )
        self.rx_lanes[LOCAL_INDEX] = self.lane


def endpoint_of(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def tun_and_udp(stack: contextlib.ExitStack) -> tuple[socket.socket, socket.socket, UdpSocket]:
    """A TUN stand-in (its end, the other end) and a UDP socket with the compiled batches."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        stack.enter_context(s)
        s.setblocking(False)
    udp = stack.enter_context(open_udp(0, host="127.0.0.1"))
    udp.use_native(fp)
    return a, b, udp


@contextlib.contextmanager
def rig(*, book_delay: float = 0.001, queue_max: int = 256) -> Iterator[Rig]:
    with contextlib.ExitStack() as stack:
        a, b, udp = tun_and_udp(stack)
        remote = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        remote.bind(("127.0.0.1", 0))
        remote.setblocking(False)
        lanes = NativeLanes(SeqTun(a), udp, fp)
        pump = LanePump(
            lanes,
            max_reads=64,
            max_datagrams=64,
            sparse_gap=0.001,
            book_delay=book_delay,
            queue_max=queue_max,
        )
        lane = lanes.new_lane()
        r = Rig(pump, b, udp, remote, lane, lanes, {PEER_ADDR: Peer(lane)}, {}, a)
        r.configure()
        try:
            yield r
        finally:
            pump.stop()


def readable(fd: int | socket.socket, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def recv_one(sock: socket.socket, timeout: float = 5.0) -> bytes:
    assert readable(sock, timeout), "nothing arrived"
    return sock.recv(0x10000)


def take_until(
    pump: LanePump, done: Callable[[list[PumpResult], list[PumpSums]], bool], timeout: float = 5.0
) -> tuple[list[PumpResult], list[PumpSums]]:
    """take() at each wake of wake_fd until `done` says so with all taken so far."""
    results: list[PumpResult] = []
    sums: list[PumpSums] = []
    end = time.monotonic() + timeout
    while not done(results, sums) and time.monotonic() < end:
        readable(pump.wake_fd, 0.05)
        r, s = pump.take()
        results += r
        sums.append(s)
    return results, sums


def total(sums: list[PumpSums], field: str) -> int:
    return sum(getattr(s, field) for s in sums)


def lanes_used(sums: list[PumpSums]) -> list[LaneLike]:
    return [lane for s in sums for lane in s.used]


def counter_of(datagram: bytes) -> int:
    kind, _index, counter = struct.unpack_from("<IIQ", datagram)
    assert kind == 4
    return int(counter)


def open_one(datagram: bytes, key: bytes, index: int) -> bytes:
    run = PYTHON.open_run(PYTHON.aead(key), PYTHON.replay(), [datagram], 0, index)
    assert run.authentication == run.replay == 0
    (pkt,) = run.packets
    return bytes(pkt)


def test_clock_is_the_loops() -> None:
    with rig() as r:
        assert abs(r.pump.clock() - time.monotonic()) < 0.01


def test_a_lane_packet_leaves_without_this_thread_and_is_booked_later() -> None:
    with rig(book_delay=0.05) as r:
        r.arm_tx()
        r.pump.start()
        pkt = udp_packet(4, b"ping", src=ME, dst=PEER_ADDR)
        r.feed.send(pkt)
        d = recv_one(r.remote)
        assert counter_of(d) == 0
        assert open_one(d, TX_KEY, REMOTE_INDEX) == pkt
        # lanes alone: no result of its own, the read and the lane in the sums
        results, sums = take_until(r.pump, lambda _r, s: total(s, "tun_reads") >= 1)
        assert results == []
        assert total(sums, "tun_reads") == 1
        assert lanes_used(sums) == [r.lane]
        counts = r.lane.take()
        assert counts[:3] == (1, len(pkt), 1)


def test_lane_results_wait_for_book_delay() -> None:
    with rig(book_delay=LONG) as r:
        r.arm_tx()
        r.pump.start()
        r.feed.send(udp_packet(4, b"x", src=ME, dst=PEER_ADDR))
        recv_one(r.remote)
        assert not readable(r.pump.wake_fd, 0.3)  # lanes alone: the loop sleeps on
        results, sums = r.pump.take()  # ... and what they did is there when it looks
        assert results == []
        assert sums.tun_reads == 1
        assert sums.used == [r.lane]


def test_work_for_python_wakes_the_loop_at_once() -> None:
    with rig(book_delay=LONG) as r:
        r.pump.start()
        pkt = udp_packet(4, b"no lane", src=ME, dst=OTHER_ADDR)
        r.feed.send(pkt)
        assert readable(r.pump.wake_fd, 5.0)
        (res,), _ = r.pump.take()
        assert isinstance(res, FastTx)
        assert [bytes(p) for p in res.rest.packets] == [pkt]
        assert res.rest.runs == [(OTHER_ADDR, 1)]
        assert res.lanes == []
        # a datagram that is no transport message of an armed lane: to Python with its source
        r.remote.sendto(b"\x01junk", endpoint_of_udp(r.udp))
        assert readable(r.pump.wake_fd, 5.0)
        (res2,), _ = r.pump.take()
        assert isinstance(res2, FastRx)
        assert [([bytes(d) for d in ds], src) for ds, src in res2.slow] == [
            ([b"\x01junk"], endpoint_of(r.remote))
        ]


def endpoint_of_udp(udp: UdpSocket) -> tuple[str, int]:
    return ("127.0.0.1", udp.port)


def test_received_packet_goes_to_the_tun_and_its_answer_goes_back() -> None:
    with rig(book_delay=0.01) as r:
        r.arm_tx()
        r.arm_rx()
        r.pump.start()
        inner = udp_packet(4, b"request", src=PEER_ADDR, dst=ME)
        sealer = NATIVE.sealer(NATIVE.aead(RX_KEY), LOCAL_INDEX)
        (d,) = sealer.seal([inner])
        r.remote.sendto(d, endpoint_of_udp(r.udp))
        assert recv_one(r.feed) == inner
        reply = udp_packet(4, b"reply", src=ME, dst=PEER_ADDR)
        r.feed.send(reply)
        assert open_one(recv_one(r.remote), TX_KEY, REMOTE_INDEX) == reply
        results, sums = take_until(r.pump, lambda _r, s: total(s, "tun_reads") >= 1)
        assert results == []  # lanes alone, both ways
        assert total(sums, "udp_reads") == 1
        assert total(sums, "tun_writes") == 1
        assert lanes_used(sums) == [r.lane]
        counts = r.lane.take()
        assert counts[0] == 1
        assert counts[7] == 1


def test_a_full_queue_stops_the_reading_until_taken() -> None:
    with rig(book_delay=LONG, queue_max=1) as r:
        r.arm_tx()
        r.pump.start()
        r.feed.send(udp_packet(4, b"for Python", src=ME, dst=OTHER_ADDR))
        assert readable(r.pump.wake_fd, 5.0)  # one result waits: the queue is full
        r.feed.send(udp_packet(4, b"lane", src=ME, dst=PEER_ADDR))
        assert not readable(r.remote, 0.3)  # not read while the queue is full
        results, _ = r.pump.take()
        assert len(results) == 1
        assert counter_of(recv_one(r.remote)) == 0


def test_python_seals_and_rearming_never_reuse_a_counter() -> None:
    """The Python path seals with the same Sealer and re-arms the lane while the thread
    sends: every counter is used once."""
    with rig(book_delay=0.001) as r:
        sealer = r.arm_tx()
        r.remote.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        r.pump.start()
        pkt = udp_packet(4, b"p" * 64, src=ME, dst=PEER_ADDR)
        sent = 3000
        python_counters: list[int] = []
        slow = 0
        stop = threading.Event()

        def feed() -> None:
            for _ in range(sent):
                while True:
                    try:
                        r.feed.send(pkt)
                        break
                    except BlockingIOError:
                        time.sleep(0.0005)
            stop.set()

        # (this thread sleeps a little per round: a thread that never does holds the GIL for
        # the whole switch interval, 5 ms, and the feeder and the pump wait for it)

        t = threading.Thread(target=feed)
        t.start()
        i = 0
        while not stop.is_set() or i < 50:
            python_counters += [counter_of(d) for d in sealer.seal([pkt])]  # type: ignore[attr-defined]
            if i % 7 == 0:  # disarmed a while: what the thread reads meanwhile goes to Python
                r.lane.disarm_tx()
                time.sleep(0.0005)
                r.arm_tx(sealer)
            for res in r.pump.take()[0]:
                assert isinstance(res, FastTx)
                slow += len(res.rest.packets)
            i += 1
            time.sleep(0.0002)
        t.join()
        wire: list[int] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(wire) + slow < sent:
            if readable(r.remote, 0.1):
                wire.append(counter_of(r.remote.recv(0x10000)))
            for res in r.pump.take()[0]:
                slow += len(res.rest.packets)  # type: ignore[union-attr]
        assert len(wire) + slow == sent
        assert wire
        assert python_counters
        every = wire + python_counters
        assert len(set(every)) == len(every), "a counter was used twice"
        assert sealer.counter == len(every)  # type: ignore[attr-defined]


def test_stop_is_idempotent_and_ends_the_thread() -> None:
    with rig() as r:
        r.pump.start()
        assert r.pump.running
        r.pump.stop()
        r.pump.stop()
        assert not r.pump.running
        with pytest.raises(RuntimeError):
            r.pump.start()


def test_a_failure_ends_the_thread_and_is_handed_over_last() -> None:
    """An fd closed under the thread (POLLNVAL): it ends, and take() ends with the error, for
    the loop to read the fds itself."""
    with rig() as r:
        r.pump.start()
        # (no fd is opened between the close and the next poll, so the number is not reused)
        r.tun_sock.close()
        r.remote.sendto(b"\x01wake", endpoint_of_udp(r.udp))
        results, _ = take_until(r.pump, lambda res, _s: any(isinstance(x, OSError) for x in res))
        assert isinstance(results[-1], OSError), results
        deadline = time.monotonic() + 5
        while r.pump.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not r.pump.running
        r.pump.stop()  # joins the ended thread


def test_the_data_plane_reads_the_fds_itself_once_the_thread_fails() -> None:
    """DataPlane with the thread: the loop reads only the thread's eventfd; after a failure
    the loop's own readers take over (a packet for no peer is read and counted)."""
    with contextlib.ExitStack() as stack:
        a, b, udp = tun_and_udp(stack)
        tun = SeqTun(a)
        device = Device(NodePrivate.generate(), transport=NATIVE)
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        dp = DataPlane(
            tun,  # type: ignore[arg-type]
            udp,
            device,
            loop.time,
            lambda: None,
            tun_io=NativeTunIo(tun, fp),
            lanes=NativeLanes(tun, udp, fp),
            pump=True,
        )
        dp.attach(loop)
        stack.callback(dp.detach)
        assert dp.threaded
        pkt = udp_packet(4, b"nobody", src=ME, dst=OTHER_ADDR)

        def run_until(done: Callable[[], bool]) -> None:
            end = time.monotonic() + 5
            while not done() and time.monotonic() < end:
                loop.run_until_complete(asyncio.sleep(0.01))

        b.send(pkt)
        run_until(lambda: dp.stats.drops[DropReason.NO_ROUTE] == 1)
        assert dp.stats.drops[DropReason.NO_ROUTE] == 1  # read by the thread, routed here
        dp._pump_failed(OSError("a test's failure"))
        assert not dp.threaded
        b.send(pkt)
        run_until(lambda: dp.stats.drops[DropReason.NO_ROUTE] == 2)
        assert dp.stats.drops[DropReason.NO_ROUTE] == 2  # read by the loop's own reader
