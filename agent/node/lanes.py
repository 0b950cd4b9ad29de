"""Lanes: a known peer's packets in one call each way, read-seal-send and receive-open-write.

A lane is one peer's armed paths. Python arms it (agent/node/lane_keeper.py) with what the slow
path would have decided: the current session's `Sealer` (key and the one send counter, shared
with the Keypair), the UDP address the path layer sends to, how many more messages and until
when; for receiving, the current session's key, replay window and receiver index, and the
address the peer sends from. The lane then runs without Python in between:

    tx(max_reads, routes, now, tcp_only) -> FastTx
        Up to `max_reads` TUN reads (as `TunIo.read`); every read whose destination `routes`
        (the device's route cache: address -> peer) maps to a peer whose `lane` is armed for
        sending, with room under its limits for all the read's segments, is sealed; then the
        sealed datagrams are sent, one batch per run of one lane. The other reads come back as
        a `TunRead` for the Python path. `tcp_only` (a packet filter is on and wants to see
        what opens UDP and ICMP flows) leaves reads of anything but TCP to Python.
    rx(max_datagrams, lanes, routes, now, flt) -> FastRx
        Receive until EAGAIN; a transport message whose receiver index `lanes` maps to a lane
        armed for receiving, from that lane's address, is opened there, and its packet goes to
        the TUN when `routes` maps its source address to the same lane and, with a packet
        filter, when the filter's cached decisions (`flt`, PacketFilter.fast_view) pass it as
        they stand; else to `checks` for Python (cryptokey routing and the filter decide).
        Every other datagram comes back in `slow`, grouped per receive with its source, for
        the Python path.

Each lane counts what it did (`take()`); the caller does the per-batch bookkeeping (timers,
byte counters, the path layer) after the packets are on their way. Two twins with the same
results: `PythonLanes` (the reference, over the Python batches) and `NativeLanes` (one call to
agent._fastpath.fast_tx / fast_rx, native/lanes.c); tests/native/ checks them against each other.
In the daemon the compiled lanes run on a thread of their own (node/lane_pump.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, NamedTuple, Protocol

from agent.node.fastpath import DataPlaneImpl, PythonTunIo, TunIo, TunLike, TunRead
from agent.node.tun import OFFLOAD_TSO_USO
from agent.node.udp import Endpoint, UdpSocket
from agent.policy.filter import FastView
from agent.proto.errors import MalformedPacket
from agent.proto.offload import segment
from agent.proto.wireguard.constants import MSG_TRANSPORT, TRANSPORT_MIN_SIZE
from agent.proto.wireguard.transport import Aead, Replay, SealerLike, Transport

__all__ = [
    "Lane",
    "LaneLike",
    "LaneCounts",
    "FastTx",
    "FastRx",
    "Answer",
    "LanePaths",
    "PythonLanes",
    "NativeLanes",
    "lanes_for",
]

Buffer = bytes | bytearray | memoryview


class LaneCounts(NamedTuple):
    """What a lane did since the last `take()`."""

    tx_packets: int
    tx_bytes: int  # plaintext
    tx_datagrams: int  # sent
    tx_wire_bytes: int
    tx_failed: int  # datagrams the socket refused
    rx_datagrams: int  # authentic and new (keepalives, drops after authentication included)
    rx_wire_bytes: int
    rx_packets: int  # to the TUN
    rx_bytes: int
    rx_data: bool  # one carried a packet (not only keepalives)


class LaneLike(Protocol):
    @property
    def tx_armed(self) -> bool: ...

    @property
    def rx_armed(self) -> bool: ...

    @property
    def rx_index(self) -> int | None: ...

    def disarm_tx(self) -> None: ...

    def disarm_rx(self) -> None: ...

    def take(self) -> tuple[int, int, int, int, int, int, int, int, int, bool]: ...


class Lane:
    """The Python twin of agent._fastpath.Lane; `target`/`source` are Endpoints here."""

    __slots__ = (
        "counts",
        "rx_aead",
        "rx_data",
        "rx_deadline",
        "rx_index",
        "rx_replay",
        "rx_source",
        "sealer",
        "target",
        "tx_deadline",
        "tx_limit",
        "used",
    )

    def __init__(self) -> None:
        self.sealer: SealerLike | None = None
        self.target: Endpoint | None = None
        self.tx_limit = 0
        self.tx_deadline = -math.inf
        self.rx_aead: Aead | None = None
        self.rx_replay: Replay | None = None
        self.rx_index: int | None = None
        self.rx_source: Endpoint | None = None
        self.rx_deadline = -math.inf
        self.counts = [0] * 9
        self.rx_data = False
        self.used = False

    @property
    def tx_armed(self) -> bool:
        return self.sealer is not None

    @property
    def rx_armed(self) -> bool:
        return self.rx_aead is not None

    def arm_tx(self, sealer: SealerLike, target: Endpoint, limit: int, deadline: float) -> None:
        self.sealer, self.target, self.tx_limit, self.tx_deadline = sealer, target, limit, deadline

    def arm_rx(
        self, aead: Aead, replay: Replay, index: int, source: Endpoint, deadline: float
    ) -> None:
        self.rx_aead, self.rx_replay, self.rx_index = aead, replay, index
        self.rx_source, self.rx_deadline = source, deadline

    def disarm_tx(self) -> None:
        self.sealer = self.target = None

    def disarm_rx(self) -> None:
        self.rx_aead = self.rx_replay = self.rx_index = self.rx_source = None

    def take(self) -> tuple[int, int, int, int, int, int, int, int, int, bool]:
        c = self.counts
        out = (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], self.rx_data)
        self.counts = [0] * 9
        self.rx_data = self.used = False
        return out


class FastTx(NamedTuple):
    rest: TunRead  # what no lane took, for the Python path
    lanes: list[LaneLike]  # the lanes that sent, once each


class FastRx(NamedTuple):
    slow: list[tuple[Sequence[Buffer], Endpoint]]  # for the Python path, per receive
    lanes: list[LaneLike]  # the lanes that received, once each
    receives: int  # recvmsg calls that returned data
    checks: list[tuple[LaneLike, bytes]]  # opened packets whose source the lane could not vouch for
    authentication: int  # drops, as open_run counts them
    replay: int
    not_ip: int
    malformed: int
    writes: int  # TUN writes
    failed: int  # packets the TUN refused
    answered: FastTx | None  # `tx` run right after the TUN write, when asked to (`answer`)


class Answer(NamedTuple):
    """Ask `rx` to run `tx` right after writing the TUN: what the packets provoked (an echo
    reply, a TCP ACK) is queued before the write returns, and leaves in the same call."""

    max_reads: int
    tcp_only: bool


class LanePaths(Protocol):
    """Both twins: lanes to arm and the two batches."""

    def new_lane(self) -> LaneLike: ...

    def arm_tx(
        self, lane: LaneLike, sealer: SealerLike, target: Endpoint, limit: int, deadline: float
    ) -> bool:
        """Arm `lane` to send to `target`; False (disarmed) when this twin cannot send there."""
        ...

    def arm_rx(
        self,
        lane: LaneLike,
        aead: Aead,
        replay: Replay,
        index: int,
        source: Endpoint,
        deadline: float,
    ) -> bool: ...

    def tx(
        self, max_reads: int, routes: Mapping[bytes, object], now: float, tcp_only: bool
    ) -> FastTx: ...

    def rx(
        self,
        max_datagrams: int,
        lanes: Mapping[int, LaneLike],
        routes: Mapping[bytes, object],
        now: float,
        flt: FastView | None = None,
        answer: Answer | None = None,
    ) -> FastRx: ...


def _lane_of(routes: Mapping[bytes, object], addr: bytes) -> Lane | None:
    lane = getattr(routes.get(addr), "lane", None)
    return lane if isinstance(lane, Lane) else None


def filter_passes(flt: FastView, p: bytes) -> bool:
    """What the filter's cached path passes as is (the twin of native/lanes.c's check)."""
    n = len(p)
    if p[0] == 0x45 and n >= 24:
        table, key, flags_at = flt.v4.get(p[9]), p[12:24], 33
    elif p[0] >> 4 == 6 and n >= 44:
        table, key, flags_at = flt.v6.get(p[6]), p[8:44], 53
    else:
        return False
    v = table.get(key) if table is not None else None
    return v is flt.accept or (v is flt.syn_denied and n > flags_at and p[flags_at] & 0x12 != 0x02)


class PythonLanes:
    """The reference twin: `TunIo` and `UdpSocket` batches and the transport's open_run."""

    def __init__(
        self, tun: TunLike, udp: UdpSocket, transport: Transport, tun_io: TunIo | None = None
    ) -> None:
        self.tun = tun
        self.tun_io = tun_io if tun_io is not None else PythonTunIo(tun)
        self.udp = udp
        self.transport = transport

    def new_lane(self) -> Lane:
        return Lane()

    def arm_tx(
        self, lane: LaneLike, sealer: SealerLike, target: Endpoint, limit: int, deadline: float
    ) -> bool:
        assert isinstance(lane, Lane)
        lane.arm_tx(sealer, target, limit, deadline)
        return True

    def arm_rx(
        self,
        lane: LaneLike,
        aead: Aead,
        replay: Replay,
        index: int,
        source: Endpoint,
        deadline: float,
    ) -> bool:
        assert isinstance(lane, Lane)
        lane.arm_rx(aead, replay, index, source, deadline)
        return True

    def tx(
        self, max_reads: int, routes: Mapping[bytes, object], now: float, tcp_only: bool
    ) -> FastTx:
        frames, error = self.tun.read_frames(max_reads)
        packets: list[bytes] = []
        runs: list[tuple[bytes, int]] = []
        run_dst, run_count = b"", 0
        not_ip = malformed = 0
        sealed: list[tuple[Lane, bytes]] = []
        used: list[LaneLike] = []
        for hdr, pkt in frames:
            n = len(pkt)
            version = pkt[0] >> 4 if n else 0
            if version == 4 and n >= 20:
                dst, proto = pkt[16:20].tobytes(), pkt[9]
            elif version == 6 and n >= 40:
                dst, proto = pkt[24:40].tobytes(), pkt[6]
            else:
                not_ip += 1
                continue
            try:
                segments = [bytes(x) for x in segment(hdr, pkt)]
            except MalformedPacket:
                malformed += 1
                continue
            count = len(segments)
            lane = _lane_of(routes, dst)
            s = lane.sealer if lane is not None else None
            if (
                lane is not None
                and s is not None
                and now < lane.tx_deadline
                and s.counter + count <= lane.tx_limit
                and (not tcp_only or proto == 6)
            ):
                if not lane.used:
                    lane.used = True
                    used.append(lane)
                dgrams = s.seal(segments)
                c = lane.counts
                c[0] += count
                c[1] += sum(map(len, segments))
                c[3] += sum(map(len, dgrams))
                sealed += [(lane, d) for d in dgrams]
                continue
            # what no lane takes, as tun_read gives it (fast reads in between do not end a run)
            packets += segments
            if dst == run_dst:
                run_count += count
                continue
            if run_count:
                runs.append((run_dst, run_count))
            run_dst, run_count = dst, count
        if run_count:
            runs.append((run_dst, run_count))
        i = 0
        while i < len(sealed):  # one send batch per run of one lane, in order
            lane = sealed[i][0]
            j = i
            while j < len(sealed) and sealed[j][0] is lane:
                j += 1
            assert lane.target is not None
            failed = self.udp.send_batch([d for _, d in sealed[i:j]], lane.target)
            lane.counts[2] += j - i - failed
            lane.counts[4] += failed
            i = j
        return FastTx(TunRead(packets, runs, len(frames), not_ip, malformed, error), used)

    def rx(
        self,
        max_datagrams: int,
        lanes: Mapping[int, LaneLike],
        routes: Mapping[bytes, object],
        now: float,
        flt: FastView | None = None,
        answer: Answer | None = None,
    ) -> FastRx:
        received = self.udp.recv_batch(max_datagrams)
        open_run = self.transport.open_run
        slow: list[tuple[Sequence[Buffer], Endpoint]] = []
        used: list[LaneLike] = []
        checks: list[tuple[LaneLike, bytes]] = []
        plain: list[Buffer] = []
        auth = rep = not_ip = malformed = 0
        for datagrams, src in received:
            rest: list[Buffer] = []
            for d in datagrams:
                lane = None
                if len(d) >= TRANSPORT_MIN_SIZE and d[0] == MSG_TRANSPORT and not any(d[1:4]):
                    index = int.from_bytes(d[4:8], "little")
                    cand = lanes.get(index)
                    if (
                        isinstance(cand, Lane)
                        and cand.rx_aead is not None
                        and cand.rx_replay is not None
                        and cand.rx_index == index
                        and now < cand.rx_deadline
                        and cand.rx_source == src
                    ):
                        lane = cand
                if lane is None:
                    rest.append(bytes(d))
                    continue
                assert lane.rx_aead is not None
                assert lane.rx_replay is not None
                run = open_run(lane.rx_aead, lane.rx_replay, (d,), 0, index)
                auth += run.authentication
                rep += run.replay
                not_ip += run.not_ip
                malformed += run.malformed
                if not lane.used:
                    lane.used = True
                    used.append(lane)
                if not run.wire_bytes:
                    continue
                c = lane.counts
                c[5] += 1
                c[6] += run.wire_bytes
                if run.data:
                    lane.rx_data = True
                for p, s in zip(run.packets, run.sources, strict=True):
                    if _lane_of(routes, s) is lane and (flt is None or filter_passes(flt, p)):
                        c[7] += 1
                        c[8] += len(p)
                        plain.append(p)
                    else:
                        checks.append((lane, p))
            if rest:
                slow.append((rest, src))
        writes = failed = 0
        if plain:
            writes, failed = self.tun_io.write(plain)
        answered = None
        if answer is not None and answer.max_reads > 0 and writes > failed:
            answered = self.tx(answer.max_reads, routes, now, answer.tcp_only)
        return FastRx(
            slow,
            used,
            len(received),
            checks,
            auth,
            rep,
            not_ip,
            malformed,
            writes,
            failed,
            answered,
        )


class NativeLanes:
    """The same batches in one call each (agent._fastpath.fast_tx / fast_rx)."""

    def __init__(self, tun: TunLike, udp: UdpSocket, mod: ModuleType) -> None:
        self.tun_fd = tun.fileno()
        self.vnet_hdr = tun.vnet_hdr
        self.uso = tun.offload == OFFLOAD_TSO_USO
        self.udp = udp
        self.udp_fd = udp.fileno()
        self.module = mod
        self._fast_tx = mod.fast_tx
        self._fast_rx = mod.fast_rx

    def new_lane(self) -> LaneLike:
        lane: LaneLike = self.module.Lane()
        return lane

    def arm_tx(
        self, lane: LaneLike, sealer: SealerLike, target: Endpoint, limit: int, deadline: float
    ) -> bool:
        raw = self.udp.raw_target(target)
        if raw is None or not isinstance(sealer, self.module.Sealer):
            lane.disarm_tx()
            return False
        lane.arm_tx(sealer, raw, limit, deadline)  # type: ignore[attr-defined]
        return True

    def arm_rx(
        self,
        lane: LaneLike,
        aead: Aead,
        replay: Replay,
        index: int,
        source: Endpoint,
        deadline: float,
    ) -> bool:
        raw = self.udp.raw_target(source)
        # The compiled lane compares raw addresses, the Python twin (and path) Endpoints as
        # UdpSocket names sources: one spelled otherwise ("::ffff:7f00:1") never matches there.
        if raw is None or self.udp.source_of(raw) != source:
            lane.disarm_rx()
            return False
        lane.arm_rx(aead, replay, index, raw, deadline)  # type: ignore[attr-defined]
        return True

    def tx(
        self, max_reads: int, routes: Mapping[bytes, object], now: float, tcp_only: bool
    ) -> FastTx:
        return self.sent(
            self._fast_tx(
                self.tun_fd,
                max_reads,
                self.vnet_hdr,
                routes,
                self.udp_fd,
                self.udp.gso,
                now,
                tcp_only,
            )
        )

    def sent(self, r: tuple[Any, ...]) -> FastTx:
        """fast_tx's result: its counts of failed sends into the socket's, as a FastTx."""
        (packets, runs, reads, not_ip, malformed, error, used, dropped, errors, err, gso) = r
        udp = self.udp
        udp.gso = gso
        if dropped or errors:
            udp.count_send_failures(dropped, errors, err)
        return FastTx(TunRead(packets, runs, reads, not_ip, malformed, error), used)

    def rx(
        self,
        max_datagrams: int,
        lanes: Mapping[int, LaneLike],
        routes: Mapping[bytes, object],
        now: float,
        flt: FastView | None = None,
        answer: Answer | None = None,
    ) -> FastRx:
        return self.received(
            self._fast_rx(
                self.udp_fd,
                max_datagrams,
                lanes,
                routes,
                self.tun_fd,
                self.vnet_hdr,
                self.uso,
                now,
                flt,
                None if answer is None else (answer.max_reads, self.udp.gso, answer.tcp_only),
            )
        )

    def received(self, r: tuple[Any, ...]) -> FastRx:
        """fast_rx's result as a FastRx: raw sources named, the answer's sends counted."""
        if r[10] is not None:
            r = (*r[:10], self.sent(r[10]))
        source_of = self.udp.source_of
        return FastRx([(datagrams, source_of(raw)) for datagrams, raw in r[0]], *r[1:])


def lanes_for(impl: DataPlaneImpl, tun: TunLike, udp: UdpSocket) -> LanePaths | None:
    """The compiled lanes when the daemon runs the compiled data plane, else None: the
    Python data plane is the reference path itself (its twin here opens message by message,
    which is slower than the Python path's runs, and only serves to check the compiled one)."""
    mod = impl.module
    if mod is not None and hasattr(mod, "fast_tx"):
        return NativeLanes(tun, udp, mod)
    return None
