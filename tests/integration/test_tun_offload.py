"""The data plane over real TUN devices with offloads, joined by a veth (root only).

    ns A                                                      ns B
    ping / iperf3 -c                                          iperf3 -s
    100.64.77.1/24                                            100.64.77.2/24
    TUN (vnet hdr, TSO/USO)                                   TUN (vnet hdr, TSO/USO)
      | DataPlane + null-crypto device                          | DataPlane + null-crypto device
    UDP :51820 198.18.77.1 ---------- veth ---------- 198.18.77.2 UDP :51820

Each side runs this module as a process (`python -m tests.integration.test_tun_offload serve`)
inside its namespace: the "device" routes every overlay address to the other side and sends
IP packets unchanged as UDP payloads, so only the I/O layer (segmentation, GSO, GRO,
coalescing) is under test. The processes print their counters as JSON when stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from agent.daemon.dataplane import DataPlane, Endpoint, PeerLike
from agent.daemon.tun import open_tun
from agent.daemon.udp import open_udp

from .lab import Lab, Proc, iperf3, ping

PORT = 51820
OVERLAY = ipaddress.ip_network("100.64.77.0/24")


# --------------------------------------------------------------------------- the serving side


class NullPeer:
    """Encryption is the identity: the datagram is the IP packet."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint: Endpoint | None = endpoint

    def encrypt(
        self, packets: Sequence[bytes | bytearray | memoryview], now: float
    ) -> list[bytes | bytearray]:
        return [bytes(p) for p in packets]


@dataclass
class NullResult:
    packets: list[bytes | bytearray | memoryview]
    replies: list[tuple[bytes | bytearray, Endpoint]] = field(default_factory=list)
    peers: list[PeerLike] = field(default_factory=list)
    foreign: list[bytes | bytearray | memoryview] = field(default_factory=list)


class NullDevice:
    def __init__(self, peer: NullPeer) -> None:
        self.peer = peer

    def route(self, dst: bytes) -> PeerLike | None:
        if len(dst) == 4 and ipaddress.IPv4Address(dst) in OVERLAY:
            return self.peer
        return None

    def receive_batch(
        self, datagrams: Sequence[bytes | bytearray | memoryview], src: Endpoint, now: float
    ) -> NullResult:
        return NullResult(list(datagrams))


def serve(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tun", required=True)
    ap.add_argument("--addr", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--no-offload", action="store_true")
    args = ap.parse_args(argv)
    tun = open_tun(args.tun, offload=not args.no_offload)
    udp = open_udp(PORT)
    try:
        tun.configure([ipaddress.ip_interface(args.addr)], 1420, [])
        loop = asyncio.new_event_loop()
        host, port = args.peer.rsplit(":", 1)
        plane = DataPlane(tun, udp, NullDevice(NullPeer((host, int(port)))), loop.time, _noop)
        plane.attach(loop)
        stop: asyncio.Future[None] = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        sys.stdout.write(json.dumps({"ready": True, "offload": tun.offload}) + "\n")
        sys.stdout.flush()
        loop.run_until_complete(stop)
        plane.detach()
        loop.close()
        stats = plane.stats.as_dict()
        sys.stdout.write(json.dumps({"offload": tun.offload, "stats": stats}) + "\n")
        return 0
    finally:
        udp.close()
        tun.close()


def _noop() -> None:
    pass


# --------------------------------------------------------------------------- the test


def _start(lab: Lab, ns: str, addr: str, peer: str, offload: bool) -> Proc:
    cmd = [sys.executable, "-m", "tests.integration.test_tun_offload", "serve"]
    cmd += ["--tun", lab.ifname("to"), "--addr", addr, "--peer", peer]
    if not offload:
        cmd.append("--no-offload")
    proc = lab.spawn(ns, *cmd, tag="dataplane")
    deadline = time.monotonic() + 15
    while '"ready"' not in proc.stdout_text():
        if not proc.alive() or time.monotonic() > deadline:
            raise AssertionError(f"data plane did not start\n{proc.describe()}")
        time.sleep(0.05)
    return proc


def _final_stats(proc: Proc) -> dict[str, object]:
    rc = proc.stop(timeout=5.0)
    assert rc == 0, proc.describe()
    last = proc.stdout_text().strip().splitlines()[-1]
    result: dict[str, object] = json.loads(last)
    return result


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_ping_and_iperf3_through_two_data_planes(lab: Lab, offload: bool) -> None:
    ns_a, ns_b = lab.add_ns("a"), lab.add_ns("b")
    ip_a, ip_b = lab.link(ns_a, ns_b, subnet=77)
    a = _start(lab, ns_a, "100.64.77.1/24", f"{ip_b}:{PORT}", offload)
    b = _start(lab, ns_b, "100.64.77.2/24", f"{ip_a}:{PORT}", offload)

    assert ping(ns_a, "100.64.77.2", count=3), lab.logs()
    result = iperf3(ns_b, ns_a, "100.64.77.2", 3)
    gbps = result["end"]["sum_received"]["bits_per_second"] / 1e9
    retrans = result["end"]["sum_sent"].get("retransmits")

    stats_a, stats_b = _final_stats(a), _final_stats(b)
    mode = stats_a["offload"]
    print(
        f"\n[{mode}] iperf3 TCP 3 s through two data planes: {gbps:.2f} Gbit/s, "
        f"retransmits {retrans}\n  A: {stats_a['stats']}\n  B: {stats_b['stats']}"
    )
    assert gbps > 0.05
    tx = stats_a["stats"]
    assert isinstance(tx, dict)
    assert tx["tx_packets"] > 1000
    if offload:
        assert mode in ("tso+uso", "tso")
        # TSO: one TUN read carried many segments; GRO+coalescing: fewer TUN writes than packets
        assert tx["tx_packets"] > 5 * tx["tun_reads"]
        rx = stats_b["stats"]
        assert isinstance(rx, dict)
        assert rx["rx_packets"] > 5 * rx["tun_writes"]
    else:
        assert mode == "none"


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} serve --tun NAME --addr CIDR --peer HOST:PORT")
