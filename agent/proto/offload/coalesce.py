"""RX: packets from the tunnel grouped into GSO packets for TUN writes.

`coalesce()` merges consecutive in-order TCP segments of one flow into one GSO packet whose
TCP checksum field holds the pseudo-header partial sum (CHECKSUM_PARTIAL), so the TUN takes a
whole window of data in one `writev`. With `udp=True` (the TUN took USO) it does the same for
UDP: consecutive equal-size datagrams of one flow become one UDP_L4 GSO packet (`gso_size` =
payload length, the last datagram may be shorter), which the kernel cuts back into the original
datagrams; one TUN write instead of one per datagram.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from agent.proto.offload.checksum import addr_sum, checksum_fold, internet_sum
from agent.proto.offload.fields import (
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_CWR,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    U16,
)
from agent.proto.offload.vnet import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    TCP_CSUM_OFFSET,
    UDP_CSUM_OFFSET,
    VNET_HDR,
    ZERO_VNET_HDR,
    Buffer,
    VirtioNetHdr,
)

__all__ = [
    "MAX_COALESCED_LEN",
    "MAX_COALESCED_SEGMENTS",
    "MAX_UDP_SEGMENTS",
    "coalesce",
]

# An IP length field is 16 bits: a coalesced IPv4 packet (or IPv6 payload) stays within it.
MAX_COALESCED_LEN: Final = 0xFFFF
# One writev carries the header plus one iovec per segment; stay well under IOV_MAX (1024).
MAX_COALESCED_SEGMENTS: Final = 256
# The kernel refuses a UDP_L4 GSO packet of more than UDP_MAX_SEGMENTS datagrams (64 before
# Linux 6.9, 128 since): stay at the lower limit.
MAX_UDP_SEGMENTS: Final = 64


class _Group:
    """An open run of TCP segments of one flow being merged into one GSO packet."""

    __slots__ = (
        "closed",
        "first",
        "hlen",
        "l3len",
        "mss",
        "next_seq",
        "payloads",
        "psh",
        "shape",
        "total",
    )

    def __init__(
        self, first: Buffer, l3len: int, hlen: int, mss: int, seq: int, shape: tuple[object, ...]
    ) -> None:
        self.first = first
        self.shape = shape
        self.l3len = l3len
        self.hlen = hlen
        self.mss = mss
        self.next_seq = (seq + mss) & 0xFFFFFFFF
        self.total = hlen + mss
        # up to the IP length: bytes after it (padding) are no part of the stream
        self.payloads: list[Buffer] = [memoryview(first)[hlen : hlen + mss]]
        self.psh = False
        self.closed = mss == 0


_TCP4 = struct.Struct("!xBHxxHBBxx8sHHIIBB")  # IPv4 (no options) + TCP up to flags
_TCP6 = struct.Struct("!IHBB32sHHIIBB")  # IPv6 + TCP up to flags
_TCP4_AFTER_IP = struct.Struct("!HHIIBB")

# Flow identity (addresses, ports) and the header fields that must be equal to merge.
_FlowKey = tuple[bytes, int, int]


class _Info:
    __slots__ = ("flags", "hlen", "key", "l3len", "mergeable", "plen", "seq", "shape")

    def __init__(
        self,
        key: _FlowKey,
        shape: tuple[object, ...],
        l3len: int,
        hlen: int,
        seq: int,
        plen: int,
        flags: int,
        mergeable: bool,
    ) -> None:
        self.key = key
        self.shape = shape
        self.l3len = l3len
        self.hlen = hlen
        self.seq = seq
        self.plen = plen
        self.flags = flags
        self.mergeable = mergeable


def _tcp_segment_info(pkt: Buffer) -> _Info | None:
    """Flow, shape and sequence facts of a TCP packet; None for anything else.

    A TCP packet that may not be merged (SYN/FIN/RST/URG/CWR, IPv4 options, fragments) still
    gets its flow key, so it closes the open run of its flow and order is kept.
    """
    n = len(pkt)
    if n < 40:
        return None
    b0 = pkt[0]
    if b0 == 0x45:
        tos, iplen, frag, ttl, proto, addrs, sport, dport, seq, ack, doff, flags = (
            _TCP4.unpack_from(pkt)
        )
        if proto != PROTO_TCP:
            return None
        l3len = 20
        frag_ok = frag & 0x3FFF == 0
        ipshape: tuple[int, ...] = (tos, ttl, frag)
    elif b0 >> 4 == 6:
        if n < 60:
            return None
        vtcfl, plen6, nxt, ttl, addrs, sport, dport, seq, ack, doff, flags = _TCP6.unpack_from(pkt)
        if nxt != PROTO_TCP:
            return None
        iplen = 40 + plen6
        l3len = 40
        frag_ok = True
        ipshape = (vtcfl, ttl)
    elif b0 >> 4 == 4:
        if pkt[9] != PROTO_TCP:
            return None
        l3len = (b0 & 0x0F) * 4
        if l3len < 20 or l3len + 20 > n:
            return None
        iplen = (pkt[2] << 8) | pkt[3]
        addrs = bytes(pkt[12:20])
        sport, dport, seq, ack, doff, flags = _TCP4_AFTER_IP.unpack_from(pkt, l3len)
        frag_ok = False
        ipshape = ()
    else:
        return None
    thlen = (doff >> 4) * 4
    hlen = l3len + thlen
    if iplen > n or thlen < 20 or hlen > iplen:
        return None
    opts = bytes(pkt[l3len + 20 : hlen]) if thlen > 20 else b""
    mergeable = (
        frag_ok
        and not flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR)
        and flags & TCP_ACK != 0
    )
    shape = (*ipshape, ack, doff, flags & ~TCP_PSH, opts)
    return _Info((addrs, sport, dport), shape, l3len, hlen, seq, iplen - hlen, flags, mergeable)


class _UdpRun:
    """An open run of equal-size UDP datagrams of one flow being merged into one USO packet."""

    __slots__ = ("closed", "first", "l3len", "mss", "payloads", "shape", "total")

    def __init__(self, first: Buffer, l3len: int, mss: int, shape: tuple[int, ...]) -> None:
        self.first = first
        self.l3len = l3len
        self.mss = mss
        self.shape = shape
        self.total = l3len + 8 + mss
        self.payloads: list[Buffer] = [first[l3len + 8 : self.total]]
        self.closed = mss == 0


# IPv4 without options + UDP: tos, total length, fragment word, ttl, protocol, then the
# addresses and ports (the flow key) and the UDP length. The IP id and both checksums vary.
_UDP4 = struct.Struct("!xBH2xHBB2x12sH")
# IPv6 + UDP: version/class/flow label, payload length, next header, hop limit, addresses and
# ports (the flow key), UDP length.
_UDP6 = struct.Struct("!IHBB36sH")


def _finish(group: _Group) -> tuple[bytes, list[Buffer]]:
    first = group.first
    if len(group.payloads) == 1:
        return ZERO_VNET_HDR, [memoryview(first)[: group.total]]
    l3len, hlen = group.l3len, group.hlen
    head = bytearray(first[:hlen])
    v4 = head[0] >> 4 == 4
    if v4:
        U16.pack_into(head, 2, group.total)
        U16.pack_into(head, 10, 0)
        U16.pack_into(head, 10, ~internet_sum(head[:l3len]) & 0xFFFF)
        pseudo = addr_sum(head[12:20])
    else:
        U16.pack_into(head, 4, group.total - 40)
        pseudo = addr_sum(head[8:40])
    if group.psh:
        head[l3len + 13] |= TCP_PSH
    partial = checksum_fold(pseudo + PROTO_TCP + group.total - l3len)
    U16.pack_into(head, l3len + TCP_CSUM_OFFSET, partial)
    vnet = VirtioNetHdr(
        flags=F_NEEDS_CSUM,
        gso_type=GSO_TCPV4 if v4 else GSO_TCPV6,
        hdr_len=hlen,
        gso_size=group.mss,
        csum_start=l3len,
        csum_offset=TCP_CSUM_OFFSET,
    )
    return vnet.encode() + bytes(head), group.payloads


def _finish_udp(run: _UdpRun) -> tuple[bytes, list[Buffer]]:
    first = run.first
    if len(run.payloads) == 1:
        return ZERO_VNET_HDR, [memoryview(first)[: run.total]]
    l3len = run.l3len
    hlen = l3len + 8
    head = bytearray(first[:hlen])
    if l3len == 20:
        U16.pack_into(head, 2, run.total)
        U16.pack_into(head, 10, 0)
        U16.pack_into(head, 10, ~internet_sum(head[:20]) & 0xFFFF)
        pseudo = addr_sum(head[12:20])
    else:
        U16.pack_into(head, 4, run.total - 40)
        pseudo = addr_sum(head[8:40])
    ulen = run.total - l3len
    U16.pack_into(head, l3len + 4, ulen)
    # CHECKSUM_PARTIAL: the pseudo-header sum over the whole length; the kernel adjusts it
    # for each datagram's own length when it segments.
    U16.pack_into(head, l3len + UDP_CSUM_OFFSET, checksum_fold(pseudo + PROTO_UDP + ulen))
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_UDP_L4, hlen, run.mss, l3len, UDP_CSUM_OFFSET)
    return vnet + bytes(head), run.payloads


def coalesce(
    packets: Sequence[Buffer], *, max_len: int = MAX_COALESCED_LEN, udp: bool = False
) -> list[tuple[bytes, list[Buffer]]]:
    """Group IP packets for TUN writes: each item is (vnet header + headers, payload buffers).

    In-order TCP segments of one flow with equal payload sizes (the last may be shorter), the
    same ACK, flags and options, and no SYN/FIN/RST/URG/CWR become one TCPV4/TCPV6 GSO packet
    of at most `max_len` IP bytes. With `udp`, consecutive UDP datagrams of one flow (same
    addresses and ports, equal payload sizes with the last possibly shorter, same TOS/TTL/DF
    or traffic class/flow label/hop limit, no IPv4 options or fragments) become one UDP_L4 GSO
    packet of at most MAX_UDP_SEGMENTS datagrams. Every other packet is its own item behind a
    zero vnet header. Packets of one flow keep their order. Write each item with one
    `os.writev([header, *buffers])`.
    """
    items: list[tuple[bytes, list[Buffer]] | _Group | _UdpRun] = []
    open_runs: dict[_FlowKey, _Group] = {}
    udp_runs: dict[bytes, _UdpRun] = {}
    udp4 = _UDP4.unpack_from
    udp6 = _UDP6.unpack_from
    for pkt in packets:
        n = len(pkt)
        b0 = pkt[0] if n else 0
        if udp and n >= 28:
            ukey: bytes | None = None
            if b0 == 0x45:
                if pkt[9] == PROTO_UDP:
                    tos, iplen, frag, ttl, _p, ukey, ulen = udp4(pkt)
                    l3len = 20
                    ushape: tuple[int, ...] = (tos, ttl, frag)
                    ok = iplen <= n and ulen == iplen - 20 and not frag & 0x3FFF
            elif b0 >> 4 == 6 and n >= 48 and pkt[6] == PROTO_UDP:
                vtcfl, plen6, _p, hop, ukey, ulen = udp6(pkt)
                l3len = 40
                ushape = (vtcfl, hop)
                ok = plen6 + 40 <= n and ulen == plen6
            if ukey is not None:
                urun = udp_runs.get(ukey)
                if not ok or ulen < 8:
                    if urun is not None:  # a later datagram may not pass it
                        del udp_runs[ukey]
                    items.append((ZERO_VNET_HDR, [pkt]))
                    continue
                plen = ulen - 8
                if (
                    urun is not None
                    and not urun.closed
                    and 0 < plen <= urun.mss
                    and urun.shape == ushape
                    and urun.total + plen <= max_len
                    and len(urun.payloads) < MAX_UDP_SEGMENTS
                ):
                    base = l3len + 8
                    # a slice of bytes is cheaper than a memoryview of it, even at 1.4 KB
                    urun.payloads.append(pkt[base : base + plen])
                    urun.total += plen
                    if plen < urun.mss:
                        urun.closed = True
                    continue
                urun = udp_runs[ukey] = _UdpRun(pkt, l3len, plen, ushape)
                items.append(urun)
                continue
        info = _tcp_segment_info(pkt)
        if info is None:
            items.append((ZERO_VNET_HDR, [pkt]))
            continue
        plen = info.plen
        hlen = info.hlen
        run = open_runs.get(info.key)
        if (
            run is not None
            and info.mergeable
            and not run.closed
            and info.seq == run.next_seq
            and 0 < plen <= run.mss
            and run.total + plen <= max_len
            and len(run.payloads) < MAX_COALESCED_SEGMENTS
            and info.shape == run.shape
        ):
            run.payloads.append(pkt[hlen : hlen + plen])
            run.total += plen
            run.next_seq = (info.seq + plen) & 0xFFFFFFFF
            if plen < run.mss or info.flags & TCP_PSH:
                run.psh = bool(info.flags & TCP_PSH)
                run.closed = True
            continue
        if not info.mergeable:
            open_runs.pop(info.key, None)
            items.append((ZERO_VNET_HDR, [memoryview(pkt)[: hlen + plen]]))
            continue
        run = _Group(pkt, info.l3len, hlen, plen, info.seq, info.shape)
        if info.flags & TCP_PSH:
            run.closed = True
        open_runs[info.key] = run
        items.append(run)
    out: list[tuple[bytes, list[Buffer]]] = []
    for it in items:
        if isinstance(it, _Group):
            out.append(_finish(it))
        elif isinstance(it, _UdpRun):
            out.append(_finish_udp(it))
        else:
            out.append(it)
    return out
