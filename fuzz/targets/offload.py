"""TUN offload arithmetic on arbitrary IP headers: segment (TX) and coalesce (RX).

Contract (agent/proto/offload): segment raises only MalformedPacket for inconsistent
headers; coalesce takes any packets. Invariants: the numpy and pure-Python segmentation paths
give the same packets; every GSO item coalesce builds is accepted by segment and cut back into
as many packets as it merged; when agent._fastpath is built, its segment and coalesce give the
same bytes (and the same MalformedPacket message).

Input: mode byte; 0/1: a 10-byte virtio_net_hdr then the packet (segment); 2/3: packets
(u16 length + bytes each) for coalesce, with UDP coalescing for mode 3.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from agent.proto.errors import MalformedPacket
from agent.proto.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    VNET_HDR_LEN,
    VirtioNetHdr,
    coalesce,
    segment,
)
from fuzz.common import Data, Seed, check, tag

try:
    from agent import _fastpath as native
except ImportError:  # not built: the reference alone
    native = None

SRC4, DST4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
SRC6, DST6 = bytes(15) + b"\x01", bytes(15) + b"\x02"


def tcp4(seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, seq, 1, 5 << 4, flags, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, SRC4, DST4)
    return ip + tcp + payload


def tcp6(seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 1000, 2000, seq, 1, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, SRC6, DST6)
    return ip + tcp + payload


def udp4(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0)
    total = 20 + 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0, SRC4, DST4)
    return ip + udp + payload


def _bytes(items: Sequence[bytes | bytearray | memoryview]) -> list[bytes]:
    return [bytes(x) for x in items]


class Harness:
    name = "offload"
    contract = "MalformedPacket (segment); coalesce never raises"
    dictionary = (b"\x45\x00", b"\x60\x00\x00\x00", b"\x06", b"\x11", b"\x50\x10", b"\x50\x18",
                  b"\x01\x01", b"\x01\x04", b"\x01\x05", b"\x00\x10", b"\x00\x06")  # fmt: skip

    def run(self, data: bytes) -> str:
        d = Data(data)
        mode = d.byte() & 3
        if mode < 2:
            raw = d.take(VNET_HDR_LEN).ljust(VNET_HDR_LEN, b"\0")
            hdr = VirtioNetHdr.parse(raw)
            packet = d.rest()
            try:
                pure = segment(hdr, packet, vectorise=False)
            except MalformedPacket as exc:
                try:
                    segment(hdr, packet, vectorise=True)
                except MalformedPacket:
                    if native is not None:
                        try:
                            native.segment(raw, packet)
                        except MalformedPacket as nexc:
                            check(str(nexc) == str(exc), f"C refuses with {nexc}, not {exc}")
                        else:
                            raise AssertionError("only the Python twin refused") from exc
                    return tag(exc)
                raise AssertionError("only the pure path refused the packet") from exc
            vec = segment(hdr, packet, vectorise=True)
            check(_bytes(pure) == _bytes(vec), "numpy and pure segmentation differ")
            if native is not None:
                check(native.segment(raw, packet) == _bytes(pure), "C and Python segments differ")
            return f"seg:{hdr.gso_type}:{min(len(pure), 9)}"
        packets = d.chunks(128)
        items = coalesce(packets, udp=mode == 3)
        if native is not None:
            joined = [head + b"".join(bytes(p) for p in bufs) for head, bufs in items]
            check(native.coalesce(packets, mode == 3) == joined, "C and Python coalescing differ")
        merged = 0
        for head, payloads in items:
            hdr = VirtioNetHdr.parse(head)
            if hdr.gso_type == GSO_NONE:
                check(len(payloads) == 1 and head[:VNET_HDR_LEN] == bytes(10), "plain item")
                continue
            merged += 1
            check(hdr.flags & F_NEEDS_CSUM != 0, "GSO item without NEEDS_CSUM")
            check(hdr.gso_type in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4), "odd gso_type")
            whole = bytes(head[VNET_HDR_LEN:]) + b"".join(bytes(p) for p in payloads)
            try:
                segs = segment(hdr, whole)
            except MalformedPacket as exc:
                raise AssertionError(f"segment refuses a coalesced packet: {exc}") from exc
            check(len(segs) == len(payloads), f"{len(payloads)} merged, {len(segs)} cut back")
        return f"co:{mode}:{min(merged, 5)}:{min(len(items), 5)}"

    def seeds(self) -> list[bytes]:
        mss = 100
        data = bytes(range(256)) * 4
        tso = tcp4(1, data)
        gso = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 40, mss, 20, 16).encode()
        gso6 = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV6, 60, mss, 40, 16).encode()
        uso = VirtioNetHdr(F_NEEDS_CSUM, GSO_UDP_L4, 28, mss, 20, 6).encode()
        csum = VirtioNetHdr(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16).encode()
        seq4 = [tcp4(1 + i * mss, data[:mss]) for i in range(5)] + [tcp4(501, data[:40], 0x18)]
        seq6 = [tcp6(1 + i * mss, data[:mss]) for i in range(4)]
        udps = [udp4(data[:200])] * 4 + [udp4(data[:50])]
        return [
            Seed().byte(0).raw(gso).raw(tso).build(),
            Seed().byte(1).raw(gso6).raw(tcp6(1, data[:700])).build(),
            Seed().byte(0).raw(uso).raw(udp4(data[:900])).build(),
            Seed().byte(0).raw(csum).raw(tcp4(1, data[:64])).build(),
            Seed().byte(2).chunks(seq4).build(),
            Seed().byte(2).chunks(seq6 + seq4[:2]).build(),
            Seed().byte(3).chunks(udps + seq4[:3]).build(),
        ]
