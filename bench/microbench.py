"""Per-packet CPU of the data plane's Python work, without the kernel: µs per packet.

    .venv/bin/python bench/microbench.py            # every case, best of 5 repetitions
    .venv/bin/python bench/microbench.py --json

Cases (two real Devices with a completed handshake; no sockets, no TUN):
    seal 1 / seal 64          Keypair.seal of one 92-byte IP packet / a batch of 64
    replay in-order           ReplayWindow.accept of increasing counters
    rx 1 / rx 64              Device.receive_batch of one transport datagram / a run of 64
    dp tx 1 / dp tx 64        DataPlane.on_tun_readable: route, encrypt, hand to the sender
    dp rx 1 / dp rx 64        DataPlane.on_udp_readable: decrypt, checks, coalesce, TUN write
    syscall EAGAIN read       os.read on an empty non-blocking pipe (the drain's last read)
    cold: ...                 one call after sleeping `--cold-gap` (50 ms), median of 20: what
                              a ping pays when the CPU's caches went cold while we waited;
                              "cold: AEAD seal 1" is cryptography's encrypt alone, the floor

Native against Python (when agent._fastpath loads): the two transport twins, the Python one
(agent/proto/wireguard/transport.py: cryptography's ChaCha20Poly1305, replay.ReplayWindow) and
the native one (agent.node.fastpath.native_transport: _fastpath.Aead, .ReplayWindow, .seal,
.open_run), with the same keys:
    seal 1 / seal 64          Keypair.seal over each (byte-identical datagrams, checked first)
    open 1 / open 64          open_run of each: authenticate, replay window, IP header (the
                              same OpenedRun, checked first)
    AEAD encrypt / decrypt    one call of each AEAD on a 96-byte packet
    cold: ...                 the same, one packet after `--cold-gap` of sleep, median of 20
The ratio column is Python / native: how many times faster the native call is.

The "1" cases are the lone-packet (ping) path, the "64" cases the batched (flood) path,
reported per packet. Figures move a few percent between runs on a shared VM: compare the
same case before and after a change, run on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.keys import NodePrivate
from agent.node.dataplane import DataPlane  # the repository root, put on sys.path above
from agent.node.fastpath import native_transport
from agent.proto.offload import NO_OFFLOAD
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.replay import ReplayWindow
from agent.proto.wireguard.session import Keypair
from agent.proto.wireguard.transport import PYTHON, Transport

fastpath: Any
try:
    fastpath = importlib.import_module("agent._fastpath")
except ImportError:  # not built here: the native cases are left out
    fastpath = None

A_IP = bytes([100, 64, 0, 1])
B_IP = bytes([100, 64, 0, 2])
EP_A = ("198.18.0.1", 41641)
EP_B = ("198.18.0.2", 41641)


def ipv4_udp(src: bytes, dst: bytes, payload: bytes) -> bytes:
    total = 28 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 17, 0, src, dst)
    return ip + struct.pack("!HHHH", 5201, 40000, 8 + len(payload), 0) + payload


class _Tun:
    """A TUN stand-in: reads come from `frames`, writes are counted."""

    def __init__(self, vnet: bool) -> None:
        self.vnet_hdr = vnet
        self.offload = "tso+uso" if vnet else "none"
        self.frames: list[tuple[Any, memoryview]] = []
        self.writes = 0

    def fileno(self) -> int:
        return -1

    def read_frames(self, max_packets: int) -> tuple[list[tuple[Any, memoryview]], None]:
        return self.frames, None

    def write_packets(self, packets: list[Any]) -> int:
        self.writes += len(packets)
        return 0

    def write_coalesced(self, items: list[Any]) -> int:
        self.writes += len(items)
        return 0


class _Udp:
    def __init__(self) -> None:
        self.out: list[Any] = []
        self.inbox: list[tuple[list[Any], tuple[str, int]]] = []

    def fileno(self) -> int:
        return -1

    def send_batch(self, datagrams: Any, addr: tuple[str, int]) -> int:
        self.out = list(datagrams)
        return 0

    def recv_batch(self, max_datagrams: int) -> list[tuple[list[Any], tuple[str, int]]]:
        return self.inbox


def _pair() -> tuple[Device, Device]:
    a = Device(NodePrivate.generate())
    b = Device(NodePrivate.generate())
    pa = a.add_peer(b.public_key, endpoint=EP_B, allowed_ips=[ip_network("100.64.0.2/32")])
    b.add_peer(a.public_key, endpoint=EP_A, allowed_ips=[ip_network("100.64.0.1/32")])
    now = 1.0
    (init,) = pa.encrypt([b""], now)
    res = b.receive(init, EP_A, now)
    (resp, _) = res.replies[0]
    res = a.receive(resp, EP_B, now)
    for d, _ep in res.replies:  # the keepalive confirms the session on b's side
        b.receive(d, EP_A, now)
    return a, b


def _rx(dev: Device, vnet: bool, datagrams: list[bytes], per_call: int) -> Callable[[], None]:
    """One on_udp_readable of `per_call` datagrams from `datagrams` per call."""
    tun, udp = _Tun(vnet), _Udp()
    dp = DataPlane(tun, udp, dev, lambda: 1.0, lambda: None)  # type: ignore[arg-type]
    it = iter(range(0, len(datagrams), per_call))

    def call() -> None:
        i = next(it)
        udp.inbox = [(datagrams[i : i + per_call], EP_A)]
        dp.on_udp_readable()

    return call


def _time(fn: Callable[[], object], per_call: int, reps: int, inner: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / inner / per_call * 1e6


def _cold(fn: Callable[[], object], gap: float, count: int = 20) -> float:
    """Median µs of one call made after `gap` seconds of sleep."""
    times = []
    for _ in range(count):
        time.sleep(gap)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def run(reps: int, cold_gap: float = 0.05) -> dict[str, float]:
    a, b = _pair()
    pa = a.peers[b.public_key]
    kp = pa.keypairs.current
    assert kp is not None
    pkt = ipv4_udp(A_IP, B_IP, bytes(64))
    out: dict[str, float] = {}

    out["seal 1"] = _time(lambda: kp.seal((pkt,)), 1, reps, 20000)
    batch = [pkt] * 64
    out["seal 64"] = _time(lambda: kp.seal(batch), 64, reps, 400)

    win = ReplayWindow()
    ctr = iter(range(10**9))
    out["replay in-order"] = _time(lambda: win.accept(next(ctr)), 1, reps, 100000)

    # Receive: fresh ciphertext each call would need re-encryption; instead a new keypair
    # window per measurement is avoided by encrypting far ahead once.
    n1 = 20000 * reps
    singles = iter(kp.seal([pkt] * n1))
    out["rx 1"] = _time(lambda: b.receive_batch((next(singles),), EP_A, 1.0), 1, reps, 20000)
    n64 = 400 * reps
    runs = iter([kp.seal(batch) for _ in range(n64)])
    out["rx 64"] = _time(lambda: b.receive_batch(next(runs), EP_A, 1.0), 64, reps, 400)

    for vnet in (False, True):
        tag = " vnet" if vnet else ""
        tun, udp = _Tun(vnet), _Udp()
        dp_a = DataPlane(tun, udp, a, lambda: 1.0, lambda: None)  # type: ignore[arg-type]
        tun.frames = [(NO_OFFLOAD, memoryview(pkt))]
        out[f"dp tx 1{tag}"] = _time(dp_a.on_tun_readable, 1, reps, 20000)
        tun.frames = [(NO_OFFLOAD, memoryview(pkt))] * 64
        out[f"dp tx 64{tag}"] = _time(dp_a.on_tun_readable, 64, reps, 400)
        out[f"dp rx 1{tag}"] = _time(_rx(b, vnet, kp.seal([pkt] * n1), 1), 1, reps, 20000)
        flat = [d for _ in range(n64) for d in kp.seal(batch)]
        out[f"dp rx 64{tag}"] = _time(_rx(b, vnet, flat, 64), 64, reps, 400)

    aead_seal = ChaCha20Poly1305(os.urandom(32)).encrypt  # the AEAD alone, as Keypair uses it
    padded = pkt + bytes(-len(pkt) & 15)
    nonce = bytes(12)
    out["cold: AEAD seal 1"] = _cold(lambda: aead_seal(nonce, padded, None), cold_gap)
    tun, udp = _Tun(True), _Udp()
    dp_a = DataPlane(tun, udp, a, lambda: 1.0, lambda: None)  # type: ignore[arg-type]
    tun.frames = [(NO_OFFLOAD, memoryview(pkt))]
    out["cold: dp tx 1 vnet"] = _cold(dp_a.on_tun_readable, cold_gap)
    out["cold: dp rx 1 vnet"] = _cold(_rx(b, True, kp.seal([pkt] * 20), 1), cold_gap)

    r, w = os.pipe()
    os.set_blocking(r, False)

    def eagain() -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(r, 2048)

    out["syscall EAGAIN read"] = _time(eagain, 1, reps, 50000)
    os.close(r)
    os.close(w)
    return out


def run_native(reps: int, cold_gap: float = 0.05) -> dict[str, tuple[float, float]]:
    """(Python µs, native µs) per packet for each case; empty if agent._fastpath is missing."""
    if fastpath is None:
        return {}
    py, nat = PYTHON, native_transport(fastpath)
    send_key, recv_key = os.urandom(32), os.urandom(32)
    index = 0x01020304

    def keypair(t: Transport) -> Keypair:
        return Keypair(send_key, recv_key, 1, index, is_initiator=True, created=0.0, transport=t)

    tx_py, tx_nat = keypair(py), keypair(nat)
    pkt = ipv4_udp(A_IP, B_IP, bytes(64))
    batch = [pkt] * 64
    if tx_py.seal(batch) != tx_nat.seal(batch):
        raise SystemExit("the native seal differs from the Python one: not comparable")
    out: dict[str, tuple[float, float]] = {}
    out["seal 1"] = (
        _time(lambda: tx_py.seal((pkt,)), 1, reps, 20000),
        _time(lambda: tx_nat.seal((pkt,)), 1, reps, 20000),
    )
    out["seal 64"] = (
        _time(lambda: tx_py.seal(batch), 64, reps, 400),
        _time(lambda: tx_nat.seal(batch), 64, reps, 400),
    )

    # Receive: each twin with its own AEAD and replay window, fed distinct datagrams (no call
    # meets a replayed counter); the receiver's key is the sender's send key.
    def opener(t: Transport) -> Callable[[list[bytes]], object]:
        aead, window = t.aead(send_key), t.replay()
        return lambda datagrams: t.open_run(aead, window, datagrams, 0, index)

    check = tx_py.seal(batch)
    if opener(py)(check) != opener(nat)(check):
        raise SystemExit("the native open_run differs from the Python one: not comparable")

    def feeder(
        per_call: int, calls: int, fn: Callable[[list[bytes]], object]
    ) -> Callable[[], None]:
        """Each call hands `fn` the next `per_call` of `calls` runs of fresh datagrams."""
        flat = tx_py.seal([pkt] * (per_call * calls))
        starts = iter(range(0, len(flat), per_call))

        def call() -> None:
            i = next(starts)
            fn(flat[i : i + per_call])

        return call

    n1, n64 = 20000 * reps, 400 * reps
    out["open 1"] = (
        _time(feeder(1, n1, opener(py)), 1, reps, 20000),
        _time(feeder(1, n1, opener(nat)), 1, reps, 20000),
    )
    out["open 64"] = (
        _time(feeder(64, n64, opener(py)), 64, reps, 400),
        _time(feeder(64, n64, opener(nat)), 64, reps, 400),
    )

    padded = pkt + bytes(-len(pkt) & 15)
    nonce = bytes(12)
    aead_py, aead_nat = py.aead(send_key), nat.aead(send_key)
    sealed = aead_py.encrypt(nonce, padded, None)
    out["AEAD encrypt"] = (
        _time(lambda: aead_py.encrypt(nonce, padded, None), 1, reps, 20000),
        _time(lambda: aead_nat.encrypt(nonce, padded, None), 1, reps, 20000),
    )
    out["AEAD decrypt"] = (
        _time(lambda: aead_py.decrypt(nonce, sealed, None), 1, reps, 20000),
        _time(lambda: aead_nat.decrypt(nonce, sealed, None), 1, reps, 20000),
    )

    out["cold: seal 1"] = (
        _cold(lambda: tx_py.seal((pkt,)), cold_gap),
        _cold(lambda: tx_nat.seal((pkt,)), cold_gap),
    )
    out["cold: open 1"] = (
        _cold(feeder(1, 25, opener(py)), cold_gap),
        _cold(feeder(1, 25, opener(nat)), cold_gap),
    )
    out["cold: AEAD encrypt"] = (
        _cold(lambda: aead_py.encrypt(nonce, padded, None), cold_gap),
        _cold(lambda: aead_nat.encrypt(nonce, padded, None), cold_gap),
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions, the best is reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cold-gap", type=float, default=0.05, help="sleep before a cold call (s)")
    args = ap.parse_args()
    res = run(args.reps, args.cold_gap)
    pairs = run_native(args.reps, args.cold_gap)
    if args.json:
        doc: dict[str, Any] = {k: round(v, 3) for k, v in res.items()}
        doc["native"] = {
            k: {"python": round(py, 3), "native": round(c, 3), "ratio": round(py / c, 2)}
            for k, (py, c) in pairs.items()
        }
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for name, us in res.items():
        sys.stdout.write(f"{name:<24} {us:8.3f} µs/packet\n")
    if fastpath is None:
        sys.stdout.write("\nagent._fastpath is not built here: no native cases\n")
        return 0
    sys.stdout.write(
        f"\n{'native vs Python':<24} {'python':>8} {'native':>8}  µs/packet  py/native\n"
    )
    for name, (py, c) in pairs.items():
        sys.stdout.write(f"{name:<24} {py:8.3f} {c:8.3f}             {py / c:6.2f}x\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
