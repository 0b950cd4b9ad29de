"""Throughput and latency through our agent pair and a wireguard-go pair, measured in the same run.

    ns agt-<hex>-a                                    ns agt-<hex>-b
    tunnel 100.64.0.1 (MTU 1420)  <-- WireGuard -->   tunnel 100.64.0.2 (MTU 1420)
    veth0  198.18.0.1/24 --------------------------- veth0  198.18.0.2/24
    iperf3 client / ping                              iperf3 server

Per implementation: iperf3 TCP, iperf3 UDP with 1392-byte and 64-byte payloads (received packets/s
at an unlimited offered rate, then a few lower offered rates to find the highest with < 1 % loss),
and the average and median of 20 pings. The two implementations run one after the other on the
same namespaces, never at the same time; with `--rounds N` they alternate N times and each figure
is the median over the rounds (a shared machine's load then hits both alike).

The UDP receiver (iperf3's server) gets a 1 MB socket buffer (`--udp-rcvbuf`, iperf3 -w) so the
loss measured is the tunnel's, not the measuring socket's: with the kernel's default 208 KB a
burst of ~250 small datagrams overflows it whenever the server is off the CPU for a moment, and
batched delivery (ours: up to 64 datagrams per TUN write) makes such bursts. `--udp-rcvbuf 0`
keeps iperf3's default. net.core.rmem_max caps the size; a warning says so.

Usage (root): python bench/throughput.py [--seconds 10] [--rounds 1] [--json]
                                         [--impl agent --impl wireguard-go] [--udp-rcvbuf 1M]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.lab import (  # the repository root, put on sys.path above
    Agent,
    Lab,
    LabError,
    Peer,
    WgGo,
    iperf3,
    keypair,
)

MTU = 1420
A4, B4 = "100.64.0.1", "100.64.0.2"
PORT = 41641
IMPLS = ("agent", "wireguard-go")
UDP_SIZES = (1392, 64)
LOSS_LIMIT = 1.0  # percent

# name, unit, how to read it, better when higher
METRICS: list[tuple[str, str, str, bool]] = [
    ("tcp_gbps", "Gbit/s", "iperf3 TCP, received", True),
    ("udp1392_pps", "pps", "UDP 1392 B received, unlimited offer", True),
    ("udp1392_loss_pct", "%", "UDP 1392 B loss at that offer", False),
    ("udp1392_max_pps_lt1pct", "pps", "UDP 1392 B highest offer with <1% loss", True),
    ("udp64_pps", "pps", "UDP 64 B received, unlimited offer", True),
    ("udp64_loss_pct", "%", "UDP 64 B loss at that offer", False),
    ("udp64_max_pps_lt1pct", "pps", "UDP 64 B highest offer with <1% loss", True),
    ("ping_avg_ms", "ms", "ping RTT, average of 20", False),
    ("ping_median_ms", "ms", "ping RTT, median of 20", False),
]
PING_COUNT = 20
_PING_TIME = re.compile(r"time=([\d.]+) ms")


@contextmanager
def tunnel(lab: Lab, ns_a: str, ns_b: str, ips: tuple[str, str], impl: str) -> Iterator[None]:
    """A tunnel pair of `impl` between the namespaces, stopped when the block ends."""
    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    peer_of_a = Peer("b", pub_b, (f"{B4}/32",), endpoint=f"{ips[1]}:{PORT}")
    peer_of_b = Peer("a", pub_a, (f"{A4}/32",), endpoint=f"{ips[0]}:{PORT}")
    if impl == "agent":
        a = Agent(
            lab,
            ns_a,
            private_key=priv_a,
            addresses=[f"{A4}/32"],
            listen_port=PORT,
            peers=[peer_of_a],
            mtu=MTU,
        )
        b = Agent(
            lab,
            ns_b,
            private_key=priv_b,
            addresses=[f"{B4}/32"],
            listen_port=PORT,
            peers=[peer_of_b],
            mtu=MTU,
        )
        a.start()
        b.start()
        try:
            yield
        finally:
            for agent in (a, b):
                try:
                    agent.stop()
                except AssertionError as e:
                    sys.stderr.write(f"warning: {e}\n")
    else:
        wa = WgGo(lab, ns_a, private_key=priv_a, addresses=[f"{A4}/32"], listen_port=PORT)
        wb = WgGo(lab, ns_b, private_key=priv_b, addresses=[f"{B4}/32"], listen_port=PORT)
        wa.add_peer(peer_of_a)
        wb.add_peer(peer_of_b)
        wa.start()
        wb.start()
        for w in (wa, wb):
            lab.run(None, "ip", "-n", w.ns, "link", "set", w.ifname, "mtu", str(MTU))
        try:
            yield
        finally:
            wa.stop()
            wb.stop()


def udp_run(
    ns_a: str, ns_b: str, size: int, seconds: float, pps: float | None, rcvbuf: str | None
) -> dict[str, float]:
    """One iperf3 UDP run offering `pps` packets/s (None: as fast as iperf3 can send)."""
    bitrate = "0" if pps is None else f"{pps * size * 8:.0f}"
    r = iperf3(ns_b, ns_a, B4, seconds, udp=True, length=size, bitrate=bitrate, window=rcvbuf)
    rx = r["end"]["sum_received"]
    span = max(float(rx["seconds"]), 1e-9)
    return {
        "sent_pps": rx["packets"] / span,
        "pps": (rx["packets"] - rx["lost_packets"]) / span,
        "loss": float(rx["lost_percent"]),
    }


def measure(
    ns_a: str, ns_b: str, seconds: float, steps: int, rcvbuf: str | None, log: Any
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    log(f"  TCP {seconds:g} s")
    tcp = iperf3(ns_b, ns_a, B4, seconds)
    out["tcp_gbps"] = tcp["end"]["sum_received"]["bits_per_second"] / 1e9
    for size in UDP_SIZES:
        log(f"  UDP {size} B, unlimited offer")
        flood = udp_run(ns_a, ns_b, size, seconds, None, rcvbuf)
        out[f"udp{size}_pps"] = flood["pps"]
        out[f"udp{size}_loss_pct"] = flood["loss"]
        # Bisect the offered rate: `good` is the best offer seen with < 1 % loss, `bad` the
        # lowest with more. Start at what the flood delivered (an overloaded receiver often
        # delivers less than it could at a lower offer, so both directions are possible).
        good: tuple[float, float] | None = None  # (offer, received pps)
        bad = flood["sent_pps"]
        if flood["loss"] < LOSS_LIMIT:
            good = (flood["sent_pps"], flood["pps"])
        offer = flood["pps"]
        for _ in range(steps if good is None else 0):
            log(f"  UDP {size} B, offer {offer:,.0f} pps")
            run = udp_run(ns_a, ns_b, size, seconds, offer, rcvbuf)
            if run["loss"] < LOSS_LIMIT:
                if good is None or run["pps"] > good[1]:
                    good = (offer, run["pps"])
            else:
                bad = min(bad, offer)
            low = good[0] if good is not None else 0.0
            offer = (low + bad) / 2 if good is not None else offer / 2
        out[f"udp{size}_max_pps_lt1pct"] = good[1] if good is not None else None
    log(f"  ping x{PING_COUNT}")
    rtts = ping_times(ns_a, B4, PING_COUNT)
    out["ping_avg_ms"] = statistics.mean(rtts) if rtts else None
    out["ping_median_ms"] = statistics.median(rtts) if rtts else None
    return out


def ping_times(ns: str, addr: str, count: int, interval: float = 0.05) -> list[float]:
    """Each reply's RTT in ms (lost pings are left out)."""
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", addr]
    res = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=count * (interval + 2) + 5,
        check=False,
    )
    return [float(t) for t in _PING_TIME.findall(res.stdout)]


def size_bytes(text: str) -> int:
    """iperf3's size syntax: 1M = 1048576, 512K, or plain bytes (argparse type: a bad size is
    a usage error, not a traceback)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1M, 512K or 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def median_of_rounds(rounds: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Per metric, the median over the rounds that measured it."""
    out: dict[str, float | None] = {}
    for key, *_ in METRICS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(v for v in values if v is not None) if values else None
    return out


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "pps":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.3f}"
    return f"{value:.2f}"


def table(results: dict[str, dict[str, float | None]]) -> str:
    impls = list(results)
    head = f"{'metric':<48}" + "".join(f"{i:>16}" for i in impls)
    both = "agent" in results and "wireguard-go" in results
    if both:
        head += f"{'ours/wg-go':>12}"
    lines = [head, "-" * len(head)]
    for key, unit, label, _higher in METRICS:
        row = f"{label + ' (' + unit + ')':<48}"
        row += "".join(f"{fmt(results[i].get(key), unit):>16}" for i in impls)
        if both:
            ours, theirs = results["agent"].get(key), results["wireguard-go"].get(key)
            ratio = f"{ours / theirs:.2f}x" if ours is not None and theirs else "-"
            row += f"{ratio:>12}"
        lines.append(row)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each iperf3 run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--impl", action="append", choices=IMPLS, help="only these (repeatable)")
    ap.add_argument("--udp-steps", type=int, default=5, help="offers tried per UDP size")
    ap.add_argument(
        "--udp-rcvbuf",
        type=size_bytes,
        default="1M",
        help="UDP receiver socket buffer (iperf3 -w; 0 = iperf3's default)",
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate the implementations N times (median)"
    )
    args = ap.parse_args()
    rcvbuf = str(args.udp_rcvbuf) if args.udp_rcvbuf else None  # bytes, as iperf3 -w takes them
    if os.geteuid() != 0:
        sys.stderr.write("needs root (network namespaces)\n")
        return 1
    impls = args.impl or list(IMPLS)
    need = ["iperf3", "ping", "ip"] + (["wireguard-go", "wg"] if "wireguard-go" in impls else [])
    missing = [t for t in need if shutil.which(t) is None]
    if missing:
        sys.stderr.write(f"missing {' '.join(missing)}: run packaging/setup.sh\n")
        return 1

    def log(msg: str) -> None:
        sys.stderr.write(msg + "\n")

    if rcvbuf is not None:
        limit = int(Path("/proc/sys/net/core/rmem_max").read_text())
        if limit < args.udp_rcvbuf:
            log(f"warning: net.core.rmem_max is {limit}: the {rcvbuf} B receive buffer is capped")

    runs: dict[str, list[dict[str, float | None]]] = {impl: [] for impl in impls}
    failed: set[str] = set()
    started = time.monotonic()
    with Lab() as lab:
        ns_a, ns_b = lab.add_ns("a"), lab.add_ns("b")
        ips = lab.link(ns_a, ns_b)
        for n in range(max(1, args.rounds)):
            for impl in impls:
                log(f"{impl}:" if args.rounds <= 1 else f"{impl} (round {n + 1}/{args.rounds}):")
                try:
                    with tunnel(lab, ns_a, ns_b, ips, impl):
                        runs[impl].append(
                            measure(ns_a, ns_b, args.seconds, args.udp_steps, rcvbuf, log)
                        )
                except LabError as e:
                    log(f"  {impl} failed: {e}")
                    failed.add(impl)
    log(f"done in {time.monotonic() - started:.0f} s")
    results = {impl: {} if impl in failed else median_of_rounds(runs[impl]) for impl in impls}
    if args.json:
        doc = {"seconds": args.seconds, "mtu": MTU, "udp_rcvbuf": rcvbuf, "results": results}
        if args.rounds > 1:
            doc["rounds"] = runs
        print(json.dumps(doc, indent=2))
    else:
        print(table(results))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
