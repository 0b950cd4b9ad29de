"""The agent with many configured peers: startup time, idle CPU and memory (10 vs 1,000 peers).

For each peer count, in a fresh namespace of its own and one after the other (never two at once):

    config     N peers with generated keys, a /32 each in 100.64.0.0/10 (100.64.0.2, .3, ...),
               no endpoints, no DERP map: nothing to say to anyone, so the daemon should sleep
    startup    from spawning `python -m agent up` to READY=1 on a NOTIFY_SOCKET we listen on
               (sent once the TUN, its address and a route per peer, the UDP socket and both
               control sockets are up); the bare `import agent.node.main` time is measured
               too, as the floor every start pays
    idle       the daemon's user+system CPU time over --idle seconds after a 2 s settle, in % of
               one core (/proc/PID/stat); VmRSS at the end and VmHWM (the peak, i.e. startup)
    busy       the first peer is a real agent in a second namespace (joined by a veth pair):
               iperf3 sends --busy-pps 64-byte UDP datagrams per second through the tunnel for
               --busy seconds; the loaded agent's CPU over that run, in % of one core and in
               microseconds per packet. Work that grows with the number of configured peers on
               the packet path (a scan per batch) shows up here as a gap between 10 and 1,000
    status     wall time of `agent status --json` (every peer in the answer)
    stop       SIGTERM to exit (status 0 required)

Usage (root): python bench/load.py [--peers 10 --peers 1000] [--idle 30] [--busy 5]
              [--busy-pps 20000] [--json]
Progress goes to stderr, the table (or JSON) to stdout; exit status 1 when a run failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.lab import (  # the repository root, put on sys.path above
    REPO_ROOT,
    Agent,
    Lab,
    LabError,
    Peer,
    iperf3,
    keypair,
)

PORT = 41641
SETTLE = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
BASE = ipaddress.IPv4Address("100.64.0.0")


def _say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _import_seconds(lab: Lab, ns: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    start = time.monotonic()
    lab.run(ns, sys.executable, "-c", "import agent.node.main", env=env)
    return time.monotonic() - start


def measure(n_peers: int, idle: float, busy: float, busy_pps: int) -> dict[str, Any]:
    """One agent with `n_peers` peers in a fresh lab; the figures as a dict."""
    with Lab() as lab:
        ns, ns_peer = lab.add_ns("load"), lab.add_ns("peer")
        ip_a, ip_b = lab.link(ns, ns_peer)
        priv, pub = keypair()
        peer_priv, peer_pub = keypair()
        peers = [
            Peer(
                f"p{i}",
                peer_pub if i == 0 else keypair()[1],
                (f"{BASE + 2 + i}/32",),
                endpoint=f"{ip_b}:{PORT}" if i == 0 else None,
            )
            for i in range(n_peers)
        ]
        other = Agent(
            lab,
            ns_peer,
            private_key=peer_priv,
            addresses=[f"{BASE + 2}/32"],
            listen_port=PORT,
            peers=[Peer("load", pub, (f"{BASE + 1}/32",), endpoint=f"{ip_a}:{PORT}")],
        )
        other.start()
        agent = Agent(
            lab, ns, private_key=priv, addresses=[f"{BASE + 1}/32"], listen_port=PORT, peers=peers
        )
        agent.config_path.write_text(agent.config_text())
        agent.config_path.chmod(0o600)
        floor = min(_import_seconds(lab, ns) for _ in range(2))  # the warm one

        notify_path = str(lab.path("notify.sock"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            env = {"PYTHONPATH": str(REPO_ROOT), "NOTIFY_SOCKET": notify_path}
            cmd = (sys.executable, "-m", "agent", "up", "-c", str(agent.config_path))
            start = time.monotonic()
            proc = lab.spawn(ns, *cmd, env=env, tag=f"agent-{n_peers}")
            ready: float | None = None
            deadline = start + 120
            while ready is None and time.monotonic() < deadline and proc.alive():
                rlist, _, _ = select.select([notify], [], [], 0.5)
                if rlist and b"READY=1" in notify.recv(4096):
                    ready = time.monotonic() - start
        if ready is None:
            raise LabError(f"agent with {n_peers} peers never sent READY=1\n{proc.describe()}")
        agent.proc = proc

        routes = lab.run(ns, "ip", "route", "show", "dev", agent.ifname).stdout.splitlines()
        if len(routes) != n_peers:
            raise LabError(f"{len(routes)} routes on {agent.ifname}, expected {n_peers}")

        time.sleep(SETTLE)
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle)
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        mem = _status_kib(proc.pid)

        busy_row: dict[str, Any] = {}
        if busy > 0:
            cpu0 = _cpu_seconds(proc.pid)
            run = iperf3(
                ns_peer,
                ns,
                str(BASE + 2),
                busy,
                udp=True,
                length=64,
                bitrate=str(busy_pps * 64 * 8),
            )
            cpu = _cpu_seconds(proc.pid) - cpu0
            sent = run["end"]["sum"]["packets"]
            span = float(run["end"]["sum"]["seconds"])
            rx = run["end"]["sum_received"]
            busy_row = {
                "busy_pps": round(sent / span),
                "busy_loss_pct": round(float(rx["lost_percent"]), 2),
                "busy_cpu_pct": round(100 * cpu / span, 1),
                "busy_us_per_packet": round(1e6 * cpu / sent, 2) if sent else None,
            }

        s0 = time.monotonic()
        status = agent.status()
        status_s = time.monotonic() - s0
        if len(status["peers"]) != n_peers:
            raise LabError(f"status lists {len(status['peers'])} peers, expected {n_peers}")

        s0 = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        try:
            rc = proc.popen.wait(30)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"agent with {n_peers} peers ignored SIGTERM") from e
        stop_s = time.monotonic() - s0
        agent.proc = None
        if rc != 0:
            raise LabError(f"agent with {n_peers} peers exited {rc}\n{proc.describe()}")
        return {
            "peers": n_peers,
            "import_s": round(floor, 3),
            "ready_s": round(ready, 3),
            "idle_s": round(t1 - t0, 1),
            "idle_cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
            "rss_mib": round(mem["VmRSS"] / 1024, 1),
            "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
            "status_s": round(status_s, 3),
            "stop_s": round(stop_s, 3),
            **busy_row,
        }


def _busy_cell(r: dict[str, Any]) -> str:
    if r.get("busy_us_per_packet") is None:
        return "-"
    return (
        f"{r['busy_cpu_pct']:.0f} % at {r['busy_pps']:,} pps: {r['busy_us_per_packet']:.1f} us"
        f" per packet ({r['busy_loss_pct']:.1f} % lost)"
    )


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| peers | import floor | spawn to READY | idle CPU (1 core) | RSS | peak RSS "
        "| busy CPU, 64 B UDP | `agent status` | SIGTERM to exit |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['peers']:,} | {r['import_s']:.2f} s | {r['ready_s']:.2f} s | "
        f"{r['idle_cpu_pct']:.2f} % over {r['idle_s']:.0f} s | {r['rss_mib']:.1f} MiB | "
        f"{r['peak_rss_mib']:.1f} MiB | {_busy_cell(r)} | {r['status_s']:.2f} s | "
        f"{r['stop_s']:.2f} s |\n"
        for r in rows
    )
    return head + body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--peers", type=int, action="append", help="peer count (repeat; 10 and 1000)")
    ap.add_argument("--idle", type=float, default=30.0, help="idle seconds measured (30)")
    ap.add_argument("--busy", type=float, default=5.0, help="busy seconds measured (5; 0: off)")
    ap.add_argument("--busy-pps", type=int, default=20000, help="64 B datagrams/s when busy")
    ap.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    args = ap.parse_args()
    if os.geteuid() != 0:
        _say("needs root (network namespaces, TUN)")
        return 1
    counts: list[int] = args.peers or [10, 1000]
    rows: list[dict[str, Any]] = []
    failed = False
    for n in counts:
        _say(f"agent with {n} peers: starting, then idle for {args.idle:.0f} s")
        try:
            row = measure(n, args.idle, args.busy, args.busy_pps)
        except LabError as e:
            _say(f"failed: {e}")
            failed = True
            continue
        _say(f"  {row}")
        rows.append(row)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        sys.stdout.write(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
