"""TUN offload arithmetic: agent._fastpath (C) against agent.proto.offload (Python), µs per call.

    .venv/bin/python bench/offload_bench.py             # every case, best of 5 repetitions
    .venv/bin/python bench/offload_bench.py --json

Cases (no I/O; the inputs are built once):
    segment 64K TSO      one 65535-byte TCPv4 super-packet, MSS 1448: 46 segments with checksums
    segment 64K USO      one 65535-byte UDPv4 super-packet, gso_size 1400: 47 datagrams
    complete csum 1400   one NEEDS_CSUM 1400-byte TCP packet (GSO_NONE): its checksum finished
    coalesce 44 TCP      44 in-order 1448-byte segments of one flow: one TCPV4 GSO write
    coalesce 64 UDP      64 equal 1000-byte datagrams of one flow: one UDP_L4 GSO write

Python: `segment(VirtioNetHdr.parse(hdr), pkt)` (numpy for large packets, as the data plane
calls it) and `coalesce(packets, udp=...)` (the (head, buffers) items the writev takes, not
joined); C: `_fastpath.segment(hdr, pkt)` and `_fastpath.coalesce(packets, udp)` (each item one
bytes object, joined). Figures move a few percent between runs on a shared VM.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.proto.offload import (  # the repository root, put on sys.path above
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    VirtioNetHdr,
    coalesce,
    segment,
)

SRC, DST = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])


def ipv4(proto: int, l4: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, SRC, DST)
    return ip + l4


def tcp(seq: int, payload: bytes) -> bytes:
    th = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, 0x10, 512, 0, 0)
    return ipv4(6, th + payload)


def udp(payload: bytes) -> bytes:
    return ipv4(17, struct.pack("!HHHH", 5353, 9999, 8 + len(payload), 0) + payload)


def cases() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    from agent import _fastpath

    body = bytes(range(256)) * 256
    tso = tcp(1, body[: 0xFFFF - 40])
    tso_hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, 1448, 20, 16).encode()
    uso = udp(body[: 0xFFFF - 28])
    uso_hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_UDP_L4, 28, 1400, 20, 6).encode()
    one = tcp(7, body[:1360])
    one_hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16).encode()
    segs = [tcp(1 + 1448 * i, body[:1448]) for i in range(44)]
    dgrams = [udp(body[:1000]) for _ in range(64)]
    fast = _fastpath

    def py_segment(hdr: bytes, pkt: bytes) -> Callable[[], object]:
        return lambda: segment(VirtioNetHdr.parse(hdr), pkt)

    def c_segment(hdr: bytes, pkt: bytes) -> Callable[[], object]:
        return lambda: fast.segment(hdr, pkt)

    assert len(fast.segment(tso_hdr, tso)) == 46
    assert len(fast.coalesce(segs, False)) == 1
    assert len(fast.coalesce(dgrams, True)) == 1
    return {
        "segment 64K TSO": (py_segment(tso_hdr, tso), c_segment(tso_hdr, tso)),
        "segment 64K USO": (py_segment(uso_hdr, uso), c_segment(uso_hdr, uso)),
        "complete csum 1400": (py_segment(one_hdr, one), c_segment(one_hdr, one)),
        "coalesce 44 TCP": (lambda: coalesce(segs), lambda: fast.coalesce(segs, False)),
        "coalesce 64 UDP": (
            lambda: coalesce(dgrams, udp=True),
            lambda: fast.coalesce(dgrams, True),
        ),
    }


def best(fn: Callable[[], object], reps: int) -> float:
    """Best µs per call over `reps` timed loops of about 0.2 s each."""
    t0 = time.perf_counter()
    inner = 1
    while time.perf_counter() - t0 < 0.05:
        fn()
        inner += 1
    inner *= 4
    out = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out = min(out, time.perf_counter() - t0)
    return out / inner * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions, the best is reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        table = cases()
    except ImportError:
        sys.stderr.write("agent._fastpath is not built: nothing to compare\n")
        return 1
    res = {
        name: {"python_us": best(py, args.reps), "native_us": best(c, args.reps)}
        for name, (py, c) in table.items()
    }
    if args.json:
        json.dump(
            {k: {m: round(v, 3) for m, v in d.items()} for k, d in res.items()},
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(f"{'case':<22}{'python µs':>12}{'C µs':>10}{'ratio':>9}\n")
    for name, d in res.items():
        py, c = d["python_us"], d["native_us"]
        sys.stdout.write(f"{name:<22}{py:12.2f}{c:10.2f}{py / c:8.1f}x\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
