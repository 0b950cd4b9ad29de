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

`python -m tests.integration.test_tun_offload uso-probe` checks, in one namespace, that the
kernel takes our coalesced UDP writes: it writes one UDP_L4 GSO packet per address family into
a TUN and reads the datagrams back from a local socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from agent.keys import NodePrivate
from agent.node.dataplane import DataPlane, Endpoint, PeerLike
from agent.node.tun import OFFLOAD_TSO_USO, Tun, open_tun
from agent.node.udp import open_udp
from agent.proto.offload import GSO_UDP_L4, VirtioNetHdr, coalesce

from .lab import Lab, Proc, iperf3, ping

PORT = 51820
OVERLAY = ipaddress.ip_network("100.64.77.0/24")


# --------------------------------------------------------------------------- the serving side


class NullPeer:
    """Encryption is the identity: the datagram is the IP packet."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint: Endpoint | None = endpoint
        self.public_key = NodePrivate.generate().public()

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


# --------------------------------------------------------------------------- the USO probe

PROBE_LOCAL = {4: "100.64.78.1", 6: "fd7a:115c:a1e0:78::1"}  # the offload TUN's addresses
PROBE_REMOTE = {4: "100.64.78.2", 6: "fd7a:115c:a1e0:78::2"}  # the datagrams' source
PROBE_OUT = {4: "100.64.79.1", 6: "fd7a:115c:a1e0:79::1"}  # a plain TUN's addresses
PROBE_FORWARD = {4: "100.64.79.2", 6: "fd7a:115c:a1e0:79::2"}  # routed out of the plain TUN
PROBE_PAYLOADS = [bytes([i]) * 700 for i in range(40)] + [b"tail" * 10]


def _ones(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo(version: int, src: bytes, dst: bytes, ulen: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!BBH", 0, 17, ulen)
    return src + dst + struct.pack("!I3xB", ulen, 17)


def udp_datagram(version: int, dst: str, payload: bytes, dport: int, ip_id: int) -> bytes:
    """A complete UDP/IP packet from PROBE_REMOTE:7000 to `dst` with valid checksums."""
    src_b = ipaddress.ip_address(PROBE_REMOTE[version]).packed
    dst_b = ipaddress.ip_address(dst).packed
    ulen = 8 + len(payload)
    uh = struct.pack("!HHHH", 7000, dport, ulen, 0)
    csum = ~_ones(_pseudo(version, src_b, dst_b, ulen) + uh + payload) & 0xFFFF or 0xFFFF
    uh = uh[:6] + struct.pack("!H", csum)
    if version == 4:
        ih = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ip_id, 0x4000, 64, 17, 0, src_b, dst_b
        )
        ih = ih[:10] + struct.pack("!H", ~_ones(ih) & 0xFFFF) + ih[12:]
    else:
        ih = struct.pack("!IHBB16s16s", 0x60000000, ulen, 17, 64, src_b, dst_b)
    return ih + uh + payload


def _checked_payload(pkt: bytes) -> bytes | None:
    """The UDP payload of a forwarded packet, or None if a length or checksum is wrong."""
    version = pkt[0] >> 4
    l3 = 20 if version == 4 else 40
    if version == 4 and (
        _ones(pkt[:20]) != 0xFFFF or struct.unpack_from("!H", pkt, 2)[0] != len(pkt)
    ):
        return None
    src, dst = (pkt[12:16], pkt[16:20]) if version == 4 else (pkt[8:24], pkt[24:40])
    ulen = struct.unpack_from("!H", pkt, l3 + 4)[0]
    if ulen != len(pkt) - l3 or pkt[l3 + 6 : l3 + 8] == b"\0\0":
        return None
    if _ones(_pseudo(version, src, dst, ulen) + pkt[l3:]) != 0xFFFF:
        return None
    return pkt[l3 + 8 :]


def _write_coalesced(tun: Tun, packets: list[bytes]) -> dict[str, object]:
    items = coalesce(packets, udp=True)
    return {
        "items": len(items),
        "gso_types": [VirtioNetHdr.parse(head).gso_type for head, _ in items],
        "failed": tun.write_coalesced(items),
    }


def probe_uso(argv: Sequence[str]) -> int:
    """Write coalesced UDP_L4 packets into a TUN, per family: one to a local socket (the
    kernel cuts it on delivery) and one routed out of a second, plain TUN (the kernel cuts it
    and finishes every checksum in software); read the datagrams back from both."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--tun", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    tun = open_tun(args.tun)
    plain = open_tun(args.out, offload=False)
    out: dict[str, object] = {"offload": tun.offload}
    try:
        if tun.offload != OFFLOAD_TSO_USO:
            sys.stdout.write(json.dumps(out) + "\n")
            return 0
        for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
            with open(path, "w") as f:  # this namespace only
                f.write("1")
        tun.configure(
            [ipaddress.ip_interface(f"{PROBE_LOCAL[v]}/{24 if v == 4 else 64}") for v in (4, 6)],
            1420,
            [],
        )
        plain.configure(
            [ipaddress.ip_interface(f"{PROBE_OUT[v]}/{24 if v == 4 else 64}") for v in (4, 6)],
            1420,
            [],
        )
        for version in (4, 6):
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((PROBE_LOCAL[version], 0))
                sock.settimeout(2.0)
                port = sock.getsockname()[1]
                packets = [
                    udp_datagram(version, PROBE_LOCAL[version], p, port, 100 + i)
                    for i, p in enumerate(PROBE_PAYLOADS)
                ]
                local = _write_coalesced(tun, packets)
                got: list[bytes] = []
                with contextlib.suppress(TimeoutError):
                    while len(got) < len(PROBE_PAYLOADS):
                        data, addr = sock.recvfrom(2048)
                        if (
                            ipaddress.ip_address(addr[0])
                            == ipaddress.ip_address(PROBE_REMOTE[version])
                            and addr[1] == 7000
                        ):
                            got.append(data)
                local["payloads_equal"] = got == PROBE_PAYLOADS
            out[f"local_v{version}"] = local
            packets = [
                udp_datagram(version, PROBE_FORWARD[version], p, 9, 100 + i)
                for i, p in enumerate(PROBE_PAYLOADS)
            ]
            routed = _write_coalesced(tun, packets)
            seen: list[bytes | None] = []
            deadline = time.monotonic() + 2.0
            while len(seen) < len(PROBE_PAYLOADS) and time.monotonic() < deadline:
                for _hdr, pkt in plain.read_batch(64):
                    if pkt[0] >> 4 == version and (version == 6 or pkt[9] == 17):
                        if version == 6 and pkt[6] != 17:
                            continue  # router solicitations and the like
                        seen.append(_checked_payload(bytes(pkt)))
                time.sleep(0.01)
            routed["payloads_equal"] = seen == PROBE_PAYLOADS
            out[f"forwarded_v{version}"] = routed
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    finally:
        plain.close()
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


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_small_udp_is_coalesced_into_uso_writes(lab: Lab) -> None:
    ns_a, ns_b = lab.add_ns("a"), lab.add_ns("b")
    ip_a, ip_b = lab.link(ns_a, ns_b, subnet=77)
    a = _start(lab, ns_a, "100.64.77.1/24", f"{ip_b}:{PORT}", True)
    b = _start(lab, ns_b, "100.64.77.2/24", f"{ip_a}:{PORT}", True)
    assert ping(ns_a, "100.64.77.2", count=1), lab.logs()
    result = iperf3(ns_b, ns_a, "100.64.77.2", 3, udp=True, length=64, bitrate=str(20000 * 64 * 8))
    rx = result["end"]["sum_received"]
    _final_stats(a)
    stats_b = _final_stats(b)
    st_b = stats_b["stats"]
    assert isinstance(st_b, dict)
    print(
        f"\n[{stats_b['offload']}] iperf3 UDP 64 B, 20k pps offered for 3 s: {rx['packets']} sent,"
        f" {rx['lost_packets']} lost\n  B: {st_b}"
    )
    assert rx["packets"] > 10000
    assert rx["lost_packets"] < rx["packets"] // 2
    if stats_b["offload"] == OFFLOAD_TSO_USO:
        # iperf3 paces in bursts; each drained burst leaves in a few UDP_L4 writes
        assert st_b["rx_packets"] > 2 * st_b["tun_writes"], st_b


@pytest.mark.netns
@pytest.mark.timeout(60)
def test_kernel_takes_coalesced_udp_writes(lab: Lab) -> None:
    """One UDP_L4 GSO write per family becomes the original datagrams, in order, intact."""
    ns = lab.add_ns("u")
    cmd = [sys.executable, "-m", "tests.integration.test_tun_offload", "uso-probe"]
    proc = lab.spawn(
        ns, *cmd, "--tun", lab.ifname("us"), "--out", lab.ifname("pl"), tag="uso-probe"
    )
    deadline = time.monotonic() + 30
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.stop() == 0, proc.describe()
    result = json.loads(proc.stdout_text().strip().splitlines()[-1])
    if result["offload"] != OFFLOAD_TSO_USO:
        pytest.skip(f"the kernel refused USO on a TUN (offload {result['offload']})")
    for case in ("local_v4", "local_v6", "forwarded_v4", "forwarded_v6"):
        r = result[case]
        assert r["items"] == 1, (case, r)
        assert r["gso_types"] == [GSO_UDP_L4], (case, r)
        assert r["failed"] == 0, (case, r)
        assert r["payloads_equal"], (case, r)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve(sys.argv[2:]))
    if sys.argv[1:2] == ["uso-probe"]:
        sys.exit(probe_uso(sys.argv[2:]))
    sys.exit(
        f"usage: {sys.argv[0]} serve --tun NAME --addr CIDR --peer HOST:PORT\n"
        f"       {sys.argv[0]} uso-probe --tun NAME"
    )
