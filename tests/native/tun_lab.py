"""Inside a fresh network namespace: the C and Python tun_read/tun_write on real TUN devices.

    python -m tests.native.tun_lab IN OUT PLAIN GONE     (root, in its own namespace)

    we write ──► IN (vnet hdr, TSO/USO)  100.64.80.1/24  fd7a:115c:a1e0:80::1/64
                 │ the kernel forwards (GSO packets stay whole where the TUN takes them)
                 ├──► OUT (vnet hdr, TSO/USO)  100.64.81.1/24  fd7a:115c:a1e0:81::1/64 ──► we read
                 └──► PLAIN (no vnet hdr)      100.64.82.1/24, route 100.64.83.0/24 ──► we read
    GONE: a TUN whose link was deleted under its open fd (every read and write fails).

Every piece of traffic is made twice from the same bytes: once for the C implementation, once
for the Python one. Reads: frames written into IN, forwarded, read from OUT or PLAIN with
tun_read. Writes: tun_write into IN (or PLAIN), forwarded, read raw from OUT. Locally made
traffic: UDP_SEGMENT sends from an unconnected socket (DF, IP ID 0, so the same bytes each time)
to a host behind OUT. Locally made ICMP (router solicitations, MLD, redirects) is dropped by
nftables so nothing but our traffic reaches the TUNs. Prints one JSON object: per scenario,
whether the results were equal, a digest of the results and, when not equal, both.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.node import tun_batch
from agent.node.tun import OFFLOAD_TSO_USO, Tun, open_tun
from agent.proto.offload import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    ZERO_VNET_HDR,
    VirtioNetHdr,
)

from .packets import ACK, PSH, ip_header, ones, tcp_header

A4, A6 = "100.64.80.1", "fd7a:115c:a1e0:80::1"  # IN
R4, R6 = "100.64.80.2", "fd7a:115c:a1e0:80::2"  # sources behind IN
B4, B6 = "100.64.81.1", "fd7a:115c:a1e0:81::1"  # OUT
X4, X6, Y4 = "100.64.81.2", "fd7a:115c:a1e0:81::2", "100.64.81.3"  # hosts behind OUT
C4, C6 = "100.64.82.1", "fd7a:115c:a1e0:82::1"  # PLAIN
P4, P6, PNET = "100.64.83.2", "fd7a:115c:a1e0:82::2", "100.64.83.0/24"  # hosts behind PLAIN
S4 = "100.64.82.2"  # a source behind PLAIN


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    s, d = packed(src), packed(dst)
    if len(s) == 4:
        return ones(s + d + bytes([0, proto]) + struct.pack("!H", length))
    return ones(s + d + struct.pack("!I", length) + bytes([0, 0, 0, proto]))


def tcp(src: str, dst: str, payload: bytes, seq: int, flags: int = ACK, ip_id: int = 1) -> bytes:
    """A TCP/IP packet with valid checksums."""
    version = 4 if ":" not in src else 6
    th = tcp_header(seq, flags)
    csum = ~ones(th + payload, pseudo_sum(src, dst, 6, len(th) + len(payload))) & 0xFFFF
    th = th[:16] + struct.pack("!H", csum) + th[18:]
    ih = ip_header(
        version, len(th) + len(payload), 6, ip_id=ip_id, src=packed(src), dst=packed(dst)
    )
    return ih + th + payload


def udp(src: str, dst: str, payload: bytes, ip_id: int = 1) -> bytes:
    version = 4 if ":" not in src else 6
    uh = struct.pack("!HHHH", 7000, 9, 8 + len(payload), 0)
    csum = ~ones(uh + payload, pseudo_sum(src, dst, 17, 8 + len(payload))) & 0xFFFF or 0xFFFF
    uh = uh[:6] + struct.pack("!H", csum)
    ih = ip_header(version, 8 + len(payload), 17, ip_id=ip_id, src=packed(src), dst=packed(dst))
    return ih + uh + payload


def tso(src: str, dst: str, size: int, mss: int, seq: int = 1000) -> bytes:
    """vnet header + TCP super-packet as the kernel takes it (partial sum in the field)."""
    version = 4 if ":" not in src else 6
    payload = bytes((i * 7) & 0xFF for i in range(size))
    th = tcp_header(seq, ACK | PSH)
    th = th[:16] + struct.pack("!H", pseudo_sum(src, dst, 6, len(th) + size)) + th[18:]
    ih = ip_header(version, len(th) + size, 6, src=packed(src), dst=packed(dst))
    gso = GSO_TCPV4 if version == 4 else GSO_TCPV6
    hdr = VirtioNetHdr(F_NEEDS_CSUM, gso, len(ih) + len(th), mss, len(ih), 16)
    return hdr.encode() + ih + th + payload


def uso(src: str, dst: str, size: int, mss: int) -> bytes:
    version = 4 if ":" not in src else 6
    payload = bytes((i * 3) & 0xFF for i in range(size))
    uh = struct.pack("!HHHH", 7000, 9, 8 + size, pseudo_sum(src, dst, 17, 8 + size))
    ih = ip_header(version, 8 + size, 17, src=packed(src), dst=packed(dst))
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_UDP_L4, len(ih) + 8, mss, len(ih), 6)
    return hdr.encode() + ih + uh + payload


# --------------------------------------------------------------------------- plumbing


def sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/{name.replace('.', '/')}", "w") as f:
        f.write(value)


def raw_drain(fd: int) -> list[bytes]:
    out = []
    while True:
        try:
            data = os.read(fd, 0x20000)
        except BlockingIOError:
            return out
        if not data:
            return out
        out.append(data)


def settle(fd: int) -> None:
    """The kernel forwards a TUN write before the write returns; wait for readability anyway
    and give a straggler a moment."""
    select.select([fd], [], [], 2.0)
    time.sleep(0.05)


def comparable(result: Sequence[Any]) -> list[Any]:
    *rest, error = result
    return [*rest, None if error is None else [type(error).__name__, error.errno]]


def digest(value: Any) -> Any:
    """A JSON-able account of a result: bytes as their length and a short prefix."""
    if isinstance(value, bytes):
        return f"{len(value)}:{value[:12].hex()}"
    if isinstance(value, list | tuple):
        return [digest(v) for v in value]
    return value


def compare(name: str, run: Callable[[Any], Any]) -> dict[str, Any]:
    from agent import _fastpath

    native = run(_fastpath)
    python = run(tun_batch)
    entry: dict[str, Any] = {"equal": native == python, "result": digest(native)}
    if native != python:
        entry["python"] = digest(python)
    return {name: entry}


# --------------------------------------------------------------------------- scenarios


def main(argv: Sequence[str]) -> int:
    in_name, out_name, plain_name, gone_name = argv
    for name, value in (
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.send_redirects", "0"),
    ):
        sysctl(name, value)
    subprocess.run(
        [
            "nft",
            "add table inet tunlab; "
            "add chain inet tunlab out { type filter hook output priority 0; }; "
            "add rule inet tunlab out meta l4proto { icmp, ipv6-icmp } drop",
        ],
        check=True,
    )
    tin, tout = open_tun(in_name), open_tun(out_name)
    plain, gone = open_tun(plain_name, offload=False), open_tun(gone_name, offload=False)
    try:
        net = ipaddress.ip_network
        iface = ipaddress.ip_interface
        tin.configure([iface(f"{A4}/24"), iface(f"{A6}/64")], 1500, [])
        tout.configure([iface(f"{B4}/24"), iface(f"{B6}/64")], 1500, [])
        plain.configure([iface(f"{C4}/24"), iface(f"{C6}/64")], 1500, [net(PNET)])
        gone.configure([], 1500, [])
        result: dict[str, Any] = {"offload": [tin.offload, tout.offload]}
        time.sleep(0.3)
        for t in (tin, tout, plain):
            raw_drain(t.fd)
        result.update(scenarios(tin, tout, plain, gone))
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    finally:
        for t in (tin, tout, plain, gone):
            t.close()


def scenarios(tin: Tun, tout: Tun, plain: Tun, gone: Tun) -> dict[str, Any]:
    uso_ok = tin.offload == OFFLOAD_TSO_USO and tout.offload == OFFLOAD_TSO_USO
    frames = [
        tso(R4, X4, 20000, 1400),
        tso(R4, X4, 64000, 1448, seq=0xFFFFF000),
        ZERO_VNET_HDR + udp(R4, X4, b"one"),
        ZERO_VNET_HDR + udp(R4, Y4, b"two"),
        tso(R6, X6, 30000, 1220),
        ZERO_VNET_HDR + tcp(R6, X6, b"alone", 5),
        ZERO_VNET_HDR + tcp(R4, X4, bytes(1401), 9, ip_id=3),
    ]
    if uso_ok:
        frames += [uso(R4, X4, 12000, 1000), uso(R6, X6, 5001, 500)]
    out: dict[str, Any] = {}

    to_plain = [
        tso(R4, P4, 20000, 1400),
        ZERO_VNET_HDR + udp(R4, P4, b"one"),
        tso(R6, P6, 9000, 1000),
        ZERO_VNET_HDR + udp(R4, P4, b"two"),
    ]

    def read_forwarded(impl: Any, dest: Tun, vnet: bool) -> Any:
        raw_drain(dest.fd)
        for f in frames if vnet else to_plain:
            os.write(tin.fd, f)
        settle(dest.fd)
        return comparable(impl.tun_read(dest.fd, 1000, vnet))

    out |= compare("read_vnet", lambda impl: read_forwarded(impl, tout, True))
    out |= compare("read_small_batches", lambda impl: _read_in_fours(impl, tin, tout, frames))
    out |= compare("read_plain", lambda impl: read_forwarded(impl, plain, False))

    def read_local(impl: Any) -> Any:
        raw_drain(tout.fd)
        for family, src, dst in ((socket.AF_INET, B4, X4), (socket.AF_INET6, B6, X6)):
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((src, 4000))
                s.setsockopt(socket.IPPROTO_UDP, 103, 1000)  # UDP_SEGMENT
                if family == socket.AF_INET:  # DF: IP ID 0 on an unconnected socket
                    s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER, IP_PMTUDISC_DO
                s.sendto(bytes(range(256)) * 40, (dst, 9))  # 10 datagrams of 1000 + 240
        settle(tout.fd)
        return comparable(impl.tun_read(tout.fd, 1000, True))

    out |= compare("read_local_udp_gso", read_local)

    segs4 = [tcp(R4, X4, bytes([i]) * 1000, 1 + 1000 * i, ip_id=i) for i in range(30)]
    segs6 = [tcp(R6, X6, bytes([i]) * 1200, 7 + 1200 * i) for i in range(20)]
    dgrams = [udp(R4, X4, bytes([i]) * 700, ip_id=i) for i in range(20)] + [udp(R4, X4, b"end")]
    odd = [b"\x50" + bytes(40), b"", udp(R6, X6, b"six")]
    batch = segs4[:15] + dgrams[:10] + segs6 + odd + segs4[15:] + dgrams[10:]

    def write_into(impl: Any, src: Tun, packets: list[bytes], vnet: bool, udp: bool) -> Any:
        raw_drain(tout.fd)
        res = impl.tun_write(src.fd, packets, vnet, udp)
        settle(tout.fd)
        return [list(res), raw_drain(tout.fd)]

    out |= compare("write_coalesced", lambda impl: write_into(impl, tin, batch, True, uso_ok))
    out |= compare("write_tcp_only", lambda impl: write_into(impl, tin, batch, True, False))
    out |= compare("write_one", lambda impl: write_into(impl, tin, segs4[:1], True, True))
    plain_batch = [tcp(S4, X4, bytes([i]) * 900, 5 + 900 * i) for i in range(8)] + odd[:2]
    out |= compare("write_plain", lambda impl: write_into(impl, plain, plain_batch, False, False))

    subprocess.run(["ip", "link", "del", gone.name], check=True)
    out |= compare("read_gone", lambda impl: comparable(impl.tun_read(gone.fd, 8, False)))
    out |= compare("write_gone", lambda impl: list(impl.tun_write(gone.fd, segs4, False, False)))
    return out


def _read_in_fours(impl: Any, tin: Tun, tout: Tun, frames: list[bytes]) -> Any:
    """The same frames read 4 at a time: runs and counts per call."""
    raw_drain(tout.fd)
    for f in frames:
        os.write(tin.fd, f)
    settle(tout.fd)
    calls = []
    while True:
        res = comparable(impl.tun_read(tout.fd, 4, True))
        calls.append(res)
        if res[2] == 0:
            return calls


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
