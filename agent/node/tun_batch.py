"""TUN reads and writes by the batch, on a bare non-blocking fd: the pure-Python twin of
`agent._fastpath.tun_read` / `tun_write` (native/io.c), same arguments, same results.

tun_read(fd, max_reads, vnet_hdr) -> (packets, runs, reads, not_ip, malformed, error)
    Up to `max_reads` reads, until EAGAIN. Each read is one IP packet, or with a vnet header a
    TSO/USO super-packet cut into wire-size packets (`offload.segment`; a NEEDS_CSUM packet gets
    its checksum). A read whose packet is not IPv4/IPv6 of at least a header's length counts in
    `not_ip`, one that segmentation refuses (MalformedPacket) in `malformed`; either gives no
    packet. `runs` groups consecutive packets to one destination address (4 or 16 raw bytes) as
    (dst, count), in order, covering every packet. `error` is the OSError other than EAGAIN that
    ended the batch (the packets read before it are still returned), else None.

tun_write(fd, packets, vnet_hdr, udp) -> (writes, failed)
    With a vnet header and more than one packet, `offload.coalesce` (UDP too when `udp`: the TUN
    took USO) and one writev per item; otherwise one write per packet, behind a zero vnet header
    when `vnet_hdr`. `writes` counts the write calls made, `failed` the IP packets they lost
    (a write that would block fails: the fd never blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.node.tun import read_frames, write_coalesced, write_packets
from agent.proto.errors import MalformedPacket
from agent.proto.offload import Buffer, VirtioNetHdr, coalesce, segment

__all__ = ["tun_read", "tun_write", "batch_from_frames"]

# Parsed vnet headers by their bytes, shared by every caller (bounded by read_frames).
_HDR_CACHE: dict[bytes, VirtioNetHdr] = {}


def tun_read(
    fd: int, max_reads: int, vnet_hdr: bool
) -> tuple[list[bytes], list[tuple[bytes, int]], int, int, int, OSError | None]:
    return batch_from_frames(*read_frames(fd, max_reads, vnet_hdr, _HDR_CACHE))


def batch_from_frames(
    frames: Sequence[tuple[VirtioNetHdr, memoryview]], error: OSError | None
) -> tuple[list[bytes], list[tuple[bytes, int]], int, int, int, OSError | None]:
    """`tun_read`'s result for frames already read (`tun.read_frames`)."""
    packets: list[bytes] = []
    runs: list[tuple[bytes, int]] = []
    not_ip = malformed = 0
    run_dst = b""
    run_count = 0
    for hdr, pkt in frames:
        n = len(pkt)
        version = pkt[0] >> 4 if n else 0
        if version == 4 and n >= 20:
            dst = pkt[16:20].tobytes()
        elif version == 6 and n >= 40:
            dst = pkt[24:40].tobytes()
        else:
            not_ip += 1
            continue
        try:
            segments = segment(hdr, pkt)
        except MalformedPacket:
            malformed += 1
            continue
        packets.extend([bytes(s) for s in segments])
        if dst == run_dst:
            run_count += len(segments)
            continue
        if run_count:
            runs.append((run_dst, run_count))
        run_dst, run_count = dst, len(segments)
    if run_count:
        runs.append((run_dst, run_count))
    return packets, runs, len(frames), not_ip, malformed, error


def tun_write(fd: int, packets: Sequence[Buffer], vnet_hdr: bool, udp: bool) -> tuple[int, int]:
    if vnet_hdr and len(packets) > 1:
        items = coalesce(packets, udp=udp)
        return len(items), write_coalesced(fd, items)
    return len(packets), write_packets(fd, packets, vnet_hdr)
