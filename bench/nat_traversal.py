"""Time from `agent up` to the first relayed ping and to the direct path, behind NAT routers.

Topology: tests/integration/natlab.py (two agents, each behind an nftables NAT router, an
"internet" router running `agent derper` with STUN). Per run, fresh namespaces and keys:

    t = 0        the second `agent up` is spawned (a's daemon is already up)
    ready        b's interface exists with its addresses (both daemons are up)
    first ping   the first echo reply from b to a ping sent by a (1 ping every 20 ms, through
                 DERP unless the direct path is already there)
    direct       a's status says its path to b is "direct" (polled every 20 ms through the
                 control socket; a ping is sent every 20 ms meanwhile, so there is traffic)

Usage (root): python bench/nat_traversal.py [--runs 5] [--nat cone|symmetric] [--json]
Target (issue 4): direct within 1 s on cone NATs (median).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.lab import Agent, Lab, LabError  # the repository root, put on sys.path
from tests.integration.natlab import B4, build

POLL = 0.02
LIMIT = 30.0


def _status(agent: Agent) -> dict[str, Any]:
    """`status` over the control socket (a file path: reachable from the root namespace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(agent.control_socket))
        s.sendall(b'{"op": "status"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    return dict(reply["result"])


def _path(agent: Agent, key: str) -> str | None:
    try:
        st = _status(agent)
    except (OSError, ValueError, KeyError):
        return None
    for p in st.get("peers", []):
        if p.get("public_key") == key:
            return str(p.get("path"))
    return None


def one_run(nat: str) -> dict[str, float | None]:
    with Lab() as lab:
        net = build(lab, nat, nat)  # type: ignore[arg-type]
        net.a.start()
        t0 = time.monotonic()  # the second side's `agent up`: from now on both are starting
        net.b.start()
        ready = time.monotonic() - t0
        first: float | None = None
        direct: float | None = None
        pinger = subprocess.Popen(
            ["ip", "netns", "exec", net.ns_a, "ping", "-n", "-i", "0.02", "-W", "1", B4],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert pinger.stdout is not None
            while first is None and time.monotonic() - t0 < LIMIT:
                line = pinger.stdout.readline()
                if "bytes from" in line:
                    first = time.monotonic() - t0
            while direct is None and time.monotonic() - t0 < LIMIT:
                if _path(net.a, net.b.public_key) == "direct":
                    direct = time.monotonic() - t0
                else:
                    time.sleep(POLL)
        finally:
            pinger.terminate()
            pinger.wait(5)
        return {"ready_s": ready, "first_ping_s": first, "direct_s": direct}


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--nat", choices=("cone", "symmetric"), default="cone")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs: list[dict[str, float | None]] = []
    for i in range(args.runs):
        try:
            r = one_run(args.nat)
        except LabError as e:
            sys.stderr.write(f"run {i + 1}: {e}\n")
            return 1
        runs.append(r)
        sys.stderr.write(
            f"run {i + 1}/{args.runs}: "
            + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} none" for k, v in r.items())
            + "\n"
        )
    summary = {k: _median([r[k] for r in runs]) for k in ("ready_s", "first_ping_s", "direct_s")}
    if args.json:
        print(json.dumps({"nat": args.nat, "runs": runs, "median": summary}))
        return 0
    print(f"NAT {args.nat} <-> {args.nat}, {args.runs} runs, median seconds from `agent up`:")
    for k, v in summary.items():
        print(f"  {k:<14} {'never' if v is None else f'{v:.3f}'}")
    direct_after_ready = (
        None
        if summary["direct_s"] is None or summary["ready_s"] is None
        else summary["direct_s"] - summary["ready_s"]
    )
    if direct_after_ready is not None:
        print(f"  direct after both daemons were up: {direct_after_ready:.3f} s (target <= 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
