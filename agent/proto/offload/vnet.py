"""The virtio_net_hdr in front of every TUN packet when IFF_VNET_HDR is on.

Layout as in Linux include/uapi/linux/virtio_net.h (struct virtio_net_hdr; the virtio
specification's "Device Operation" section for the network device): 10 bytes, host byte order,
TUNSETVNETHDRSZ=10.

    0  flags        u8   NEEDS_CSUM=1: checksum from csum_start to the end, store at +csum_offset
    1  gso_type     u8   NONE=0, TCPV4=1, TCPV6=4, UDP_L4=5 (ECN bit 0x80 never enabled here)
    2  hdr_len      u16  length of IP + transport headers (not trusted on read: recomputed)
    4  gso_size     u16  payload bytes per segment (the MSS)
    6  csum_start   u16  offset of the transport header
    8  csum_offset  u16  checksum field inside it: 16 for TCP, 6 for UDP
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from agent.proto.errors import MalformedPacket

__all__ = [
    "Buffer",
    "VNET_HDR_LEN",
    "F_NEEDS_CSUM",
    "F_DATA_VALID",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "GSO_ECN",
    "TCP_CSUM_OFFSET",
    "UDP_CSUM_OFFSET",
    "VNET_HDR",
    "VirtioNetHdr",
    "NO_OFFLOAD",
    "ZERO_VNET_HDR",
]

Buffer = bytes | bytearray | memoryview

VNET_HDR_LEN: Final = 10
F_NEEDS_CSUM: Final = 1
F_DATA_VALID: Final = 2
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
GSO_UDP_L4: Final = 5
GSO_ECN: Final = 0x80

# csum_offset values: where the checksum field sits inside the transport header.
TCP_CSUM_OFFSET: Final = 16
UDP_CSUM_OFFSET: Final = 6

VNET_HDR = struct.Struct("=BBHHHH")


@dataclass(frozen=True, slots=True)
class VirtioNetHdr:
    """The 10-byte header in front of every TUN packet when IFF_VNET_HDR is on."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, data: Buffer) -> VirtioNetHdr:
        if len(data) < VNET_HDR_LEN:
            raise MalformedPacket("short virtio_net_hdr")
        return cls(*VNET_HDR.unpack_from(data, 0))

    def encode(self) -> bytes:
        return VNET_HDR.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )


NO_OFFLOAD: Final = VirtioNetHdr()
ZERO_VNET_HDR: Final = NO_OFFLOAD.encode()
