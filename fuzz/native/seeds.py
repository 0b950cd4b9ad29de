"""Seed inputs for the libFuzzer harnesses of fuzz/native/, in each harness's input layout.

    python3 fuzz/native/seeds.py TARGET DIR     writes DIR/seed-<n> for TARGET segment,
                                                checksum or coalesce (nothing for a target
                                                without seeds here); nothing to install

Built by code (plain struct, no repository imports) so no binary corpus lives in git: TSO and
USO super-packets for IPv4 and IPv6, IPv4 options, an IPv6 extension header, NEEDS_CSUM
singles, and batches of in-order TCP segments and equal UDP datagrams of a few flows.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

SRC4, DST4 = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])
SRC6, DST6 = bytes(15) + b"\x01", bytes(15) + b"\x02"


def ip(version: int, l4len: int, proto: int, opts: bytes = b"", ext: bool = False) -> bytes:
    if version == 4:
        ihl = 5 + len(opts) // 4
        total = ihl * 4 + l4len
        return (
            struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 7, 0x4000, 64, proto, 0, SRC4, DST4)
            + opts
        )
    if ext:
        hop = bytes([proto, 0]) + bytes(6)
        return struct.pack("!IHBB16s16s", 6 << 28, 8 + l4len, 0, 64, SRC6, DST6) + hop
    return struct.pack("!IHBB16s16s", 6 << 28, l4len, proto, 64, SRC6, DST6)


def tcp(seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    return struct.pack("!HHIIBBHHH", 1000, 2000, seq, 1, 5 << 4, flags, 65535, 0, 0) + payload


def udp(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload


def vnet(flags: int, gso: int, hdr_len: int, mss: int, start: int, offset: int) -> bytes:
    return struct.pack("<BBHHHH", flags, gso, hdr_len, mss, start, offset)


def segment_seeds() -> list[bytes]:
    body = bytes(range(256)) * 24
    out = []
    for version, gso in ((4, 1), (6, 4)):
        t = tcp(1, body, 0x18)
        pkt = ip(version, len(t), 6) + t
        l3 = 20 if version == 4 else 40
        out.append(vnet(1, gso, l3 + 20, 1400, l3, 16) + pkt)
        u = udp(body[:3000])
        out.append(vnet(1, 5, l3 + 8, 1000, l3, 6) + ip(version, len(u), 17) + u)
    t = tcp(9, body[:2000])
    out.append(vnet(0, 4, 0, 500, 0, 0) + ip(6, len(t), 6, ext=True) + t)
    out.append(vnet(0, 1, 0, 700, 0, 0) + ip(4, len(t), 6, opts=bytes(8)) + t)
    u = udp(b"x" * 100)
    out.append(vnet(1, 0, 0, 0, 20, 6) + ip(4, len(u), 17) + u)
    out.append(vnet(0, 0, 0, 0, 0, 0) + ip(6, len(u), 17) + u)
    return out


def checksum_seeds() -> list[bytes]:
    t = tcp(5, bytes(range(200)))
    u = udp(b"\xff" * 33)
    return [
        bytes([0]) + struct.pack("<HH", 20, 16) + b"\x01" + ip(4, len(t), 6) + t,
        bytes([3]) + struct.pack("<HH", 40, 6) + b"\x01" + ip(6, len(u), 17) + u,
        bytes([5]) + struct.pack("<HH", 20, 6) + b"\x00" + ip(4, 8, 17) + udp(b""),
    ]


def batch(udp_on: bool, packets: list[bytes]) -> bytes:
    return bytes([udp_on]) + b"".join(struct.pack("<H", len(p)) + p for p in packets)


def coalesce_seeds() -> list[bytes]:
    segs4 = [ip(4, 20 + 100, 6) + tcp(1 + 100 * i, bytes([i]) * 100) for i in range(8)]
    segs6 = [ip(6, 20 + 60, 6) + tcp(5 + 60 * i, bytes([i]) * 60) for i in range(5)]
    dgrams = [ip(4, 8 + 50, 17) + udp(bytes(50)) for _ in range(6)]
    dgrams6 = [ip(6, 8 + 30, 17) + udp(bytes(30)) for _ in range(4)]
    mixed = [segs4[0], dgrams[0], segs6[0], segs4[1], dgrams[1], segs6[1], dgrams6[0]]
    return [
        batch(False, segs4),
        batch(True, dgrams + dgrams6),
        batch(True, mixed),
        batch(False, segs6 + segs4[:3]),
    ]


SEEDS = {"segment": segment_seeds, "checksum": checksum_seeds, "coalesce": coalesce_seeds}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: seeds.py {{{','.join(SEEDS)}}} DIR\n")
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(SEEDS[argv[0]]() if argv[0] in SEEDS else []):
        (out / f"seed-{i}").write_bytes(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
