"""Packet and batch builders (hypothesis strategies) shared by the native differential tests.

Checksums are left as the builders make them: segmentation and coalescing never read them
(segmentation recomputes, coalescing writes a partial sum), and the two implementations must
agree on whatever bytes come in.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from agent.proto.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    VirtioNetHdr,
)

SRC4 = bytes([100, 64, 0, 1])
DST4 = bytes([100, 64, 0, 2])
SRC6 = bytes.fromhex("fd7a115ca1e000000000000000000001")
DST6 = bytes.fromhex("fd7a115ca1e000000000000000000002")

ACK, PSH, FIN, SYN, RST, URG, CWR = 0x10, 0x08, 0x01, 0x02, 0x04, 0x20, 0x80


def ones(data: bytes, initial: int = 0) -> int:
    """RFC 1071 sum, word by word (an independent helper for valid test packets)."""
    if len(data) % 2:
        data += b"\0"
    total = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo(version: int, proto: int, length: int) -> int:
    if version == 4:
        return ones(SRC4 + DST4 + bytes([0, proto]) + struct.pack("!H", length))
    return ones(SRC6 + DST6 + struct.pack("!I", length) + bytes([0, 0, 0, proto]))


def ip_header(
    version: int,
    l4len: int,
    proto: int,
    *,
    ip_id: int = 0x1234,
    opts: bytes = b"",
    tos: int = 0,
    ttl: int = 64,
    frag: int = 0x4000,
    flow: int = 0,
    src: bytes | None = None,
    dst: bytes | None = None,
    ext: bytes = b"",
) -> bytes:
    """IPv4 (with `opts`) or IPv6 (with extension headers `ext`, each 8 bytes, hop-by-hop)."""
    if version == 4:
        ihl = 5 + len(opts) // 4
        h = struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            tos,
            (ihl * 4 + l4len) & 0xFFFF,
            ip_id,
            frag,
            ttl,
            proto,
            0,
            src or SRC4,
            dst or DST4,
        )
        h += opts
        return h[:10] + struct.pack("!H", ~ones(h) & 0xFFFF) + h[12:]
    nxt = proto
    chain = b""
    for _ in range(len(ext) // 8):  # hop-by-hop headers, each pointing at the next
        chain = bytes([nxt, 0]) + bytes(6) + chain
        nxt = 0
    vtcfl = 0x60000000 | (tos << 20) | (flow & 0xFFFFF)
    return (
        struct.pack(
            "!IHBB16s16s",
            vtcfl,
            (len(chain) + l4len) & 0xFFFF,
            nxt,
            ttl,
            src or SRC6,
            dst or DST6,
        )
        + chain
    )


def tcp_header(
    seq: int,
    flags: int,
    *,
    opts: bytes = b"",
    ack: int = 777,
    ports: tuple[int, int] = (40000, 5201),
    window: int = 500,
) -> bytes:
    doff = (20 + len(opts)) // 4
    return (
        struct.pack("!HHIIBBHHH", *ports, seq & 0xFFFFFFFF, ack, doff << 4, flags, window, 0, 0)
        + opts
    )


def tcp_packet(version: int, payload: bytes, seq: int, flags: int = ACK, **kw: object) -> bytes:
    """A TCP/IP packet (TCP checksum left 0). Keywords: tcp_header's, then ip_header's."""
    tkw = {k: kw.pop(k) for k in ("opts", "ack", "ports", "window") if k in kw}
    ikw = {("opts" if k == "ip_opts" else k): v for k, v in kw.items()}
    th = tcp_header(seq, flags, **tkw)
    return ip_header(version, len(th) + len(payload), 6, **ikw) + th + payload


def udp_packet(
    version: int, payload: bytes, ports: tuple[int, int] = (5353, 9999), **kw: object
) -> bytes:
    uh = struct.pack("!HHHH", *ports, 8 + len(payload), 0)
    return ip_header(version, 8 + len(payload), 17, **kw) + uh + payload


# --------------------------------------------------------------------------- super-packets


@dataclass
class Super:
    hdr: bytes
    packet: bytes


@st.composite
def super_packets(draw: st.DrawFn) -> Super:
    """A TSO/USO super-packet as the kernel hands it over (partial checksum in the field, or a
    complete packet with GSO and no NEEDS_CSUM), with random sizes, MSS, options and flags."""
    version = draw(st.sampled_from([4, 6]))
    udp = draw(st.booleans())
    ip_opts = bytes(4 * draw(st.integers(0, 10))) if version == 4 and draw(st.booleans()) else b""
    ext = bytes(8 * draw(st.integers(0, 2))) if version == 6 and draw(st.booleans()) else b""
    tcp_opts = b"" if udp else bytes([1]) * (4 * draw(st.integers(0, 10)))
    l3 = (20 + len(ip_opts)) if version == 4 else 40 + len(ext)
    l4 = 8 if udp else 20 + len(tcp_opts)
    room = 0xFFFF - l3 - l4
    size = draw(
        st.one_of(
            st.integers(0, 3000),
            st.integers(0, room),
            st.just(room),
            st.integers(room + 1, room + 64),  # longer than 64 KB: malformed
        )
    )
    mss = draw(st.one_of(st.integers(1, 64), st.integers(500, 1500), st.integers(1, 0xFFFF)))
    if size // mss > 4000:  # keep the reference's work per example bounded
        mss = max(1, size // 4000)
    payload = random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(size)
    ikw = {
        "ip_id": draw(st.integers(0, 0xFFFF)),
        "tos": draw(st.integers(0, 255)),
        "ttl": draw(st.integers(1, 255)),
        "ext": ext,
    }
    proto = 17 if udp else 6
    if udp:
        l4h = struct.pack("!HHHH", 5353, 9999, (8 + size) & 0xFFFF, 0)
    else:
        flags = draw(st.one_of(st.just(ACK | PSH), st.integers(0, 255)))
        l4h = tcp_header(draw(st.integers(0, 0xFFFFFFFF)), flags, opts=tcp_opts)
    ih = ip_header(version, len(l4h) + size, proto, opts=ip_opts, **ikw)
    needs_csum = draw(st.booleans()) or draw(st.booleans())
    field = 6 if udp else 16
    if needs_csum:
        partial = pseudo(version, proto, (len(l4h) + size) & 0xFFFF)
        l4h = l4h[:field] + struct.pack("!H", partial) + l4h[field + 2 :]
    gso = GSO_UDP_L4 if udp else (GSO_TCPV4 if version == 4 else GSO_TCPV6)
    if draw(st.integers(0, 9)) == 0:
        gso |= 0x80  # the ECN bit
    hdr = VirtioNetHdr(
        flags=F_NEEDS_CSUM if needs_csum else 0,
        gso_type=gso,
        hdr_len=len(ih) + len(l4h),
        gso_size=mss,
        csum_start=len(ih) if needs_csum else 0,
        csum_offset=field if needs_csum else 0,
    )
    return Super(hdr.encode(), ih + l4h + payload)


@st.composite
def single_packets(draw: st.DrawFn) -> Super:
    """GSO_NONE: a plain packet, or one with NEEDS_CSUM (what complete_checksum finishes)."""
    version = draw(st.sampled_from([4, 6]))
    udp = draw(st.booleans())
    payload = random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(
        draw(st.one_of(st.integers(0, 1500), st.integers(1000, 9000)))
    )
    pkt = (
        udp_packet(version, payload)
        if udp
        else tcp_packet(version, payload, draw(st.integers(0, 0xFFFFFFFF)))
    )
    l3 = 20 if version == 4 else 40
    proto = 17 if udp else 6
    field = 6 if udp else 16
    if draw(st.booleans()):  # the kernel's partial sum in the field
        l4len = len(pkt) - l3
        pkt = (
            pkt[: l3 + field]
            + struct.pack("!H", pseudo(version, proto, l4len))
            + pkt[l3 + field + 2 :]
        )
    if draw(st.booleans()):  # sums to zero: UDP gets 0xFFFF, TCP keeps 0
        pkt = pkt[: l3 + 8] + bytes(len(pkt) - l3 - 8)
    needs = draw(st.booleans())
    start = draw(st.one_of(st.just(l3), st.integers(0, len(pkt) + 2)))
    offset = draw(st.one_of(st.just(field), st.integers(0, 0xFFFF)))
    hdr = VirtioNetHdr(
        flags=(F_NEEDS_CSUM if needs else 0) | draw(st.sampled_from([0, 2])),
        gso_type=draw(st.sampled_from([GSO_NONE, GSO_NONE, 0x80])),
        csum_start=start if needs else 0,
        csum_offset=offset if needs else 0,
    )
    return Super(hdr.encode(), pkt)


@st.composite
def corrupted(draw: st.DrawFn, base: st.SearchStrategy[Super]) -> Super:
    """A super-packet with a few header bytes (vnet, IP, transport) changed, or truncated."""
    sp = draw(base)
    hdr = bytearray(sp.hdr)
    pkt = bytearray(sp.packet)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["vnet", "head", "any", "cut", "grow"]))
        if where == "vnet":
            hdr[draw(st.integers(0, 9))] = draw(st.integers(0, 255))
        elif where == "head" and pkt:
            pkt[draw(st.integers(0, min(len(pkt), 120) - 1))] = draw(st.integers(0, 255))
        elif where == "any" and pkt:
            pkt[draw(st.integers(0, len(pkt) - 1))] = draw(st.integers(0, 255))
        elif where == "cut":
            del pkt[draw(st.integers(0, len(pkt))) :]
        else:
            pkt += bytes(draw(st.integers(1, 9)))
    return Super(bytes(hdr), bytes(pkt))


def any_segment_input() -> st.SearchStrategy[Super]:
    raw = st.builds(Super, st.binary(min_size=0, max_size=12), st.binary(max_size=300))
    vnet_raw = st.builds(
        Super,
        st.tuples(
            st.sampled_from([0, 1, 3]), st.sampled_from([0, 1, 4, 5, 0x81, 0x85, 2, 3, 255])
        ).flatmap(lambda t: st.binary(min_size=8, max_size=8).map(lambda b: bytes(t) + b)),
        st.binary(max_size=400),
    )
    return st.one_of(
        super_packets(),
        single_packets(),
        corrupted(super_packets()),
        corrupted(single_packets()),
        raw,
        vnet_raw,
    )


# --------------------------------------------------------------------------- batches


@dataclass
class _Flow:
    version: int
    udp: bool
    ports: tuple[int, int]
    seq: int
    mss: int
    ikw: dict[str, object]
    tcp_opts: bytes


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    """What the tunnel hands the TUN writer: a few TCP and UDP flows interleaved (in-order
    runs, with the odd gap, repeat, flag, shape change, short segment), odd packets between
    them, some packets damaged or padded."""
    flows = []
    for _ in range(draw(st.integers(1, 4))):
        version = draw(st.sampled_from([4, 6]))
        ikw: dict[str, object] = {}
        if version == 4 and draw(st.integers(0, 7)) == 0:
            ikw["ip_opts"] = bytes(4)
        if draw(st.integers(0, 5)) == 0:
            ikw["frag"] = draw(st.sampled_from([0, 0x2000, 0x0001, 0x8000]))
        flows.append(
            _Flow(
                version=version,
                udp=draw(st.booleans()),
                ports=(draw(st.integers(1000, 1003)), 443),
                seq=draw(st.integers(0, 0xFFFFFFFF)),
                mss=draw(st.one_of(st.integers(1, 40), st.integers(1200, 1400))),
                ikw=ikw,
                tcp_opts=bytes([1, 1, 8, 10]) + bytes(8) if draw(st.booleans()) else b"",
            )
        )
    out: list[bytes] = []
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(0, 80))):
        f = flows[draw(st.integers(0, len(flows) - 1))]
        twist = draw(st.integers(0, 30))
        size = f.mss if twist > 4 else draw(st.integers(0, f.mss + 2))
        payload = rng.randbytes(size)
        ikw = dict(f.ikw)
        if twist == 1:
            ikw["ttl"] = 3
        if f.udp:
            out.append(
                udp_packet(
                    f.version,
                    payload,
                    ports=f.ports,
                    **{("opts" if k == "ip_opts" else k): v for k, v in ikw.items()},
                )
            )
            continue
        flags = ACK
        if twist == 2:
            flags |= PSH
        elif twist == 3:
            flags = draw(st.sampled_from([SYN, FIN | ACK, RST, URG | ACK, CWR | ACK, 0]))
        seq = f.seq
        if twist == 4:
            seq += draw(st.sampled_from([-size, size, 1]))
        out.append(
            tcp_packet(f.version, payload, seq, flags, opts=f.tcp_opts, ports=f.ports, **ikw)
        )
        f.seq = (seq + size) & 0xFFFFFFFF
        if draw(st.integers(0, 12)) == 0:
            out.append(rng.randbytes(draw(st.integers(0, 70))))
    for _ in range(draw(st.integers(0, 3))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        pkt = bytearray(out[i])
        how = draw(st.integers(0, 2))
        if how == 0 and pkt:
            pkt[draw(st.integers(0, min(len(pkt), 64) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif how == 1:
            del pkt[draw(st.integers(0, len(pkt))) :]
        else:
            pkt += bytes(draw(st.integers(1, 15)))  # trailing bytes past the IP length
        out[i] = bytes(pkt)
    return out
