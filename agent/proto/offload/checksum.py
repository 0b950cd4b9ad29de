"""Internet checksums (RFC 1071) and finishing a NEEDS_CSUM packet's checksum."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from agent.proto.errors import MalformedPacket
from agent.proto.offload.vnet import UDP_CSUM_OFFSET, Buffer, VirtioNetHdr

__all__ = [
    "NUMPY_CSUM_MIN",
    "internet_sum",
    "checksum_fold",
    "addr_sum",
    "fold_np",
    "complete_checksum",
]

# From this many bytes one numpy sum beats `int.from_bytes(...) % 0xFFFF` (~1.3 us fixed
# against ~1.4 ns/byte, measured: 1400 B 1.5 vs 2.0 us, 500 B 1.4 vs 0.8 us).
NUMPY_CSUM_MIN: Final = 1024


def internet_sum(data: Buffer, initial: int = 0) -> int:
    """One's-complement sum of big-endian 16-bit words (odd tail zero-padded), folded to 16 bits.

    `int.from_bytes(...) % 0xFFFF` is the sum modulo 2^16-1 computed in C; a non-zero input whose
    true folded sum is 0xFFFF comes out as 0 and is mapped back.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF + initial
    total = checksum_fold(total)
    if total == 0 and (initial or any(data)):
        return 0xFFFF
    return total


def checksum_fold(total: int) -> int:
    """Fold a wide one's-complement sum to 16 bits (end-around carry)."""
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def addr_sum(addr: Buffer) -> int:
    """Sum of the address words of a pseudo-header, modulo 2^16-1 (fold it before use)."""
    return int.from_bytes(addr, "big") % 0xFFFF


def fold_np(total: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """`checksum_fold` over an array of 64-bit sums (three folds reach 16 bits)."""
    for _ in range(3):
        total = (total & 0xFFFF) + (total >> 16)
    return total


def complete_checksum(hdr: VirtioNetHdr, pkt: Buffer) -> bytearray:
    """A single packet with NEEDS_CSUM (the field holds the pseudo-header sum): a copy with
    the checksum finished. The per-packet path of small datagrams, so it is kept flat."""
    start = hdr.csum_start
    field = start + hdr.csum_offset
    n = len(pkt)
    if field + 2 > n or start < 20:
        raise MalformedPacket("checksum offsets outside the packet")
    out = bytearray(pkt)
    if n - start >= NUMPY_CSUM_MIN:
        words = np.frombuffer(out, dtype=">u2", count=(n - start) >> 1, offset=start)
        value = int(words.sum(dtype=np.uint64))
        if (n - start) & 1:
            value += out[-1] << 8
    else:
        value = int.from_bytes(out[start:], "big")
        if (n - start) & 1:
            value <<= 8  # the odd tail byte is the high half of a zero-padded word
    folded = value % 0xFFFF
    # a residue of 0 is a folded sum of 0xFFFF (checksum 0) unless every word was zero
    csum = 0xFFFF - folded if folded else (0 if value else 0xFFFF)
    if csum == 0 and hdr.csum_offset == UDP_CSUM_OFFSET:
        csum = 0xFFFF
    out[field] = csum >> 8
    out[field + 1] = csum & 0xFF
    return out
