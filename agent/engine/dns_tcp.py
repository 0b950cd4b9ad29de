"""DNS over TCP at 100.100.100.100 and fd7a:115c:a1e0::53, answered from the TUN (sans-I/O).

Resolvers fall back to TCP for truncated answers, and `dig +tcp` asks over TCP outright. The
service addresses are routed into our TUN and never assigned to an interface, so no kernel
socket can accept these connections: this module is the small TCP endpoint that does, the
way Tailscale answers 100.100.100.100 from its userspace network stack. The alternative,
adding the two addresses to the interface and serving kernel sockets, was weighed and set
aside: the addresses would become local ones of the machine (answering on other interfaces
under Linux's weak host model and reachable by peers through the tunnel), binding port 53
needs CAP_NET_BIND_SERVICE in the hardened unit and fails beside a resolver bound to the
wildcard address, and `ip route get 100.100.100.100` would no longer name our interface. Here
nothing changes for the system: UDP and TCP take the same route into the TUN, and the unit
needs no new capability.

    packet from the TUN (TCP to a service address; engine/tcp_segment.py parses it)
      │ bad checksum, fragment, malformed: dropped and counted
      ├─ no connection: SYN to port 53 ──► SYN-ACK (MSS; table full: RST); else RST
      ├─ RST: exactly at RCV.NXT closes; elsewhere in the window: a challenge ACK (RFC 5961)
      ├─ ACK: frees sent data, opens the peer's window; data in order ──► receive buffer
      │     out of order or beyond our window: not kept, a duplicate ACK says what we expect
      ├─ a whole message (2-byte length prefix, RFC 1035 §4.2.2) ──► Query (up to
      │     max_pipelined at once); a prefix above max_message resets the connection
      └─ FIN: acknowledged; our FIN follows the last answer
    answer(conn, wire) ──► data segments within the peer's window (at most its MSS each)
    on_timer(now) ──► retransmission from SND.UNA (go-back-N, the timeout doubling up to
      max_retries, then RST), a zero-window probe, RST for a connection idle too long

Simplifications, all safe for a peer on the same machine: no reassembly of out-of-order data
(the peer sends it again), no window scaling, SACK or timestamps (never offered), no TIME-WAIT
(the peer closes first in the common case; a late retransmission of its FIN is answered RST).
The window we offer is one segment (our MSS, capped by the peer's) or nothing: a peer never has
more than one segment in flight, so every segment comes alone (the kernel builds no TSO
super-packet for one segment), in order unless something was lost, and a full buffer closes
the window instead of dropping data. Bounded: `max_connections` connections, each with a
receive buffer of two messages and at most `max_pipelined` queries being answered; a SYN
beyond the table is refused.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from agent.proto.dns.names import SERVICE_V4, SERVICE_V6
from agent.proto.offload import Buffer

from .tcp_segment import (
    ACK,
    FIN,
    IPV4_HDR,
    IPV6_HDR,
    PROTO_TCP,
    PSH,
    RST,
    SYN,
    BadSegment,
    IPAddress,
    Segment,
    build_segment,
    header_size,
    parse_segment,
)

__all__ = [
    "DNS_PORT",
    "ConnId",
    "Output",
    "Query",
    "TcpLimits",
    "TcpResponder",
    "is_service_tcp",
]

DNS_PORT: Final = 53
DEFAULT_MSS: Final = 536  # a peer that sends no MSS option (RFC 9293 §3.7.1)
MIN_MSS: Final = 88  # a smaller MSS option is raised to this (Linux's TCP_MIN_MSS)
_M: Final = 0xFFFFFFFF
_SERVICE_V4: Final = SERVICE_V4.packed
_SERVICE_V6: Final = SERVICE_V6.packed

Key = tuple[IPAddress, int, IPAddress]  # client address, client port, service address
ConnId = tuple[Key, int]  # the key and the connection's serial: a reused 4-tuple is another


def is_service_tcp(packet: Buffer) -> bool:
    """Cheap test for the service's hook: IPv4 or IPv6 TCP to a service address, any port."""
    n = len(packet)
    if n >= IPV4_HDR and packet[0] >> 4 == 4:
        return packet[9] == PROTO_TCP and bytes(packet[16:20]) == _SERVICE_V4
    if n >= IPV6_HDR and packet[0] >> 4 == 6:
        return packet[6] == PROTO_TCP and bytes(packet[24:40]) == _SERVICE_V6
    return False


def _after(a: int, b: int) -> bool:
    """Sequence number `a` is later than `b` (modulo 2^32)."""
    return 0 < ((a - b) & _M) < 0x80000000


def _whole_message(buf: bytearray) -> bool:
    return len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big")


@dataclass(frozen=True, slots=True)
class TcpLimits:
    max_connections: int = 64  # open at once; a SYN beyond them is answered RST
    max_message: int = 4096  # a length prefix above this resets the connection
    max_pipelined: int = 4  # queries of one connection being answered at once
    send_limit: int = 65537  # unacknowledged answer bytes past which no new query is taken
    mtu: int = 1280  # the TUN's: our MSS option is this less the IP and TCP headers
    idle: float = 10.0  # seconds without a segment from the peer before RST (RFC 7766 ~10 s)
    rto: float = 0.25  # first retransmission timeout, doubled on every retry
    max_retries: int = 6  # retransmissions without progress before the connection is reset


@dataclass(frozen=True, slots=True)
class Query:
    """A whole DNS message from `conn`, prefix included (Responder's Transport.TCP input);
    give its answer to `TcpResponder.answer`."""

    conn: ConnId
    wire: bytes


@dataclass(slots=True)
class Output:
    """Packets to write to the TUN, in order, and queries to answer."""

    packets: list[bytes] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)


class _Conn:
    """One connection's state (RFC 9293 names: SND.UNA, SND.NXT, RCV.NXT, ...)."""

    __slots__ = (
        "ack_due",
        "closing",
        "deadline",
        "established",
        "fin_acked",
        "fin_queued",
        "fin_sent",
        "irs",
        "iss",
        "key",
        "last_heard",
        "mss",
        "peer_fin",
        "pending",
        "rbuf",
        "rcv_edge",
        "rcv_nxt",
        "retries",
        "rto",
        "sbuf",
        "serial",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "snd_wnd",
    )

    def __init__(self, key: Key, serial: int, iss: int, seg: Segment, mss: int, now: float):
        self.key = key
        self.serial = serial
        self.iss = iss
        self.irs = seg.seq
        self.established = False
        self.snd_una = iss  # our SYN is the first unacknowledged byte
        self.snd_nxt = (iss + 1) & _M
        self.snd_max = self.snd_nxt  # the highest sequence number sent so far
        self.snd_wnd = seg.window
        self.mss = mss
        self.rcv_nxt = (seg.seq + 1) & _M
        self.rcv_edge = self.rcv_nxt  # right edge of the window we offered
        self.rbuf = bytearray()
        self.sbuf = bytearray()  # from SND.UNA on, once established
        self.fin_queued = False  # our FIN goes after sbuf
        self.fin_sent = False
        self.fin_acked = False
        self.peer_fin = False
        self.ack_due = False  # the peer sent something that wants an acknowledgement
        self.closing = False  # no further query taken
        self.pending = 0  # queries handed out and not answered yet
        self.rto = 0.0
        self.retries = 0
        self.deadline: float | None = None  # retransmission or zero-window probe
        self.last_heard = now

    @property
    def id(self) -> ConnId:
        return (self.key, self.serial)


class TcpResponder:
    """The TCP connections to the DNS service of one node; owned by its task, not thread-safe."""

    def __init__(
        self,
        limits: TcpLimits | None = None,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.limits = limits or TcpLimits()
        self._randbytes = randbytes
        self._conns: dict[Key, _Conn] = {}
        self._serial = 0
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._conns)

    # -- input -----------------------------------------------------------------------------------

    def receive(self, packet: Buffer, now: float) -> Output:
        """One packet from the TUN (TCP to a service address): what to write, what to answer."""
        out = Output()
        try:
            seg = parse_segment(packet)
        except BadSegment as e:
            self.counters[f"drop_tcp_{e.drop}"] += 1
            return out
        if seg.dst not in (SERVICE_V4, SERVICE_V6):
            self.counters["drop_tcp_not_service"] += 1
            return out
        key = (seg.src, seg.sport, seg.dst)
        conn = self._conns.get(key)
        if conn is None or seg.dport != DNS_PORT:
            self._no_connection(seg, key, now, out)
        else:
            conn.last_heard = now
            self._segment(conn, seg, now, out)
        return out

    def _no_connection(self, seg: Segment, key: Key, now: float, out: Output) -> None:
        if seg.flags & RST:
            return
        if seg.flags & (SYN | ACK) == SYN and seg.dport == DNS_PORT:
            if len(self._conns) >= self.limits.max_connections:
                self.counters["drop_tcp_full"] += 1
            else:
                self._accept(seg, key, now, out)
                return
        else:
            self.counters["tcp_refused"] += 1
        out.packets.append(self._reset_for(seg))

    def _accept(self, seg: Segment, key: Key, now: float, out: Output) -> None:
        iss = int.from_bytes(self._randbytes(4), "big")
        self._serial += 1
        mss = min(max(seg.mss or DEFAULT_MSS, MIN_MSS), self._our_mss(seg.dst))
        conn = _Conn(key, self._serial, iss, seg, mss, now)
        self._conns[key] = conn
        self.counters["tcp_accepted"] += 1
        self._send_syn_ack(conn, now, out)

    def _segment(self, conn: _Conn, seg: Segment, now: float, out: Output) -> None:
        if seg.flags & RST:
            self._peer_reset(conn, seg, out)
            return
        if seg.flags & SYN:
            if not conn.established and seg.seq == conn.irs and not seg.flags & ACK:
                self._send_syn_ack(conn, now, out)  # our SYN-ACK was lost: the SYN again
            else:
                self._ack(conn, out)  # challenge ACK (RFC 5961 §4); a stale peer answers RST
            return
        if not seg.flags & ACK or not self._take_ack(conn, seg, now, out):
            return
        self._take_data(conn, seg)
        if conn.fin_acked and conn.peer_fin:
            self._remove(conn, "tcp_closed")
            if conn.ack_due:
                self._ack(conn, out)  # the peer's FIN, after ours was acknowledged
            return
        self._progress(conn, now, out)

    def _peer_reset(self, conn: _Conn, seg: Segment, out: Output) -> None:
        if seg.seq == conn.rcv_nxt:
            self._remove(conn, "tcp_reset_by_peer")
        elif _after(conn.rcv_edge, seg.seq) and _after(seg.seq, conn.rcv_nxt):
            self._ack(conn, out)  # in the window but not exact: challenge ACK (RFC 5961 §3)

    def _take_ack(self, conn: _Conn, seg: Segment, now: float, out: Output) -> bool:
        """Process SEG.ACK; False when the segment is to be dropped."""
        ack = seg.ack
        if not conn.established:
            if ack != (conn.iss + 1) & _M:
                out.packets.append(self._reset_for(seg))
                self.counters["tcp_refused"] += 1
                return False
            conn.established = True
            conn.snd_una = ack
            conn.snd_wnd = seg.window
            conn.deadline, conn.retries = None, 0
            return True
        if _after(ack, conn.snd_max):  # acknowledges what we never sent
            self._ack(conn, out)
            return False
        if _after(conn.snd_una, ack):  # an old duplicate: its window may be stale too
            return True
        acked = (ack - conn.snd_una) & _M
        conn.snd_wnd = seg.window
        if acked:
            data = min(acked, len(conn.sbuf))
            del conn.sbuf[:data]
            conn.snd_una = ack
            if _after(ack, conn.snd_nxt):  # sent before a retransmission went back
                conn.snd_nxt = ack
            if acked > data:  # the sequence number after the data: our FIN
                conn.fin_acked = conn.fin_sent = True
            conn.retries = 0
            conn.rto = self.limits.rto
            conn.deadline = None  # re-armed by _push while something is in flight
        return True

    def _take_data(self, conn: _Conn, seg: Segment) -> None:
        fin = bool(seg.flags & FIN)
        if not seg.payload and not fin:
            return
        conn.ack_due = True  # whatever it holds, the peer learns what we expect next
        if conn.peer_fin:
            return  # a retransmission after the peer's FIN
        if _after(seg.seq, conn.rcv_nxt):
            self.counters["drop_tcp_out_of_order"] += 1
            return
        have = (conn.rcv_nxt - seg.seq) & _M  # bytes of it we already have
        if have > len(seg.payload):
            return  # entirely old (a FIN at `have - 1` would be one we already took)
        data = seg.payload[have:]
        room = (conn.rcv_edge - conn.rcv_nxt) & _M
        if room >= 0x80000000:
            room = 0
        if len(data) > room:
            self.counters["drop_tcp_beyond_window"] += 1
            data, fin = data[:room], False
        conn.rbuf += data
        conn.rcv_nxt = (conn.rcv_nxt + len(data)) & _M
        if fin:
            conn.peer_fin = True
            conn.rcv_nxt = (conn.rcv_nxt + 1) & _M

    # -- answers ---------------------------------------------------------------------------------

    def answer(self, conn_id: ConnId, wire: bytes | None, now: float) -> Output:
        """The answer (length-prefixed) to a Query of `conn_id`; None: the query got none,
        the connection closes after the answers already queued."""
        out = Output()
        key, serial = conn_id
        conn = self._conns.get(key)
        if conn is None or conn.serial != serial:
            self.counters["drop_tcp_late_answer"] += 1
            return out
        conn.pending -= 1
        if wire is None:
            conn.closing = True
        else:
            conn.sbuf += wire
            self.counters["tcp_answers"] += 1
        self._progress(conn, now, out)
        return out

    def _progress(self, conn: _Conn, now: float, out: Output) -> None:
        """Take whole messages, decide to close, send what the window allows."""
        if not self._extract(conn, out):
            return
        if conn.fin_queued or conn.pending:
            pass
        elif conn.closing or (conn.peer_fin and not _whole_message(conn.rbuf)):
            conn.closing = conn.fin_queued = True  # a partial message left is never answered
        self._push(conn, now, out)

    def _extract(self, conn: _Conn, out: Output) -> bool:
        limits, rbuf = self.limits, conn.rbuf
        while (
            not conn.closing
            and conn.established
            and conn.pending < limits.max_pipelined
            and len(conn.sbuf) < limits.send_limit
            and len(rbuf) >= 2
        ):
            size = int.from_bytes(rbuf[:2], "big")
            if size > limits.max_message:
                self.counters["drop_tcp_oversized"] += 1
                out.packets.append(self._rst(conn))
                self._remove(conn, None)
                return False
            if len(rbuf) < 2 + size:
                break
            out.queries.append(Query(conn.id, bytes(rbuf[: 2 + size])))
            del rbuf[: 2 + size]
            conn.pending += 1
            self.counters["tcp_queries"] += 1
        return True

    # -- output ----------------------------------------------------------------------------------

    def _our_mss(self, service: IPAddress) -> int:
        return max(DEFAULT_MSS, self.limits.mtu - header_size(service.version))

    def _window(self, conn: _Conn) -> int:
        """The window to offer now: one segment when the buffer has room for it, else what
        is left of the last offer (a window never shrinks, RFC 9293 §3.8.6)."""
        capacity = 2 * (2 + self.limits.max_message)
        offered = (conn.rcv_edge - conn.rcv_nxt) & _M
        if offered >= 0x80000000:
            offered = 0
        if conn.peer_fin:
            return offered
        if capacity - len(conn.rbuf) >= conn.mss:
            return max(offered, conn.mss)
        return offered

    def _segment_out(
        self, conn: _Conn, seq: int, flags: int, payload: bytes = b"", mss: int | None = None
    ) -> bytes:
        src, sport, service = conn.key
        window = self._window(conn)
        conn.rcv_edge = (conn.rcv_nxt + window) & _M
        conn.ack_due = False
        return build_segment(
            service, DNS_PORT, src, sport,
            seq=seq, ack=conn.rcv_nxt, flags=flags, window=window, payload=payload, mss=mss,
        )  # fmt: skip

    def _ack(self, conn: _Conn, out: Output) -> None:
        if conn.established:
            out.packets.append(self._segment_out(conn, conn.snd_nxt, ACK))

    def _send_syn_ack(self, conn: _Conn, now: float, out: Output) -> None:
        mss = self._our_mss(conn.key[2])
        out.packets.append(self._segment_out(conn, conn.iss, SYN | ACK, mss=mss))
        if conn.deadline is None:
            conn.rto = self.limits.rto
            conn.deadline = now + conn.rto

    def _push(self, conn: _Conn, now: float, out: Output) -> None:
        """Send new data (then the FIN) from SND.NXT as far as the peer's window allows; a
        bare ACK when the peer is owed one or our window opened, and nothing was sent."""
        if not conn.established:
            return
        offered = (conn.rcv_edge - conn.rcv_nxt) & _M
        if offered >= 0x80000000:
            offered = 0
        sent = False
        end = (conn.snd_una + min(conn.snd_wnd, len(conn.sbuf))) & _M
        while _after(end, conn.snd_nxt):
            offset = (conn.snd_nxt - conn.snd_una) & _M
            size = min(conn.mss, (end - conn.snd_nxt) & _M)
            payload = bytes(conn.sbuf[offset : offset + size])
            out.packets.append(self._segment_out(conn, conn.snd_nxt, ACK | PSH, payload))
            conn.snd_nxt = (conn.snd_nxt + size) & _M
            sent = True
        everything = (conn.snd_una + len(conn.sbuf)) & _M
        if conn.fin_queued and not conn.fin_sent and conn.snd_nxt == everything:
            out.packets.append(self._segment_out(conn, conn.snd_nxt, FIN | ACK))
            conn.snd_nxt = (conn.snd_nxt + 1) & _M
            conn.fin_sent = sent = True
        if _after(conn.snd_nxt, conn.snd_max):
            conn.snd_max = conn.snd_nxt
        if (conn.snd_nxt != conn.snd_una or conn.sbuf) and conn.deadline is None:
            conn.rto = conn.rto or self.limits.rto  # in flight, or held back by a zero window
            conn.deadline = now + conn.rto
        if not sent and (conn.ack_due or (offered < conn.mss and self._window(conn) > offered)):
            self._ack(conn, out)

    def _rst(self, conn: _Conn) -> bytes:
        src, sport, service = conn.key
        return build_segment(
            service, DNS_PORT, src, sport,
            seq=conn.snd_nxt, ack=conn.rcv_nxt, flags=RST | ACK, window=0,
        )  # fmt: skip

    def _reset_for(self, seg: Segment) -> bytes:
        """RST for a segment no connection takes (RFC 9293 §3.10.7.1)."""
        if seg.flags & ACK:
            seq, ack, flags = seg.ack, 0, RST
        else:
            seq, ack, flags = 0, (seg.seq + seg.length) & _M, RST | ACK
        return build_segment(
            seg.dst, seg.dport, seg.src, seg.sport, seq=seq, ack=ack, flags=flags, window=0
        )

    def _remove(self, conn: _Conn, counter: str | None) -> None:
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        if counter:
            self.counters[counter] += 1

    # -- time ------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `on_timer` next has work: a retransmission, a probe or an idle connection."""
        best: float | None = None
        idle = self.limits.idle
        for conn in self._conns.values():
            for t in (conn.deadline, conn.last_heard + idle):
                if t is not None and (best is None or t < best):
                    best = t
        return best

    def on_timer(self, now: float) -> list[bytes]:
        """Retransmit, probe, or reset what is due at `now`."""
        out = Output()
        for conn in list(self._conns.values()):
            if now >= conn.last_heard + self.limits.idle:
                out.packets.append(self._rst(conn))
                self._remove(conn, "tcp_idle_closed")
            elif conn.deadline is not None and now >= conn.deadline:
                self._retransmit(conn, now, out)
        return out.packets

    def _retransmit(self, conn: _Conn, now: float, out: Output) -> None:
        if conn.retries >= self.limits.max_retries:
            out.packets.append(self._rst(conn))
            self._remove(conn, "drop_tcp_retries")
            return
        conn.retries += 1
        conn.rto *= 2
        conn.deadline = now + conn.rto
        self.counters["tcp_retransmits"] += 1
        if not conn.established:
            mss = self._our_mss(conn.key[2])
            out.packets.append(self._segment_out(conn, conn.iss, SYN | ACK, mss=mss))
        elif conn.snd_nxt == conn.snd_una and conn.sbuf and conn.snd_wnd == 0:
            # Zero-window probe: an old sequence number makes the peer answer with its window.
            out.packets.append(self._segment_out(conn, (conn.snd_una - 1) & _M, ACK))
        else:
            conn.snd_nxt = conn.snd_una  # go back: everything unacknowledged again
            conn.fin_sent = False
            self._push(conn, now, out)

    def close(self) -> list[bytes]:
        """RST for every connection (the service stops)."""
        packets = [self._rst(conn) for conn in self._conns.values()]
        self._conns.clear()
        return packets
