"""Time to the direct path and success rate per NAT-matrix cell, over N runs (root only).

Each run builds a fresh namespace lab with fresh keys (tests/integration: natlab.py, miniupnpd.py):

    cell         a's side / b's side                                  expected path
    cone         cone NAT / cone NAT                                  direct (hole punching)
    birthday     cone NAT / symmetric NAT, no port mapping            direct (birthday technique)
    upnp         symmetric NAT whose router maps ports by UPnP IGD    direct (port mapping)
    pmp          ... by NAT-PMP only                                  direct
    pcp          ... by PCP only                                      direct
    same-nat     both on one LAN behind one symmetric NAT             direct (local endpoints)
    symmetric    symmetric NAT / symmetric NAT                        DERP
    udp-blocked  cone / cone, the internet router drops all UDP       DERP

    t = 0        the second `agent up` (a is up first; in the port-mapping cells a's mapping
                 exists by then, and the birthday technique is off there so that only port
                 mapping is measured)
    ready        b's interface exists with its addresses (both daemons are up)
    first ping   the first echo reply to a's pings (one every 20 ms, relayed until a direct
                 path exists)
    direct       a's status says its path to b is "direct" (polled every 20 ms)

A run of a "direct" cell succeeds when the path is direct within --limit s (default 45: a
birthday round that misses is retried after 30 s); a run of a "DERP" cell succeeds when pings
pass and the path is still relayed after --derp-window s (default 12).

Usage (root): python bench/nat_traversal.py --cell birthday --runs 20 [--json]
              python bench/nat_traversal.py --cell all --runs 3
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the repository root, put on sys.path
from tests.integration.lab import Agent, Lab, LabError, _wait_for
from tests.integration.miniupnpd import UpnpRouter
from tests.integration.natlab import B4, build, build_same_nat

POLL = 0.02


@dataclass(frozen=True)
class Cell:
    expect: str  # "direct" or "derp"
    setup: Callable[[Lab], tuple[Agent, Agent, str]]  # (a, b, a's namespace), not started
    before_b: Callable[[Agent], None] = lambda a: None  # once a runs, before b starts


def _nat(nat_a: str, nat_b: str, *, udp_blocked: bool = False) -> Callable[[Lab], Any]:
    def setup(lab: Lab) -> tuple[Agent, Agent, str]:
        net = build(lab, nat_a, nat_b)  # type: ignore[arg-type]
        if udp_blocked:
            net.block_udp()
        return net.a, net.b, net.ns_a

    return setup


def _portmap(only: str) -> Callable[[Lab], Any]:
    def setup(lab: Lab) -> tuple[Agent, Agent, str]:
        net = build(lab, "symmetric", "cone")
        UpnpRouter(net, only)
        net.a.nat_birthday = net.b.nat_birthday = False
        return net.a, net.b, net.ns_a

    return setup


def _same_nat(lab: Lab) -> tuple[Agent, Agent, str]:
    a, b, ns_a, _ = build_same_nat(lab)
    return a, b, ns_a


def _mapped(a: Agent) -> None:
    if not _wait_for(lambda: (_status(a) or {}).get("portmap") is not None, 20, 0.1):
        raise LabError("a's router never mapped its port")


CELLS: dict[str, Cell] = {
    "cone": Cell("direct", _nat("cone", "cone")),
    "birthday": Cell("direct", _nat("cone", "symmetric")),
    "upnp": Cell("direct", _portmap("upnp"), _mapped),
    "pmp": Cell("direct", _portmap("pmp"), _mapped),
    "pcp": Cell("direct", _portmap("pcp"), _mapped),
    "same-nat": Cell("direct", _same_nat),
    "symmetric": Cell("derp", _nat("symmetric", "symmetric")),
    "udp-blocked": Cell("derp", _nat("cone", "cone", udp_blocked=True)),
}


def _status(agent: Agent) -> dict[str, Any] | None:
    """`status` over the control socket (a file path: reachable from the root namespace)."""
    try:
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
        return dict(json.loads(buf)["result"])
    except (OSError, ValueError, KeyError):
        return None


def _path(agent: Agent, key: str) -> str | None:
    st = _status(agent)
    for p in (st or {}).get("peers", []):
        if p.get("public_key") == key:
            return str(p.get("path"))
    return None


def one_run(cell: Cell, limit: float, derp_window: float) -> dict[str, Any]:
    with Lab() as lab:
        a, b, ns_a = cell.setup(lab)
        a.start()
        cell.before_b(a)
        t0 = time.monotonic()  # the second side's `agent up`: from now on both are starting
        b.start()
        ready = time.monotonic() - t0
        first: float | None = None
        direct: float | None = None
        window = limit if cell.expect == "direct" else derp_window
        pinger = subprocess.Popen(
            ["ip", "netns", "exec", ns_a, "ping", "-n", "-i", "0.02", "-W", "1", B4],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert pinger.stdout is not None
            while first is None and time.monotonic() - t0 < window:
                line = pinger.stdout.readline()
                if "bytes from" in line:
                    first = time.monotonic() - t0
            while direct is None and time.monotonic() - t0 < window:
                if _path(a, b.public_key) == "direct":
                    direct = time.monotonic() - t0
                else:
                    time.sleep(POLL)
            birthday = ((_status(a) or {}).get("dataplane") or {}).get("birthday") or {}
        finally:
            pinger.terminate()
            pinger.wait(5)
        ok = direct is not None if cell.expect == "direct" else first is not None and not direct
        return {
            "ok": ok,
            "ready_s": ready,
            "first_ping_s": first,
            "direct_s": direct,
            "birthday_nat_a": birthday.get("nat"),
        }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    direct = [r["direct_s"] for r in runs if r["direct_s"] is not None]
    first = [r["first_ping_s"] for r in runs if r["first_ping_s"] is not None]
    after = [r["direct_s"] - r["ready_s"] for r in runs if r["direct_s"] is not None]
    return {
        "cell": name,
        "expect": CELLS[name].expect,
        "runs": len(runs),
        "ok": sum(1 for r in runs if r["ok"]),
        "direct": len(direct),
        "direct_median_s": _median(direct),
        "direct_p90_s": _quantile(direct, 0.9),
        "direct_max_s": max(direct) if direct else None,
        "direct_after_ready_median_s": _median(after),  # from both daemons up
        "first_ping_median_s": _median(first),
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=[*CELLS, "all"], default="cone")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--limit", type=float, default=45.0, help="s to wait for a direct path")
    ap.add_argument("--derp-window", type=float, default=12.0, help="s a DERP cell is watched")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = list(CELLS) if args.cell == "all" else [args.cell]
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        runs = results[name] = []
        for i in range(args.runs):
            try:
                r = one_run(CELLS[name], args.limit, args.derp_window)
            except LabError as e:
                sys.stderr.write(f"{name} run {i + 1}: {e}\n")
                r = {"ok": False, "ready_s": None, "first_ping_s": None, "direct_s": None,
                     "error": str(e)}  # fmt: skip
            runs.append(r)
            sys.stderr.write(
                f"{name} run {i + 1}/{args.runs}: "
                + ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in r.items())
                + "\n"
            )
    summary = [summarize(name, runs) for name, runs in results.items()]
    if args.json:
        print(json.dumps({"runs": results, "summary": summary}))
        return 0
    print("seconds from the second `agent up`; ok = the expected path (direct, or DERP)")
    print(f"{'cell':<12} {'expect':<7} {'ok':>7} {'direct med':>10} {'p90':>6} {'max':>6} "
          f"{'1st ping':>8} {'direct after both up':>20}")  # fmt: skip
    for s in summary:
        print(
            f"{s['cell']:<12} {s['expect']:<7} {s['ok']:>3}/{s['runs']:<3} "
            f"{_fmt(s['direct_median_s']):>10} {_fmt(s['direct_p90_s']):>6} "
            f"{_fmt(s['direct_max_s']):>6} {_fmt(s['first_ping_median_s']):>8} "
            f"{_fmt(s['direct_after_ready_median_s']):>20}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
