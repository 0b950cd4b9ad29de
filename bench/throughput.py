"""Throughput, latency and CPU per packet through our agent (native and Python data planes) and
a wireguard-go pair, measured in the same run, with a plain veth baseline.

    ns agt-<hex>-a                                    ns agt-<hex>-b
    tunnel 100.64.0.1 (MTU 1420)  <-- WireGuard -->   tunnel 100.64.0.2 (MTU 1420)
    veth0  198.18.0.1/24 --------------------------- veth0  198.18.0.2/24
    iperf3 client / ping                              iperf3 server

Implementations (`--impl`, repeatable; all four by default), one at a time on the same
namespaces, never two at once:

    agent          our daemon with `[interface] dataplane = "native"` (the compiled module)
    agent-python   our daemon with `dataplane = "python"` (the pure-Python reference)
    wireguard-go   Debian's wireguard-go, the anchor every ratio is taken against
    veth           no tunnel: iperf3 TCP and ping straight over the veth pair, the machine's
                   own speed in this run (compare it across days, not the tunnels' figures)
    agent-tree     with --agent-tree DIR only: our daemon run from another source tree (say
                   `git worktree add --detach /tmp/old COMMIT`) with that tree's defaults, to
                   tell a change in the code from a change in the machine

Measurements (`--tests`, comma-separated; all by default):

    tcp    iperf3 TCP for --seconds, the receiver's rate
    udp    iperf3 UDP with 1392-byte and 64-byte payloads: received packets/s at an unlimited
           offer, then up to --udp-steps lower offers bisecting for the highest with < 1 % loss
    ping   RTT median per interval of --ping-intervals (20 pings each, 5 at intervals >= 0.5 s)
    cpu    64-byte UDP offered at a fixed --cpu-pps for --seconds: each daemon's user+system CPU
           time (/proc/PID/stat, every thread) divided by the packets it handled (sender: sent
           by iperf3, receiver: arrived), in us per packet; then each daemon's VmRSS

`--policy` adds one more TCP run per agent variant with an access policy active on both nodes
(`[interface] policy_file`), next to the TCP run without one: the packet filter's cost.

With `--rounds N` (3) the implementations alternate N times and every figure is the median over
the rounds, so a burst of foreign load hits all of them alike. Ratios are printed against
wireguard-go and native against Python. Before each round the machine is sampled for 1 s while
nothing of ours runs (others' CPU use, steal time), and two fixed workloads are timed, SHA-256
of 8 MiB (compiled code) and a million additions in a Python loop (the interpreter): the speed
of one core right now. They are printed with nproc and /proc/cpuinfo's MHz.

The UDP receiver (iperf3's server) gets a 1 MB socket buffer (`--udp-rcvbuf`, iperf3 -w) so the
loss measured is the tunnel's, not the measuring socket's. `--udp-rcvbuf 0` keeps iperf3's
default. net.core.rmem_max caps the size; a warning says so.

Usage (root): python bench/throughput.py [--seconds 5] [--rounds 3] [--json]
              [--impl agent --impl agent-python --impl wireguard-go --impl veth]
              [--agent-tree DIR]
              [--tests tcp,udp,ping,cpu] [--policy] [--ping-intervals 0.01,0.05,1]
              [--cpu-pps 50000] [--udp-rcvbuf 1M]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
IMPLS = ("agent", "agent-python", "agent-tree", "wireguard-go", "veth")
AGENTS = ("agent", "agent-python", "agent-tree")
DEFAULT_IMPLS = ("agent", "agent-python", "wireguard-go", "veth")
# our implementations -> their [interface] dataplane (agent-tree: another checkout, its default)
DATAPLANE = {"agent": "native", "agent-python": "python"}
ANCHOR = "wireguard-go"
TESTS = ("tcp", "udp", "ping", "cpu")
UDP_SIZES = (1392, 64)
LOSS_LIMIT = 1.0  # percent
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PING_TIME = re.compile(r"time=([\d.]+) ms")

# The policy of `--policy`, on both nodes: a may open flows to b's iperf3 ports (lab.iperf3
# picks 20000-39999), b may reach a's ssh only; replies to a's own flows pass a's filter.
POLICY = """{
  // bench/throughput.py --policy: the same on both nodes
  "hosts": {"a": "100.64.0.1/32", "b": "100.64.0.2/32"},
  "acls": [
    {"action": "accept", "src": ["a"], "dst": ["b:20000-39999"]},
    {"action": "accept", "src": ["b"], "dst": ["a:22"]},
  ],
  "tests": [{"src": "100.64.0.1", "accept": ["100.64.0.2:20000"], "deny": ["100.64.0.2:22"]}],
}
"""


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    unit: str
    label: str
    higher_is_better: bool
    target: str = ""  # the target for ours / wireguard-go (the native agent's)


def metrics_for(
    tests: Sequence[str], ping_intervals: Sequence[float], policy: bool
) -> list[Metric]:
    """The rows of the table, in order, for the selected measurements."""
    out: list[Metric] = []
    if "tcp" in tests:
        out.append(Metric("tcp_gbps", "Gbit/s", "TCP, received", True, ">= 4.0x"))
    if policy:
        out.append(Metric("tcp_policy_gbps", "Gbit/s", "TCP with a policy on both nodes", True))
    if "udp" in tests:
        for size in UDP_SIZES:
            out += [
                Metric(f"udp{size}_pps", "pps", f"UDP {size} B received, unlimited offer", True),
                Metric(f"udp{size}_loss_pct", "%", f"UDP {size} B loss at that offer", False),
                Metric(
                    f"udp{size}_max_pps_lt1pct",
                    "pps",
                    f"UDP {size} B highest offer with <1% loss",
                    True,
                    ">= 2.5x",
                ),
            ]
    if "ping" in tests:
        for interval in ping_intervals:
            tag = interval_tag(interval)
            out.append(
                Metric(
                    f"ping_{tag}_median_ms", "ms", f"ping RTT median, {tag} apart", False, "<= 1x"
                )
            )
    if "cpu" in tests:
        out += [
            Metric("cpu_tx_us", "us", "CPU per packet, sending daemon", False),
            Metric("cpu_rx_us", "us", "CPU per packet, receiving daemon", False),
            Metric("cpu_run_loss_pct", "%", "loss at the fixed offer", False),
            Metric("rss_tx_mib", "MiB", "VmRSS after the run, sending daemon", False),
            Metric("rss_rx_mib", "MiB", "VmRSS after the run, receiving daemon", False),
        ]
    return out


def interval_tag(interval: float) -> str:
    """0.01 -> '10ms', 1.0 -> '1s' (the ping rows' names)."""
    if interval >= 1 and float(interval).is_integer():
        return f"{int(interval)}s"
    return f"{interval * 1000:g}ms"


def ping_count(interval: float) -> int:
    """Pings per interval: 20, or 5 when they are >= 0.5 s apart (the run stays short)."""
    return 5 if interval >= 0.5 else 20


def intervals(text: str) -> list[float]:
    """argparse type: '0.01,0.05,1' -> [0.01, 0.05, 1.0] (ping takes >= 0.002 s as root)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of seconds") from None
    if not values or any(not 0.002 <= v <= 10 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each interval between 0.002 and 10 s")
    return values


def test_list(text: str) -> list[str]:
    """argparse type: 'tcp,ping' -> ['tcp', 'ping'] in the order of TESTS."""
    names = {v.strip() for v in text.split(",") if v.strip()}
    unknown = names - set(TESTS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(TESTS)}")
    return [t for t in TESTS if t in names]


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


# -- the machine ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, every thread (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LabError(f"no VmRSS for pid {pid}")


def proc_stat_cpu(text: str | None = None) -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    text = text if text is not None else Path("/proc/stat").read_text()
    return [int(v) for v in text.splitlines()[0].split()[1:9]]


def cpu_share(before: Sequence[int], after: Sequence[int]) -> dict[str, float]:
    """Between two /proc/stat samples: % of all CPUs busy (not idle, iowait or steal) and % stolen
    by the hypervisor."""
    d = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(d) or 1
    idle = d[3] + d[4]
    steal = d[7]
    return {"busy_pct": 100 * (total - idle - steal) / total, "steal_pct": 100 * steal / total}


def cpu_mhz(text: str | None = None) -> list[float]:
    text = text if text is not None else Path("/proc/cpuinfo").read_text()
    return [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]


def hash_probe_ms(reps: int = 3, size: int = 8 << 20) -> float:
    """Best time to SHA-256 `size` bytes on one core: the speed a core gives right now."""
    data = bytes(size)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def interpreter_probe_ms(reps: int = 3) -> float:
    """Best time of a million additions in a Python loop: the interpreter's speed right now."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def machine_probe(seconds: float = 1.0) -> dict[str, float]:
    """Sampled while nothing of ours runs: others' CPU use and steal, and the two probes."""
    before = proc_stat_cpu()
    time.sleep(seconds)
    share = cpu_share(before, proc_stat_cpu())
    return {
        "idle_busy_pct": share["busy_pct"],
        "idle_steal_pct": share["steal_pct"],
        "hash_ms": hash_probe_ms(),
        "python_loop_ms": interpreter_probe_ms(),
    }


def machine_facts() -> dict[str, Any]:
    mhz = cpu_mhz()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_mhz": mhz,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


# -- the tunnels ------------------------------------------------------------------------------


class BenchAgent(Agent):
    """The lab's Agent with an access policy (`[interface] policy_file`), optionally run from
    another source tree."""

    def __init__(
        self,
        *args: Any,
        policy_path: Path | None = None,
        tree: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.policy_path = policy_path
        self.tree = tree

    def _python_env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.tree)} if self.tree else super()._python_env()

    def config_text(self) -> str:
        text = super().config_text()
        if self.policy_path is None:
            return text
        head = "[interface]\n"
        assert text.startswith(head)
        return f"{head}policy_file = {json.dumps(str(self.policy_path))}\n{text[len(head) :]}"


@dataclass(frozen=True, slots=True)
class Target:
    """What a measurement talks to: b's address, and the two daemons (sender a, receiver b)."""

    addr: str
    pids: tuple[int, int] | None


@contextmanager
def tunnel(
    lab: Lab,
    ns_a: str,
    ns_b: str,
    ips: tuple[str, str],
    impl: str,
    policy_path: Path | None = None,
    tree: Path | None = None,
) -> Iterator[Target]:
    """A tunnel pair of `impl` between the namespaces, stopped when the block ends."""
    if impl == "veth":
        yield Target(ips[1], None)
        return
    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    peer_of_a = Peer("b", pub_b, (f"{B4}/32",), endpoint=f"{ips[1]}:{PORT}")
    peer_of_b = Peer("a", pub_a, (f"{A4}/32",), endpoint=f"{ips[0]}:{PORT}")
    if impl in AGENTS:
        tree = tree if impl == "agent-tree" else None
        a = BenchAgent(
            lab,
            ns_a,
            private_key=priv_a,
            addresses=[f"{A4}/32"],
            listen_port=PORT,
            peers=[peer_of_a],
            mtu=MTU,
            dataplane=DATAPLANE.get(impl),
            policy_path=policy_path,
            tree=tree,
        )
        b = BenchAgent(
            lab,
            ns_b,
            private_key=priv_b,
            addresses=[f"{B4}/32"],
            listen_port=PORT,
            peers=[peer_of_b],
            mtu=MTU,
            dataplane=DATAPLANE.get(impl),
            policy_path=policy_path,
            tree=tree,
        )
        started: list[Agent] = []
        try:
            for agent in (a, b):
                agent.start()
                started.append(agent)
            assert a.proc is not None
            assert b.proc is not None
            yield Target(B4, (a.proc.pid, b.proc.pid))
        finally:
            for running in started:
                try:
                    running.stop()
                except AssertionError as e:
                    sys.stderr.write(f"warning: {e}\n")
    else:
        wa = WgGo(lab, ns_a, private_key=priv_a, addresses=[f"{A4}/32"], listen_port=PORT)
        wb = WgGo(lab, ns_b, private_key=priv_b, addresses=[f"{B4}/32"], listen_port=PORT)
        wa.add_peer(peer_of_a)
        wb.add_peer(peer_of_b)
        try:
            wa.start()
            wb.start()
            for w in (wa, wb):
                lab.run(None, "ip", "-n", w.ns, "link", "set", w.ifname, "mtu", str(MTU))
            assert wa.proc is not None
            assert wb.proc is not None
            yield Target(B4, (wa.proc.pid, wb.proc.pid))
        finally:
            wa.stop()
            wb.stop()


# -- the measurements -------------------------------------------------------------------------


def udp_run(
    ns_a: str,
    ns_b: str,
    addr: str,
    size: int,
    seconds: float,
    pps: float | None,
    rcvbuf: str | None,
) -> dict[str, float]:
    """One iperf3 UDP run offering `pps` packets/s (None: as fast as iperf3 can send)."""
    bitrate = "0" if pps is None else f"{pps * size * 8:.0f}"
    r = iperf3(ns_b, ns_a, addr, seconds, udp=True, length=size, bitrate=bitrate, window=rcvbuf)
    rx = r["end"]["sum_received"]
    span = max(float(rx["seconds"]), 1e-9)
    sent = r["end"].get("sum_sent", {}).get("packets", rx["packets"])
    return {
        "sent": float(sent),
        "received": float(rx["packets"] - rx["lost_packets"]),
        "sent_pps": rx["packets"] / span,
        "pps": (rx["packets"] - rx["lost_packets"]) / span,
        "loss": float(rx["lost_percent"]),
    }


def tcp_gbps(ns_a: str, ns_b: str, addr: str, seconds: float) -> float:
    tcp = iperf3(ns_b, ns_a, addr, seconds)
    return float(tcp["end"]["sum_received"]["bits_per_second"]) / 1e9


def udp_rows(
    ns_a: str,
    ns_b: str,
    addr: str,
    size: int,
    seconds: float,
    steps: int,
    rcvbuf: str | None,
    log: Callable[[str], None],
) -> dict[str, float | None]:
    log(f"  UDP {size} B, unlimited offer")
    flood = udp_run(ns_a, ns_b, addr, size, seconds, None, rcvbuf)
    # Bisect the offered rate: `good` is the best offer seen with < 1 % loss, `bad` the lowest
    # with more. Start at what the flood delivered (an overloaded receiver often delivers less
    # than it could at a lower offer, so both directions are possible).
    good: tuple[float, float] | None = None  # (offer, received pps)
    bad = flood["sent_pps"]
    if flood["loss"] < LOSS_LIMIT:
        good = (flood["sent_pps"], flood["pps"])
    offer = flood["pps"]
    for _ in range(steps if good is None else 0):
        log(f"  UDP {size} B, offer {offer:,.0f} pps")
        run = udp_run(ns_a, ns_b, addr, size, seconds, offer, rcvbuf)
        if run["loss"] < LOSS_LIMIT:
            if good is None or run["pps"] > good[1]:
                good = (offer, run["pps"])
        else:
            bad = min(bad, offer)
        low = good[0] if good is not None else 0.0
        offer = (low + bad) / 2 if good is not None else offer / 2
    return {
        f"udp{size}_pps": flood["pps"],
        f"udp{size}_loss_pct": flood["loss"],
        f"udp{size}_max_pps_lt1pct": good[1] if good is not None else None,
    }


def cpu_rows(
    ns_a: str,
    ns_b: str,
    target: Target,
    pps: float,
    seconds: float,
    rcvbuf: str | None,
    log: Callable[[str], None],
) -> dict[str, float | None]:
    """CPU per packet of both daemons at a fixed 64-byte UDP offer, then their VmRSS."""
    assert target.pids is not None
    log(f"  UDP 64 B at a fixed {pps:,.0f} pps: CPU per packet")
    tx, rx = target.pids
    before = (cpu_seconds(tx), cpu_seconds(rx))
    run = udp_run(ns_a, ns_b, target.addr, 64, seconds, pps, rcvbuf)
    after = (cpu_seconds(tx), cpu_seconds(rx))
    return {
        "cpu_tx_us": per_packet_us(after[0] - before[0], run["sent"]),
        "cpu_rx_us": per_packet_us(after[1] - before[1], run["received"]),
        "cpu_run_loss_pct": run["loss"],
        "rss_tx_mib": rss_mib(tx),
        "rss_rx_mib": rss_mib(rx),
    }


def per_packet_us(cpu: float, packets: float) -> float | None:
    return cpu / packets * 1e6 if packets > 0 else None


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


@dataclass(frozen=True, slots=True)
class Options:
    seconds: float
    tests: Sequence[str]
    udp_steps: int
    rcvbuf: str | None
    ping_intervals: Sequence[float]
    cpu_pps: float


def measure(
    ns_a: str, ns_b: str, target: Target, opt: Options, log: Callable[[str], None]
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    ping_times(ns_a, target.addr, 1)  # the handshake, before anything is timed
    tunnelled = target.pids is not None
    if "tcp" in opt.tests:
        log(f"  TCP {opt.seconds:g} s")
        out["tcp_gbps"] = tcp_gbps(ns_a, ns_b, target.addr, opt.seconds)
    if "udp" in opt.tests and tunnelled:
        for size in UDP_SIZES:
            out |= udp_rows(
                ns_a, ns_b, target.addr, size, opt.seconds, opt.udp_steps, opt.rcvbuf, log
            )
    if "ping" in opt.tests:
        for interval in opt.ping_intervals:
            count = ping_count(interval)
            log(f"  ping x{count}, {interval_tag(interval)} apart")
            rtts = ping_times(ns_a, target.addr, count, interval)
            out[f"ping_{interval_tag(interval)}_median_ms"] = (
                statistics.median(rtts) if rtts else None
            )
    if "cpu" in opt.tests and tunnelled:
        out |= cpu_rows(ns_a, ns_b, target, opt.cpu_pps, opt.seconds, opt.rcvbuf, log)
    return out


# -- the report -------------------------------------------------------------------------------


def median_of_rounds(
    rounds: Sequence[Mapping[str, float | None]], keys: Sequence[str]
) -> dict[str, float | None]:
    """Per metric, the median over the rounds that measured it."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [v for r in rounds if (v := r.get(key)) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def ratio_columns(impls: Sequence[str]) -> list[tuple[str, str, str]]:
    """(heading, numerator, denominator) of each ratio column the implementations allow."""
    cols = [(f"{_short(i)}/wg-go", i, ANCHOR) for i in AGENTS if i in impls and ANCHOR in impls]
    if "agent" in impls and "agent-python" in impls:
        cols.append(("native/py", "agent", "agent-python"))
    if "agent-tree" in impls:
        cols += [(f"{_short(i)}/tree", i, "agent-tree") for i in DATAPLANE if i in impls]
    return cols


def _short(impl: str) -> str:
    return {"agent": "native", "agent-python": "py", "agent-tree": "tree"}.get(impl, impl)


def ratio(results: Mapping[str, Mapping[str, float | None]], key: str, num: str, den: str) -> str:
    ours, theirs = results.get(num, {}).get(key), results.get(den, {}).get(key)
    return f"{ours / theirs:.2f}x" if ours is not None and theirs else "-"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "pps":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.3f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: Mapping[str, Mapping[str, float | None]], metrics: Sequence[Metric]) -> str:
    impls = list(results)
    cols = ratio_columns(impls)
    # The target sits next to the column it applies to: native / wireguard-go.
    target_after = next((n for n, c in enumerate(cols) if c[1:] == ("agent", ANCHOR)), None)
    head = f"{'metric':<44}" + "".join(f"{i:>13}" for i in impls)
    for n, c in enumerate(cols):
        head += f"{c[0]:>13}" + (f"{'target':>9}" if n == target_after else "")
    lines = [head, "-" * len(head)]
    for m in metrics:
        row = f"{m.label + ' (' + m.unit + ')':<44}"
        row += "".join(f"{fmt(results[i].get(m.key), m.unit):>13}" for i in impls)
        for n, (_, num, den) in enumerate(cols):
            row += f"{ratio(results, m.key, num, den):>13}"
            row += f"{m.target:>9}" if n == target_after else ""
        lines.append(row)
    lines.append(
        "ratios are left / right as measured: above 1x is better for rates, worse for times, "
        "CPU and memory"
    )
    native, python = results.get("agent", {}), results.get("agent-python", {})
    diffs = []
    for key, side in (("rss_tx_mib", "sender"), ("rss_rx_mib", "receiver")):
        ours, twin = native.get(key), python.get(key)
        if ours is not None and twin is not None:
            diffs.append(f"{side} {ours - twin:+.1f} MiB")
    if diffs:
        lines.append(f"RSS native - python: {', '.join(diffs)} (target <= +10 MiB)")
    return "\n".join(lines)


def machine_report(facts: Mapping[str, Any], rounds: Sequence[Mapping[str, float]]) -> str:
    mhz = facts.get("cpu_mhz") or []
    lines = [
        f"machine: nproc {facts.get('nproc')}, /proc/cpuinfo MHz "
        + (f"{min(mhz):.0f}-{max(mhz):.0f}" if mhz else "-")
        + f", loadavg at start {' '.join(facts.get('loadavg', []))}",
    ]
    for n, r in enumerate(rounds, 1):
        lines.append(
            f"  before round {n}: others' CPU use {r['idle_busy_pct']:.0f} % of all cores, "
            f"steal {r['idle_steal_pct']:.1f} %; SHA-256 of 8 MiB {r['hash_ms']:.1f} ms, "
            f"10^6 additions in a Python loop {r['python_loop_ms']:.1f} ms"
        )
    run = facts.get("run")
    if run:
        lines.append(
            f"  whole run: busy {run['busy_pct']:.0f} % of all cores (ours included), "
            f"steal {run['steal_pct']:.1f} %"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each iperf3 run")
    ap.add_argument("--rounds", type=int, default=3, help="alternate the implementations N times")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--impl", action="append", choices=IMPLS, help="only these (repeatable)")
    ap.add_argument(
        "--tests", type=test_list, default=list(TESTS), help="of tcp,udp,ping,cpu (all)"
    )
    ap.add_argument(
        "--policy", action="store_true", help="also TCP with an access policy on both agents"
    )
    ap.add_argument(
        "--ping-intervals",
        type=intervals,
        default=[0.01, 0.05, 1.0],
        help="seconds between pings, comma-separated (0.01,0.05,1)",
    )
    ap.add_argument("--cpu-pps", type=float, default=50_000, help="offer of the CPU run")
    ap.add_argument(
        "--agent-tree",
        type=Path,
        help="also run our agent from this source tree (another commit's checkout) as agent-tree",
    )
    ap.add_argument("--udp-steps", type=int, default=5, help="offers tried per UDP size")
    ap.add_argument(
        "--udp-rcvbuf",
        type=size_bytes,
        default="1M",
        help="UDP receiver socket buffer (iperf3 -w; 0 = iperf3's default)",
    )
    args = ap.parse_args()
    rcvbuf = str(args.udp_rcvbuf) if args.udp_rcvbuf else None  # bytes, as iperf3 -w takes them
    if os.geteuid() != 0:
        sys.stderr.write("needs root (network namespaces)\n")
        return 1
    chosen = args.impl or [*DEFAULT_IMPLS, *(["agent-tree"] if args.agent_tree else [])]
    impls: list[str] = [i for i in IMPLS if i in chosen]
    if "agent-tree" in impls and not (args.agent_tree and (args.agent_tree / "agent").is_dir()):
        sys.stderr.write("agent-tree needs --agent-tree DIR, a source tree with agent/ in it\n")
        return 1
    need = ["iperf3", "ping", "ip"] + (["wireguard-go", "wg"] if ANCHOR in impls else [])
    missing = [t for t in need if shutil.which(t) is None]
    if missing:
        sys.stderr.write(f"missing {' '.join(missing)}: run packaging/setup.sh\n")
        return 1

    def log(msg: str) -> None:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    if rcvbuf is not None:
        limit = int(Path("/proc/sys/net/core/rmem_max").read_text())
        if limit < args.udp_rcvbuf:
            log(f"warning: net.core.rmem_max is {limit}: the {rcvbuf} B receive buffer is capped")

    opt = Options(
        args.seconds, args.tests, args.udp_steps, rcvbuf, args.ping_intervals, args.cpu_pps
    )
    metrics = metrics_for(opt.tests, opt.ping_intervals, args.policy)
    runs: dict[str, list[dict[str, float | None]]] = {impl: [] for impl in impls}
    probes: list[dict[str, float]] = []
    failed: set[str] = set()
    facts = machine_facts()
    started = time.monotonic()
    stat0 = proc_stat_cpu()
    tree = args.agent_tree.resolve() if args.agent_tree else None
    with Lab() as lab:
        ns_a, ns_b = lab.add_ns("a"), lab.add_ns("b")
        ips = lab.link(ns_a, ns_b)
        policy_path = lab.path("policy.hujson")
        policy_path.write_text(POLICY)
        for n in range(max(1, args.rounds)):
            probes.append(machine_probe())
            for impl in impls:
                if impl in failed:
                    continue
                log(f"{impl}:" if args.rounds <= 1 else f"{impl} (round {n + 1}/{args.rounds}):")
                try:
                    with tunnel(lab, ns_a, ns_b, ips, impl, tree=tree) as target:
                        row = measure(ns_a, ns_b, target, opt, log)
                    if args.policy and impl in DATAPLANE:
                        with tunnel(lab, ns_a, ns_b, ips, impl, policy_path) as target:
                            ping_times(ns_a, target.addr, 1)
                            log(f"  TCP {opt.seconds:g} s, policy on both nodes")
                            row["tcp_policy_gbps"] = tcp_gbps(ns_a, ns_b, target.addr, opt.seconds)
                    runs[impl].append(row)
                except LabError as e:
                    log(f"  {impl} failed: {e}")
                    failed.add(impl)
    facts["run"] = cpu_share(stat0, proc_stat_cpu())
    log(f"done in {time.monotonic() - started:.0f} s")
    keys = [m.key for m in metrics]
    results = {impl: {} if impl in failed else median_of_rounds(runs[impl], keys) for impl in impls}
    if args.json:
        doc = {
            "seconds": args.seconds,
            "mtu": MTU,
            "udp_rcvbuf": rcvbuf,
            "cpu_pps": args.cpu_pps,
            "machine": {**facts, "rounds": probes},
            "results": results,
            "rounds": runs,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(table(results, metrics))
        print()
        print(machine_report(facts, probes))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
