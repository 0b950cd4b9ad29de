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

The "1" cases are the lone-packet (ping) path, the "64" cases the batched (flood) path,
reported per packet. Figures move a few percent between runs on a shared VM: compare the
same case before and after a change, run on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
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
from agent.proto.offload import NO_OFFLOAD
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.replay import ReplayWindow

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

    def read_batch(self, max_packets: int) -> list[tuple[Any, memoryview]]:
        return self.frames

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions, the best is reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cold-gap", type=float, default=0.05, help="sleep before a cold call (s)")
    args = ap.parse_args()
    res = run(args.reps, args.cold_gap)
    if args.json:
        json.dump({k: round(v, 3) for k, v in res.items()}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for name, us in res.items():
            sys.stdout.write(f"{name:<24} {us:8.3f} µs/packet\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
