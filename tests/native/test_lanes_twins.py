"""Lanes: PythonLanes (agent/node/lanes.py, over the Python transport and TUN batches) against
NativeLanes (native/lanes.c, over the compiled ones) on the same inputs.

Each twin gets its own TUN stand-in (one end of a SOCK_SEQPACKET socketpair: one message per
read or write), its own UDP socket on loopback, its own lanes, sealers and replay windows, built
from the same keys, indexes, counters and deadlines. The same frames go into both TUNs and the
same datagrams into both UDP sockets (from the same senders); every result must be equal: what
comes back for the Python path, the datagrams that arrive, what reaches the TUN, the drops, the
sealer counters and what each lane counted. Lanes in results are compared by position.
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.node import tun as tun_mod
from agent.node.lanes import (
    Answer,
    FastRx,
    FastTx,
    LaneLike,
    LanePaths,
    NativeLanes,
    PythonLanes,
)
from agent.node.tun import OFFLOAD_NONE, OFFLOAD_TSO, OFFLOAD_TSO_USO
from agent.node.udp import Endpoint, UdpSocket, open_udp
from agent.policy.filter import FastView
from agent.proto.offload import (
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    ZERO_VNET_HDR,
    Buffer,
    VirtioNetHdr,
)
from agent.proto.wireguard.constants import REJECT_AFTER_MESSAGES
from agent.proto.wireguard.replay import WINDOW_SIZE
from agent.proto.wireguard.transport import PYTHON, SealerLike, Transport

from .packets import ACK, tcp_packet, udp_packet

fp = pytest.importorskip(
    "agent._fastpath", reason="agent._fastpath is not built (pip install -e . with gcc, libssl-dev)"
)

from agent.node.fastpath import native_transport  # noqa: E402

NATIVE: Transport = native_transport(fp)

TWINS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

T = TypeVar("T")
NOW = 1000.0
LANES = 4
KEYS = [bytes([0x10 + i]) * 32 for i in range(LANES)]
INDEXES = [0x01020304 + 0x100 * i for i in range(LANES)]  # lane i: sealing to, receiving as
UNKNOWN_INDEX = 0x0BADBEEF  # in no `lanes` map
ALIAS_INDEX = 0x0A11A500  # maps to lane 0, which is armed for INDEXES[0]
SOL_UDP, UDP_SEGMENT = 17, 103


def mostly(
    common: st.SearchStrategy[T], *rare: st.SearchStrategy[T], odds: int = 4
) -> st.SearchStrategy[T]:
    """`common`, and one of `rare` about once in `odds` draws."""
    return st.integers(1, odds).flatmap(lambda x: st.one_of(*rare) if x == odds else common)


def addr4(n: int) -> bytes:
    return bytes([100, 64, n, 1])


def addr6(n: int) -> bytes:
    return bytes.fromhex("fd7a115ca1e0000000000000000000") + bytes([n])


class Peer:
    """What `routes` maps an address to: anything with a `lane`."""

    __slots__ = ("lane",)

    def __init__(self, lane: object) -> None:
        self.lane = lane


class SeqTun:
    """A TUN stand-in over one end of a SOCK_SEQPACKET socketpair, with agent/node/tun.py's
    batch functions (what `Tun` runs over its fd)."""

    def __init__(self, sock: socket.socket, offload: str) -> None:
        self.sock = sock
        self.offload = offload
        self.vnet_hdr = offload != OFFLOAD_NONE
        self._cache: dict[bytes, VirtioNetHdr] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_frames(
        self, max_packets: int
    ) -> tuple[list[tuple[VirtioNetHdr, memoryview]], OSError | None]:
        return tun_mod.read_frames(self.fileno(), max_packets, self.vnet_hdr, self._cache)

    def write_packets(self, packets: Sequence[Buffer]) -> int:
        return tun_mod.write_packets(self.fileno(), packets, self.vnet_hdr)

    def write_coalesced(self, items: Sequence[tuple[bytes, list[Buffer]]]) -> int:
        return tun_mod.write_coalesced(self.fileno(), items)


@dataclass
class Side:
    """One twin and everything it owns."""

    transport: Transport
    paths: LanePaths
    feed: socket.socket  # the TUN's other end: frames in, written packets out
    udp: UdpSocket
    lanes: list[LaneLike]

    def position(self, lane: LaneLike) -> int:
        for i, x in enumerate(self.lanes):
            if x is lane:
                return i
        raise AssertionError(f"{lane!r} is none of this twin's lanes")

    def sealer(self, i: int, counter: int) -> SealerLike:
        s = self.transport.sealer(self.transport.aead(KEYS[i]), INDEXES[i])
        s.counter = counter
        return s


@contextlib.contextmanager
def twins(offload: str, udp_host: str | None = None) -> Iterator[tuple[Side, Side]]:
    """(Python twin, compiled twin), each over its own socketpair and UDP socket."""
    with contextlib.ExitStack() as stack:
        sides: list[Side] = []
        for native in (False, True):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for s in (a, b):
                stack.enter_context(s)
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            tun = SeqTun(a, offload)
            udp = stack.enter_context(open_udp(0, host=udp_host))
            paths: LanePaths
            if native:
                udp.use_native(fp)
                paths, transport = NativeLanes(tun, udp, fp), NATIVE
            else:
                paths, transport = PythonLanes(tun, udp, PYTHON), PYTHON
            lanes = [paths.new_lane() for _ in range(LANES)]
            sides.append(Side(transport, paths, b, udp, lanes))
        yield sides[0], sides[1]


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(0x20000))
        except BlockingIOError:
            return out


def plain_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setblocking(False)
    return s


def endpoint_of(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def error_of(e: OSError | None) -> object:
    return None if e is None else (type(e), e.errno)


# =========================================================================== sending (tx)

# Destinations: lane i owns addr4(10 + i) and addr6(10 + i); then an address routed to None,
# one to a peer without a lane, and two not in `routes` at all.
NONE4, NONE6, NOLANE4, MISSING4, MISSING6 = addr4(20), addr6(20), addr4(22), addr4(21), addr6(21)
DESTS = [a for i in range(LANES) for a in (addr4(10 + i), addr6(10 + i))] + [
    NONE4,
    NONE6,
    NOLANE4,
    MISSING4,
    MISSING6,
]


def tx_routes(side: Side) -> dict[bytes, object]:
    routes: dict[bytes, object] = {}
    for i, lane in enumerate(side.lanes):
        peer = Peer(lane)
        routes[addr4(10 + i)] = routes[addr6(10 + i)] = peer
    routes[NONE4] = routes[NONE6] = None
    routes[NOLANE4] = Peer(None)
    return routes


@dataclass(frozen=True)
class TxArm:
    counter: int  # the sealer's counter when armed
    room: int  # limit = counter + room
    deadline: float  # offset from NOW
    disarm: bool  # armed, then disarmed again


@dataclass(frozen=True)
class Read:
    """One TUN read (repeated `repeat` times) towards DESTS[dest]."""

    dest: int
    kind: str  # tcp, udp, junk, tso, uso
    size: int
    mss: int
    repeat: int


def tx_frames(reads: Sequence[Read], vnet: bool, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    seq = 1000
    out = []
    for r in reads:
        dst = DESTS[r.dest]
        version = 4 if len(dst) == 4 else 6
        for _ in range(r.repeat):
            payload = rng.randbytes(r.size)
            hdr = ZERO_VNET_HDR
            kind = r.kind if vnet else {"tso": "tcp", "uso": "udp"}.get(r.kind, r.kind)
            if kind == "junk":
                pkt = bytes([rng.choice([0x00, 0x45, 0x60, 0x70])]) + payload[:18]
            elif kind in ("udp", "uso"):
                pkt = udp_packet(version, payload, dst=dst)
                if kind == "uso":
                    hdr = VirtioNetHdr(
                        gso_type=GSO_UDP_L4,
                        hdr_len=(20 if version == 4 else 40) + 8,
                        gso_size=r.mss,
                    ).encode()
            else:
                pkt = tcp_packet(version, payload, seq, ACK, dst=dst)
                seq += len(payload)
                if kind == "tso":
                    hdr = VirtioNetHdr(
                        gso_type=GSO_TCPV4 if version == 4 else GSO_TCPV6,
                        hdr_len=(20 if version == 4 else 40) + 20,
                        gso_size=r.mss,
                    ).encode()
            out.append(hdr + pkt if vnet else pkt)
    return out


reads = st.builds(
    Read,
    dest=st.integers(0, len(DESTS) - 1),
    kind=st.sampled_from(["tcp", "tcp", "tcp", "udp", "udp", "junk", "tso", "uso"]),
    size=st.integers(0, 1400) | st.sampled_from([0, 1, 100]),
    mss=st.integers(400, 1400),
    repeat=st.integers(1, 4),
)
# mostly armed and open, so that most examples send on a lane or two
tx_arms = mostly(
    st.builds(
        TxArm,
        counter=st.integers(0, 2**40) | st.sampled_from([0, 7]),
        room=mostly(st.just(10**6), st.integers(0, 12), odds=3),
        deadline=mostly(st.sampled_from([60.0, math.inf]), st.sampled_from([-1.0, 0.0, 1e-3])),
        disarm=st.integers(0, 7).map(lambda x: x == 7),
    ),
    st.none(),
    odds=6,
)


class TxView(NamedTuple):
    """One tx call's result, comparable: the rest for Python, and the lanes used (positions)."""

    packets: list[bytes]
    runs: list[tuple[bytes, int]]
    reads: int
    not_ip: int
    malformed: int
    error: object
    lanes: list[int]


@dataclass
class TxOutcome:
    """What both twins agreed on."""

    calls: list[TxView]  # per tx call
    received: list[list[bytes]]  # per lane: the datagrams its receiver got
    counters: list[int]  # per lane: the sealer's counter at the end
    counts: list[tuple[int, int, int, int, int, int, int, int, int, bool]]  # lane.take()
    udp: tuple[int, int, object, bool]  # send_dropped, send_errors, last error, gso


def tx_view(r: FastTx, side: Side) -> TxView:
    rest = r.rest
    return TxView(
        [bytes(p) for p in rest.packets],
        [(bytes(d), int(n)) for d, n in rest.runs],
        rest.reads,
        rest.not_ip,
        rest.malformed,
        error_of(rest.error),
        [side.position(lane) for lane in r.lanes],
    )


def run_tx(
    offload: str,
    arms: Sequence[TxArm | None],
    frames: Sequence[bytes],
    max_reads: int,
    tcp_only: bool,
    now: float = NOW,
    gso: bool = True,
) -> TxOutcome:
    """The same frames through both twins' tx until the TUN is empty; asserts they agree."""
    with twins(offload) as (py, c), contextlib.ExitStack() as stack:
        outcomes: list[TxOutcome] = []
        sides = (py, c)
        for side in sides:
            side.udp.gso = gso
        receivers = [[stack.enter_context(plain_socket()) for _ in range(LANES)] for _ in sides]
        sealers: list[list[SealerLike]] = [[], []]
        for k, side in enumerate(sides):
            for i, arm in enumerate(arms):
                s = side.sealer(i, arm.counter if arm else 3)
                sealers[k].append(s)
                if arm is None:
                    continue
                target = endpoint_of(receivers[k][i])
                limit = arm.counter + arm.room
                assert side.paths.arm_tx(side.lanes[i], s, target, limit, now + arm.deadline)
                assert side.lanes[i].tx_armed
                if arm.disarm:
                    side.lanes[i].disarm_tx()
                    assert not side.lanes[i].tx_armed
            for f in frames:
                side.feed.send(f)
        routes = [tx_routes(side) for side in sides]
        received: list[list[list[bytes]]] = [[[] for _ in range(LANES)] for _ in sides]
        calls: list[list[TxView]] = [[], []]
        for _ in range(len(frames) + 2):
            for k, side in enumerate(sides):
                r = side.paths.tx(max_reads, routes[k], now, tcp_only)
                calls[k].append(tx_view(r, side))
                for i in range(LANES):  # now, before a receive buffer could fill
                    received[k][i] += drain(receivers[k][i])
            assert calls[1][-1] == calls[0][-1]
            if calls[0][-1].reads == 0:  # no read: the TUN is empty
                break
        assert drain(py.feed) == drain(c.feed) == []
        for k, side in enumerate(sides):
            outcomes.append(
                TxOutcome(
                    calls[k],
                    received[k],
                    [s.counter for s in sealers[k]],
                    [lane.take() for lane in side.lanes],
                    udp_counters(side.udp),
                )
            )
        assert outcomes[1].received == outcomes[0].received
        assert outcomes[1].counters == outcomes[0].counters
        assert outcomes[1].counts == outcomes[0].counts
        assert outcomes[1] == outcomes[0]
        check_tx_outcome(outcomes[0], arms)
        return outcomes[0]


def udp_counters(udp: UdpSocket) -> tuple[int, int, object, bool]:
    return udp.send_dropped, udp.send_errors, error_of(udp.last_error), udp.gso


def check_tx_outcome(out: TxOutcome, arms: Sequence[TxArm | None]) -> None:
    """What the datagrams say on their own: each lane's receiver got as many as it counted
    (all it sealed, unless the socket refused some), each one opens under its key, numbered on
    from the armed counter."""
    assert sum(c[4] for c in out.counts) == out.udp[0] + out.udp[1]
    for i, (arm, got, counts) in enumerate(zip(arms, out.received, out.counts, strict=True)):
        start = arm.counter if arm else 3
        assert counts[0] == out.counters[i] - start == counts[2] + counts[4]
        assert len(got) == counts[2]
        run = PYTHON.open_run(PYTHON.aead(KEYS[i]), PYTHON.replay(), got, 0, INDEXES[i])
        assert run.next == len(got)
        assert run.authentication == run.replay == 0
        numbers = [struct.unpack_from("<Q", d, 8)[0] for d in got]
        if counts[4]:
            assert numbers == sorted(numbers)
            assert counts[3] > sum(map(len, got))
            continue
        assert numbers == list(range(start, start + len(got)))
        assert counts[3] == sum(map(len, got))
        assert counts[1] == sum(map(len, run.packets))


@TWINS
@given(
    vnet=st.booleans(),
    arms=st.lists(tx_arms, min_size=LANES, max_size=LANES),
    reads=st.lists(reads, min_size=1, max_size=16),
    max_reads=st.integers(1, 8) | st.integers(1, 64),
    tcp_only=st.integers(0, 3).map(lambda x: x == 0),
    seed=st.integers(0, 2**32 - 1),
)
def test_tx_twins(
    vnet: bool,
    arms: list[TxArm | None],
    reads: list[Read],
    max_reads: int,
    tcp_only: bool,
    seed: int,
) -> None:
    offload = OFFLOAD_TSO_USO if vnet else OFFLOAD_NONE
    out = run_tx(offload, arms, tx_frames(reads, vnet, seed), max_reads, tcp_only)
    assert out.udp[:3] == (0, 0, None)


def armed(counter: int = 0, room: int = 10**6, deadline: float = 60.0) -> TxArm:
    return TxArm(counter, room, deadline, disarm=False)


def test_tx_counter_limit_leaves_the_read_to_python() -> None:
    # lane 0: counter 10, limit 12: two reads fit, every later one goes to Python
    arms = [armed(10, room=2), armed(), None, None]
    reads = [
        Read(0, "tcp", 50, 0, 3),  # lane 0 (IPv4): 11, 12, then 12 + 1 > 12
        Read(2, "udp", 60, 0, 1),  # lane 1
        Read(1, "tcp", 70, 0, 2),  # lane 0 (IPv6): 12 + 1 > 12
        Read(0, "tcp", 80, 0, 1),  # 12 + 1 > 12
    ]
    out = run_tx(OFFLOAD_NONE, arms, tx_frames(reads, False, 1), 64, False)
    first = out.calls[0]
    assert first.runs == [(addr4(10), 1), (addr6(10), 2), (addr4(10), 1)]
    assert len(first.packets) == 4
    assert first.reads == 7
    assert first.lanes == [0, 1]
    assert out.counters[:2] == [12, 1]
    assert [c[0] for c in out.counts] == [2, 1, 0, 0]


def test_tx_counter_exactly_at_the_limit() -> None:
    arms = [armed(5, room=0), armed(5, room=1), armed(5, room=2), None]
    reads = [Read(0, "tcp", 10, 0, 1), Read(2, "tcp", 10, 0, 1), Read(4, "tcp", 10, 0, 2)]
    out = run_tx(OFFLOAD_NONE, arms, tx_frames(reads, False, 2), 64, False)
    assert out.calls[0].runs == [(addr4(10), 1)]
    assert out.counters[:3] == [5, 6, 7]


def test_tx_deadline_leaves_the_run_to_python() -> None:
    # now == deadline is too late; just before it is not
    arms = [armed(deadline=0.0), armed(deadline=1e-6), armed(deadline=-5.0), None]
    reads = [Read(0, "tcp", 10, 0, 2), Read(2, "tcp", 10, 0, 2), Read(4, "udp", 10, 0, 1)]
    out = run_tx(OFFLOAD_NONE, arms, tx_frames(reads, False, 3), 64, False)
    assert out.calls[0].runs == [(addr4(10), 2), (addr4(12), 1)]
    assert out.calls[0].lanes == [1]
    assert [c[0] for c in out.counts] == [0, 2, 0, 0]


@pytest.mark.parametrize("vnet", [False, True])
def test_tx_tcp_only_leaves_other_reads_to_python(vnet: bool) -> None:
    arms = [armed(), armed(), None, None]
    reads = [
        Read(0, "tcp", 10, 0, 3),  # all TCP: lane 0
        Read(2, "tcp", 10, 0, 1),  # lane 1: the TCP read in the lane, the UDP one to Python
        Read(2, "udp", 10, 0, 1),
        Read(1, "udp", 10, 0, 1),  # lane 0 (IPv6): UDP
        Read(3, "tso" if vnet else "tcp", 3000, 700, 1),  # lane 1 (IPv6): TCP
        Read(0, "junk", 5, 0, 1),  # not IP: dropped, the run goes on
        Read(0, "tcp", 10, 0, 1),
    ]
    offload = OFFLOAD_TSO_USO if vnet else OFFLOAD_NONE
    out = run_tx(offload, arms, tx_frames(reads, vnet, 4), 64, True)
    assert out.calls[0].runs == [(addr4(11), 1), (addr6(10), 1)]
    assert out.calls[0].not_ip == 1
    sent = [c[0] for c in out.counts]
    assert sent == [4, 6 if vnet else 2, 0, 0]
    # without tcp_only the same batch leaves nothing to Python
    out = run_tx(offload, arms, tx_frames(reads, vnet, 4), 64, False)
    assert out.calls[0].runs == []


@pytest.mark.parametrize("gso", [True, False])
def test_tx_datagram_too_large_for_udp_is_counted(gso: bool) -> None:
    # A 65535-byte packet seals into a datagram UDP cannot carry (EMSGSIZE): both twins count
    # it as failed and send the rest. (The Python send batch used to put a datagram longer
    # than MAX_GSO_BYTES into an empty GSO group: struct.error, and no progress.)
    reads = [Read(0, "tcp", 100, 0, 2), Read(0, "tcp", 65535 - 40, 0, 1), Read(0, "udp", 9, 0, 1)]
    arms = [armed(), None, None, None]
    out = run_tx(OFFLOAD_NONE, arms, tx_frames(reads, False, 6), 64, False, gso=gso)
    tx_packets, tx_bytes, tx_datagrams, _, tx_failed, *_ = out.counts[0]
    assert (tx_packets, tx_datagrams, tx_failed) == (4, 3, 1)
    assert tx_bytes == 2 * 140 + 65535 + 37
    assert out.udp == (0, 1, (OSError, errno.EMSGSIZE), gso)
    assert [len(d) for d in out.received[0]] == [176, 176, 80]


# =========================================================================== receiving (rx)

# Inner source addresses: lane i's peer owns addr4(30 + i) and addr6(30 + i); then one routed
# to None, one to a peer without a lane, one missing.
SOURCES = [a for i in range(LANES) for a in (addr4(30 + i), addr6(30 + i))] + [
    addr4(40),
    addr6(42),
    addr4(41),
]


OWN = -1  # the source address of the sealing lane's own peer (IPv4 or IPv6)


def rx_routes(side: Side) -> dict[bytes, object]:
    routes: dict[bytes, object] = {}
    for i, lane in enumerate(side.lanes):
        peer = Peer(lane)
        routes[addr4(30 + i)] = routes[addr6(30 + i)] = peer
    routes[addr4(40)] = None
    routes[addr6(42)] = Peer(None)
    return routes


def rx_lanes(side: Side) -> dict[int, LaneLike]:
    lanes = dict(zip(INDEXES, side.lanes, strict=True))
    lanes[ALIAS_INDEX] = side.lanes[0]
    return lanes


@dataclass(frozen=True)
class RxArm:
    source: int | str  # 0: the main sender, 1: the other, 2: an address nobody sends from;
    # text: the main sender's port at this spelling of its address
    deadline: float  # offset from NOW
    disarm: bool


@dataclass(frozen=True)
class Msg:
    """One datagram (or a GSO burst of equal-size ones) into both twins' UDP sockets."""

    kind: str
    lane: int  # whose key and index
    source: int  # index into SOURCES (the inner packet's source address), or OWN
    size: int
    counter: int
    via: int  # 0: the main sender, 1: the other sender
    flip: int  # "corrupt": the byte to flip (mod the length)
    count: int  # "burst": how many
    seed: int


def inner_packet(m: Msg, seq: int) -> bytes:
    src = SOURCES[2 * m.lane + (m.seed >> 1 & 1) if m.source == OWN else m.source]
    version = 4 if len(src) == 4 else 6
    payload = random.Random(m.seed).randbytes(m.size)
    if m.seed & 1:
        return udp_packet(version, payload, ports=(4000, 53), src=src)
    return tcp_packet(version, payload, seq, ACK, ports=(4001, 443), src=src)


def datagrams_of(m: Msg, sent: Sequence[bytes], seq: list[int]) -> list[bytes]:
    aead = PYTHON.aead(KEYS[m.lane])
    index = INDEXES[m.lane]

    def sealed(payload: bytes, counter: int = m.counter, index: int = index) -> bytes:
        return PYTHON.seal(aead, index, counter, [payload])[0]

    def data() -> bytes:
        p = inner_packet(m, seq[0])
        seq[0] += m.size
        return p

    rng = random.Random(m.seed)
    if m.kind == "data":
        return [sealed(data())]
    if m.kind == "keepalive":
        return [sealed(b"")]
    if m.kind == "not_ip":
        return [sealed(bytes([rng.choice([0x00, 0x45, 0x60, 0x70])]) + rng.randbytes(m.size % 40))]
    if m.kind == "malformed":
        p = bytearray(data())
        if p[0] >> 4 == 4:  # below 20, or beyond the payload and its padding
            p[2:4] = struct.pack(">H", rng.choice([0, 19, len(p) + 16, 0xFFFF]))
        else:
            p[4:6] = struct.pack(">H", rng.choice([len(p) - 40 + 16, 0xFFFF]))
        return [sealed(bytes(p))]
    if m.kind == "padded":  # bytes past the IP length: trimmed
        return [sealed(data() + rng.randbytes(1 + m.size % 30))]
    if m.kind == "corrupt":
        d = bytearray(sealed(data()))
        d[m.flip % len(d)] ^= 1 << (m.seed % 8)
        return [bytes(d)]
    if m.kind == "unknown_index":
        return [sealed(data(), index=UNKNOWN_INDEX)]
    if m.kind == "alias_index":
        return [sealed(data(), index=ALIAS_INDEX)]
    if m.kind == "handshake":
        kind, size = rng.choice([(1, 148), (2, 92), (3, 64)])
        return [bytes([kind, 0, 0, 0]) + rng.randbytes(size - 4)]
    if m.kind == "short":
        return [bytes([4, 0, 0, 0]) + rng.randbytes(m.size % 28) if m.seed & 2 else b""]
    if m.kind == "replay":
        return [sent[m.flip % len(sent)]] if sent else []
    assert m.kind == "burst"
    out = []
    for j in range(m.count):  # equal sizes; bit j of `flip`: the j-th one is corrupt
        one = sealed(data(), counter=(m.counter + j) % (2**64))
        if (m.flip >> j) & 1:
            one = one[:-1] + bytes([one[-1] ^ 0x40])
        out.append(one)
    return out


KINDS = ["data"] * 6 + [
    "keepalive",
    "not_ip",
    "malformed",
    "padded",
    "corrupt",
    "unknown_index",
    "alias_index",
    "handshake",
    "short",
    "replay",
    "replay",
    "burst",
    "burst",
    "burst",
    "burst",
]
counters = mostly(
    st.integers(0, 60),
    st.integers(WINDOW_SIZE, WINDOW_SIZE + 200),  # pushes the window past 0..60
    st.sampled_from([REJECT_AFTER_MESSAGES - 1, REJECT_AFTER_MESSAGES, 2**64 - 1]),
    odds=8,
)
msgs = st.builds(
    Msg,
    kind=st.sampled_from(KINDS),
    lane=st.sampled_from([0, 0, 0, 1, 2, 3]),
    source=mostly(st.just(OWN), st.integers(0, len(SOURCES) - 1), odds=3),
    size=st.integers(0, 1200) | st.sampled_from([0, 100, 1200]),
    counter=counters,
    via=mostly(st.just(0), st.just(1)),
    flip=st.integers(0, 2000),
    count=st.integers(2, 6),
    seed=st.integers(0, 2**32 - 1),
)
rx_arms = st.builds(
    RxArm,
    source=st.sampled_from([0, 0, 1, 2]),
    deadline=mostly(st.sampled_from([60.0, math.inf]), st.sampled_from([-1.0, 0.0, 1e-3])),
    disarm=st.integers(0, 7).map(lambda x: x == 7),
)


class RxView(NamedTuple):
    """One rx call's result, comparable: lanes by position, datagrams as bytes."""

    slow: list[tuple[list[bytes], Endpoint]]
    lanes: list[int]
    receives: int
    checks: list[tuple[int, bytes]]
    authentication: int
    replay: int
    not_ip: int
    malformed: int
    writes: int
    failed: int


def rx_view(r: FastRx, side: Side) -> RxView:
    return RxView(
        [([bytes(d) for d in ds], src) for ds, src in r.slow],
        [side.position(lane) for lane in r.lanes],
        r.receives,
        [(side.position(lane), bytes(p)) for lane, p in r.checks],
        r.authentication,
        r.replay,
        r.not_ip,
        r.malformed,
        r.writes,
        r.failed,
    )


@dataclass
class RxOutcome:
    calls: list[RxView]
    tun: list[bytes]  # what reached the TUN, message by message
    counts: list[tuple[int, int, int, int, int, int, int, int, int, bool]]  # lane.take()
    armed: list[tuple[bool, bool]] = field(default_factory=list)  # arm_rx: (Python, native)


def send(sock: socket.socket, datagrams: Sequence[bytes], to: tuple[str, int], gso: bool) -> None:
    if gso and len(datagrams) > 1 and len({len(d) for d in datagrams}) == 1:
        cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))]
        with contextlib.suppress(OSError):  # no UDP GSO here: one by one
            sock.sendmsg(list(datagrams), cmsg, 0, to)
            return
    for d in datagrams:
        sock.sendto(d, to)


def run_rx(
    offload: str,
    arms: Sequence[RxArm | None],
    messages: Sequence[Msg],
    max_datagrams: int,
    *,
    udp_host: str | None = None,
    now: float = NOW,
    must_arm: bool = True,
    flt: FastView | None = None,
) -> RxOutcome:
    """The same datagrams into both twins' rx until the socket is empty; asserts they agree.

    `arms[i]` None: lane i never armed. The lanes are armed with KEYS[i] and INDEXES[i] (as
    their receiver index), each twin with a fresh replay window of its own transport; unless
    `must_arm` is off, both twins must take the arming.
    """
    with twins(offload, udp_host) as (py, c), contextlib.ExitStack() as stack:
        sides = (py, c)
        v6 = py.udp.family == socket.AF_INET6
        senders = [
            stack.enter_context(plain_socket()),
            stack.enter_context(plain_socket("::1" if v6 else "127.0.0.1")),
        ]
        origins = [endpoint_of(senders[0]), endpoint_of(senders[1]), ("127.0.0.2", 9)]
        armed: list[list[bool]] = [[], []]
        for k, side in enumerate(sides):
            t = side.transport
            for i, arm in enumerate(arms):
                if arm is None:
                    continue
                lane = side.lanes[i]
                aead, replay = t.aead(KEYS[i]), t.replay()
                src = (
                    origins[arm.source]
                    if isinstance(arm.source, int)
                    else (arm.source, origins[0][1])
                )
                ok = side.paths.arm_rx(lane, aead, replay, INDEXES[i], src, now + arm.deadline)
                armed[k].append(ok)
                assert ok or not must_arm
                assert lane.rx_armed == ok
                assert lane.rx_index == (INDEXES[i] if ok else None)
                if ok and arm.disarm:
                    lane.disarm_rx()
                    assert not lane.rx_armed
                    assert lane.rx_index is None
        sent: list[bytes] = []
        seq = [7]
        total = 0
        for m in messages:
            ds = datagrams_of(m, sent, seq)
            sent += ds
            total += len(ds)
            sock = senders[m.via]
            for side in sides:
                to = ("::1" if sock.family == socket.AF_INET6 else "127.0.0.1", side.udp.port)
                send(sock, ds, to, m.kind == "burst")
        routes = [rx_routes(side) for side in sides]
        lanes = [rx_lanes(side) for side in sides]
        calls: list[list[RxView]] = [[], []]
        for _ in range(total + 2):
            for k, side in enumerate(sides):
                r = side.paths.rx(max_datagrams, lanes[k], routes[k], now, flt)
                calls[k].append(rx_view(r, side))
            assert calls[1][-1] == calls[0][-1]
            if calls[0][-1].receives == 0:  # no receive: the socket is empty
                break
        outcomes = [
            RxOutcome(calls[k], drain(side.feed), [lane.take() for lane in side.lanes])
            for k, side in enumerate(sides)
        ]
        assert outcomes[1].tun == outcomes[0].tun
        assert outcomes[1].counts == outcomes[0].counts
        assert outcomes[1] == outcomes[0]
        check_rx_outcome(outcomes[0], total, offload)
        outcomes[0].armed = list(zip(armed[0], armed[1], strict=True))
        return outcomes[0]


def check_rx_outcome(out: RxOutcome, total: int, offload: str) -> None:
    """Every datagram sent is accounted for exactly once: in `slow`, as a drop before the
    window took it, or counted by its lane."""
    slow = sum(len(ds) for call in out.calls for ds, _ in call.slow)
    before = sum(call.authentication + call.replay for call in out.calls)
    assert slow + before + sum(c[5] for c in out.counts) == total
    to_tun = sum(c[7] for c in out.counts)
    if offload == OFFLOAD_NONE:
        assert len(out.tun) == to_tun
    assert sum(call.writes for call in out.calls) == len(out.tun)
    assert all(call.failed == 0 for call in out.calls)


@TWINS
@given(
    offload=st.sampled_from([OFFLOAD_NONE, OFFLOAD_TSO, OFFLOAD_TSO_USO]),
    inet=st.integers(0, 3).map(lambda x: x == 0),
    arms=st.tuples(
        st.just(RxArm(0, 60.0, False)),  # lane 0: always on, from the main sender
        rx_arms | st.none(),
        rx_arms | st.none(),
        rx_arms | st.none(),
    ),
    messages=st.lists(msgs, min_size=3, max_size=30),
    max_datagrams=st.integers(1, 8) | st.integers(1, 64),
)
def test_rx_twins(
    offload: str,
    inet: bool,
    arms: tuple[RxArm | None, ...],
    messages: list[Msg],
    max_datagrams: int,
) -> None:
    run_rx(offload, arms, messages, max_datagrams, udp_host="127.0.0.1" if inet else None)


ACCEPT, SYN_DENIED, OTHER = object(), object(), object()  # a filter's decisions, as it caches


def filter_view(verdicts: Sequence[object | None]) -> FastView:
    """Decisions for the flows inner_packet makes: verdicts[2 * k + (TCP)] for SOURCES[k]
    (None: not cached)."""
    v4: dict[object, object] = {}
    v6: dict[object, object] = {}
    t4: dict[int, dict[object, object]] = {6: {}, 17: v4}
    t6: dict[int, dict[object, object]] = {6: {}, 17: v6}
    for k, src in enumerate(SOURCES):
        version = 4 if len(src) == 4 else 6
        for tcp, verdict in enumerate(verdicts[2 * k : 2 * k + 2]):
            if verdict is None:
                continue
            if tcp:
                pkt = tcp_packet(version, b"", 1, ACK, ports=(4001, 443), src=src)
            else:
                pkt = udp_packet(version, b"", ports=(4000, 53), src=src)
            key = pkt[12:24] if version == 4 else pkt[8:44]
            (t4 if version == 4 else t6)[6 if tcp else 17][key] = verdict
    return FastView(t4, t6, ACCEPT, SYN_DENIED)


@TWINS
@given(
    verdicts=st.lists(
        st.sampled_from([ACCEPT, SYN_DENIED, OTHER, None]),
        min_size=2 * len(SOURCES),
        max_size=2 * len(SOURCES),
    ),
    messages=st.lists(msgs, min_size=3, max_size=20),
    max_datagrams=st.integers(1, 64),
)
def test_rx_twins_with_a_filter(
    verdicts: list[object | None], messages: list[Msg], max_datagrams: int
) -> None:
    """With the packet filter's decisions: a packet reaches the TUN in the lane only where the
    cached decision passes it (ACCEPT; SYN_DENIED and not a SYN), else it goes to `checks`."""
    arms = (RxArm(0, 60.0, False), RxArm(0, 60.0, False), None, None)
    run_rx(OFFLOAD_NONE, arms, messages, max_datagrams, flt=filter_view(verdicts))


def test_rx_filter_passes_only_what_its_cache_passes() -> None:
    own4 = SOURCES.index(addr4(30))
    verdicts: list[object | None] = [None] * (2 * len(SOURCES))
    verdicts[2 * own4] = ACCEPT  # UDP from lane 0's IPv4 source
    verdicts[2 * own4 + 1] = SYN_DENIED  # TCP from it: the ACKs pass
    messages = [msg("data", seed=2 * j + 1, counter=j) for j in range(2)]  # UDP, own IPv4
    messages += [msg("data", seed=0, counter=10)]  # TCP ACKs
    out = run_rx(OFFLOAD_NONE, (RX_ON, None, None, None), messages, 64, flt=filter_view(verdicts))
    assert sum(len(call.checks) for call in out.calls) == 0
    verdicts[2 * own4] = OTHER  # a cached drop, or a reply flow: Python decides
    verdicts[2 * own4 + 1] = None
    out = run_rx(OFFLOAD_NONE, (RX_ON, None, None, None), messages, 64, flt=filter_view(verdicts))
    assert sum(len(call.checks) for call in out.calls) == 3
    assert out.tun == []


def msg(kind: str, lane: int = 0, source: int = 0, counter: int = 0, **kw: int) -> Msg:
    base = {"size": 40, "via": 0, "flip": 20, "count": 3, "seed": 2}
    base.update(kw)
    return Msg(kind, lane, source, counter=counter, **base)


RX_ON = RxArm(0, 60.0, False)


@pytest.mark.parametrize("offload", [OFFLOAD_NONE, OFFLOAD_TSO, OFFLOAD_TSO_USO])
def test_rx_every_kind_once(offload: str) -> None:
    messages = [
        msg("data", counter=0),  # lane 0, source its own: to the TUN
        msg("data", counter=1),
        msg("replay", flip=1),  # counter 1 again
        msg("corrupt", counter=2, flip=40),  # authentication
        msg("keepalive", counter=3),
        msg("not_ip", counter=4),
        msg("malformed", counter=5),
        msg("padded", counter=6),
        msg("data", source=2, counter=7),  # lane 1's address: checks
        msg("data", source=8, counter=8),  # routed to None: checks
        msg("data", source=10, counter=9),  # not in routes: checks
        msg("unknown_index", counter=10),  # slow
        msg("alias_index", counter=11),  # slow: lane 0 is armed for another index
        msg("handshake"),  # slow
        msg("short", seed=2),  # transport type, too short: slow
        msg("short", seed=0),  # empty datagram: slow
        msg("data", lane=1, source=2, counter=0),  # lane 1: from the other sender only
        msg("data", lane=1, source=2, counter=1, via=1),
        msg("burst", lane=1, source=3, counter=2, via=1, count=4, flip=0b0100),
        msg("data", lane=2, source=4),  # lane 2: expired
        msg("data", lane=3, source=6),  # lane 3: never armed
    ]
    arms = [RX_ON, RxArm(1, 60.0, False), RxArm(0, 0.0, False), None]
    out = run_rx(offload, arms, messages, 100)
    first, *rest = out.calls
    assert all(call.receives == 0 for call in rest)
    drops = (first.authentication, first.replay, first.not_ip, first.malformed)
    assert drops == (2, 1, 1, 1)  # one corrupt message in the burst
    assert first.lanes == [0, 1]
    assert [lane for lane, _ in first.checks] == [0, 0, 0]
    assert sum(len(ds) for ds, _ in first.slow) == 8
    assert len(out.tun) == first.writes
    if offload == OFFLOAD_NONE:
        assert first.writes == 3 + 4
    else:  # lane 0's first two and lane 1's burst (up to its corrupt one) are TCP in order
        assert first.writes == 3 + 4 - 2
    assert first.failed == 0
    counts = out.counts
    assert counts[0][5] == 9  # authentic, new: 2 data, keepalive, not IP, malformed, padded, 3
    assert counts[0][7] == 3
    assert counts[1][7] == 4
    assert counts[0][9]
    assert counts[1][9]
    assert counts[2] == counts[3] == (0,) * 9 + (False,)


@pytest.mark.parametrize("offload", [OFFLOAD_NONE, OFFLOAD_TSO_USO])
@pytest.mark.parametrize("inet", [False, True])
def test_rx_from_another_address_goes_to_python(offload: str, inet: bool) -> None:
    # lanes armed for an address nobody sends from (same host, another port / another host)
    messages = [
        msg("data", counter=0),
        msg("data", counter=1, via=1),
        msg("burst", counter=2, count=4, flip=0),
        msg("data", lane=1, source=2, counter=0),
        msg("keepalive", lane=1, counter=1, via=1),
    ]
    arms = [RxArm(2, 60.0, False), RxArm(2, math.inf, False), None, None]
    out = run_rx(offload, arms, messages, 64, udp_host="127.0.0.1" if inet else None)
    (call,) = (c for c in out.calls if c.receives)
    assert [len(ds) for ds, _ in call.slow] == [1, 1, 4, 1, 1]  # the burst: one GRO receive
    assert call.lanes == []
    assert call.checks == []
    assert (call.authentication, call.replay, call.not_ip, call.malformed) == (0, 0, 0, 0)
    assert (call.writes, call.failed) == (0, 0)
    assert out.tun == []
    assert all(c == (0,) * 9 + (False,) for c in out.counts)


@pytest.mark.parametrize("spelled", ["::ffff:127.0.0.1", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1"])
def test_rx_source_spelled_otherwise_goes_to_python(spelled: str) -> None:
    # The Python twin (like the Python path: a roam) matches a source Endpoint as UdpSocket
    # names it ("127.0.0.1"), so a lane armed for the same address spelled otherwise never
    # matches there; the compiled lane compares raw addresses and used to open it all the same.
    # Now NativeLanes refuses that arming, and both leave everything to Python.
    messages = [msg("data", counter=0), msg("keepalive", counter=1), msg("data", counter=2)]
    arms = [RxArm(spelled, 60.0, False), None, None, None]
    out = run_rx(OFFLOAD_NONE, arms, messages, 64, must_arm=False)
    assert out.armed == [(True, False)]
    call = out.calls[0]
    assert [len(ds) for ds, _ in call.slow] == [1, 1, 1]
    assert {src[0] for _, src in call.slow} == {"127.0.0.1"}
    assert call.lanes == []
    assert out.tun == []


def test_rx_armed_for_another_port_of_the_same_host() -> None:
    # lane 0 armed for the other sender (on IPv4 here): the main sender's messages go to Python
    messages = [msg("data", counter=0), msg("data", counter=1, via=1)]
    out = run_rx(OFFLOAD_NONE, [RxArm(1, 60.0, False), None, None, None], messages, 64,
                 udp_host="127.0.0.1")  # fmt: skip
    assert len(out.calls[0].slow) == 1
    assert out.calls[0].lanes == [0]
    assert len(out.tun) == 1


# =========================================================================== Sealer

sealer_counters = st.integers(0, 2**64 - 2**13 - 100) | st.sampled_from([0, 1, 2**32 - 1])


@settings(max_examples=60, deadline=None)
@given(
    index=st.integers(0, 2**32 - 1),
    start=sealer_counters,
    batches=st.lists(st.lists(st.integers(0, 1500), max_size=8), max_size=5),
    reset=st.none() | sealer_counters,
    seed=st.integers(0, 255),
)
def test_sealer_twins(
    index: int, start: int, batches: list[list[int]], reset: int | None, seed: int
) -> None:
    key = bytes([seed]) * 32
    py = PYTHON.sealer(PYTHON.aead(key), index)
    c = NATIVE.sealer(NATIVE.aead(key), index)
    assert c.counter == py.counter == 0
    assert c.remote_index == py.remote_index == index
    py.counter = c.counter = start
    for n, lengths in enumerate(batches):
        packets = [bytes([(seed + i) & 0xFF]) * size for i, size in enumerate(lengths)]
        before = py.counter
        out = py.seal(packets)
        assert c.seal([memoryview(p) for p in packets]) == out
        assert out == PYTHON.seal(PYTHON.aead(key), index, before, packets)
        assert c.counter == py.counter == before + len(packets)
        if n == 1 and reset is not None:
            py.counter = c.counter = reset
            assert c.counter == py.counter == reset


def test_sealer_counter_is_shared_with_the_lane() -> None:
    # the lane seals with the very sealer it was armed with: moving its counter moves the lane's
    reads = [Read(0, "tcp", 10, 0, 2)]
    with twins(OFFLOAD_NONE) as sides, contextlib.ExitStack() as stack:
        got = []
        for side in sides:
            rx = stack.enter_context(plain_socket())
            s = side.sealer(0, 0)
            assert side.paths.arm_tx(side.lanes[0], s, endpoint_of(rx), 100, NOW + 60)
            s.counter = 90
            for f in tx_frames(reads, False, 5):
                side.feed.send(f)
            side.paths.tx(8, tx_routes(side), NOW, False)
            assert s.counter == 92
            s.counter = 99  # one read still fits (99 + 1 <= 100), the next does not
            for f in tx_frames(reads, False, 5):
                side.feed.send(f)
            r = side.paths.tx(8, tx_routes(side), NOW, False)
            assert r.rest.runs == [(addr4(10), 1)]
            assert s.counter == 100
            got.append(drain(rx))
        assert got[0] == got[1]
        assert [struct.unpack_from("<Q", d, 8)[0] for d in got[0]] == [90, 91, 99]


# =========================================================================== rx, then tx (answer)


@pytest.mark.parametrize("written", [True, False])
def test_rx_answer_sends_what_waits_in_the_tun(written: bool) -> None:
    """`answer`: when packets went to the TUN, tx runs in the same call; both twins read and
    seal the same answer, and neither reads the TUN when nothing was written."""
    with twins(OFFLOAD_NONE) as sides, contextlib.ExitStack() as stack:
        sender = stack.enter_context(plain_socket())
        views: list[tuple[object, ...]] = []
        for side in sides:
            t = side.transport
            rx_lane = side.lanes[0]
            assert side.paths.arm_rx(
                rx_lane, t.aead(KEYS[0]), t.replay(), INDEXES[0], endpoint_of(sender), NOW + 60
            )
            back = stack.enter_context(plain_socket())
            assert side.paths.arm_tx(
                side.lanes[1], side.sealer(1, 5), endpoint_of(back), 1000, NOW + 60
            )
            routes = rx_routes(side) | tx_routes(side)
            inner = udp_packet(4, b"ping", ports=(4000, 53), src=addr4(30))
            if not written:
                inner = bytes(20)  # not IP: opened and dropped, nothing for the TUN
            dgram = PYTHON.seal(PYTHON.aead(KEYS[0]), INDEXES[0], 0, [inner])[0]
            for f in tx_frames([Read(2, "udp", 30, 0, 1)], False, 9):  # the queued answer
                side.feed.send(f)
            sender.sendto(dgram, ("127.0.0.1", side.udp.port))
            r = side.paths.rx(8, rx_lanes(side), routes, NOW, None, Answer(1, False))
            answered = None if r.answered is None else tx_view(r.answered, side)
            views.append((r.writes, answered, drain(back), drain(side.feed), rx_lane.take()))
        assert views[0] == views[1]
        writes, answered, sent, tun, _ = views[0]
        if written:
            assert writes == 1
            assert answered is not None
            assert answered.lanes == [1]
            assert len(sent) == 1  # the answer, sealed by lane 1
            assert len(tun) == 1
        else:
            assert answered is None
            assert sent == []
