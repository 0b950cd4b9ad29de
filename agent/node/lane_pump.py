"""The lanes' own thread: a known peer's packets go the moment the TUN or UDP fd is readable.

With the compiled lanes (node/lanes.py) a lone packet is one call each way, but the call still
waits for the event loop: epoll returns, the loop runs its handler, the handler's Python runs,
all on cold caches after an idle gap, and a round trip has three such wakeups. The pump
(agent._fastpath.Pump, native/pump.c) is a thread that waits on both fds itself and runs
fast_tx / fast_rx at once, taking the GIL only for the call (no Python code runs in it). What
the calls return is left for the loop, which reads `wake_fd`:

  - batches of lanes alone are summed (counters and the lanes used), not kept one by one;
  - results with work for Python (reads no lane took, datagrams for the Python path, packets to
    judge, a TUN error) wake the loop at once;
  - results of lanes alone wait up to `book_delay`, so that the loop's bookkeeping (counters,
    timers, the path layer) does not compete with the next packet of a round trip;
  - at `queue_max` results not taken the thread stops reading until the loop takes them.

The loop (DataPlane._on_pump) handles each result as its own handlers would have, and calls
`configure` whenever the routes, lanes or filter may have changed. While the pump runs, the
loop never reads the TUN or the UDP socket itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from agent.node.lanes import FastRx, FastTx, LaneLike, NativeLanes
from agent.policy.filter import FastView

__all__ = ["LanePump", "QUEUE_MAX", "PUMP_BOOK_DELAY", "PumpResult", "PumpSums"]

QUEUE_MAX = 256
# How long the lanes' counts may wait for the loop: its wakeup, the bookkeeping and the flush
# after it cost 100-200 us on cold caches, 8 % of a core at one per ms under load (measured);
# nothing in them is due sooner (the lanes' own deadlines send packets to Python in time).
PUMP_BOOK_DELAY = 0.01
_TX, _RX, _FAILED = 0, 1, 2

PumpResult = FastTx | FastRx | BaseException


class PumpSums(NamedTuple):
    """The batches of lanes alone since the last take, summed (their sends' failures are
    counted on the socket already): what to add to the data plane's counters, and the lanes
    whose counts wait in them (`LaneKeeper.settle`)."""

    tun_reads: int
    udp_reads: int
    tun_writes: int
    write_failed: int
    authentication: int
    replay: int
    not_ip: int
    malformed: int
    used: list[LaneLike]


class LanePump:
    """agent._fastpath.Pump over a NativeLanes' fds; results decoded as the lanes' own."""

    def __init__(
        self,
        lanes: NativeLanes,
        *,
        max_reads: int,
        max_datagrams: int,
        sparse_gap: float,
        book_delay: float,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self._lanes = lanes
        self._pump: Any = lanes.module.Pump(
            lanes.tun_fd,
            lanes.udp_fd,
            lanes.vnet_hdr,
            lanes.uso,
            max_reads,
            max_datagrams,
            sparse_gap,
            book_delay,
            queue_max,
        )

    @property
    def wake_fd(self) -> int:
        fd: int = self._pump.wake_fd
        return fd

    @property
    def running(self) -> bool:
        return bool(self._pump.running)

    def clock(self) -> float:
        """The thread's clock: CLOCK_MONOTONIC, as time.monotonic and the event loop's."""
        now: float = self._pump.clock()
        return now

    def configure(
        self,
        routes: Mapping[bytes, object],
        lanes: Mapping[int, LaneLike],
        flt: FastView | None,
        tcp_only: bool,
    ) -> None:
        self._pump.configure(routes, lanes, flt, self._lanes.udp.gso, tcp_only)

    def start(self) -> None:
        self._pump.start()

    def stop(self) -> None:
        self._pump.stop()

    def take(self) -> tuple[list[PumpResult], PumpSums]:
        """Since the last take: the batches with work for Python, in order (a FastTx per TUN
        batch, a FastRx per UDP batch, and last an exception if the thread failed: it has
        ended then), and the other batches summed."""
        lanes = self._lanes
        items, sums, used = self._pump.take()
        out: list[PumpResult] = []
        for kind, r in items:
            if kind == _TX:
                out.append(lanes.sent(r))
            elif kind == _RX:
                out.append(lanes.received(r))
            else:
                out.append(r)
        (reads, receives, writes, failed, auth, rep, not_ip, malformed) = sums[:8]
        dropped, errors, err, gso = sums[8:]
        udp = lanes.udp
        udp.gso = udp.gso and gso
        if dropped or errors:
            udp.count_send_failures(dropped, errors, err)
        return out, PumpSums(reads, receives, writes, failed, auth, rep, not_ip, malformed, used)
