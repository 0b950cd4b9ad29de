"""TUN offload arithmetic: virtio_net_hdr, TSO/USO segmentation (TX) and TCP/UDP coalescing (RX).

Pure computation, no I/O. With IFF_VNET_HDR every TUN read and write starts with a 10-byte
virtio_net_hdr (`vnet`). TX: `segment()` cuts the kernel's super-packet into wire-size IP
packets with complete headers and checksums (`segment`, `checksum`). RX: `coalesce()` merges
in-order TCP segments (and, when the TUN took USO, equal-size UDP datagrams) of one flow into
one GSO packet per TUN write (`coalesce`). `fields` holds the IP/TCP/UDP header facts they share.
"""

from agent.proto.offload.checksum import checksum_fold, complete_checksum, internet_sum
from agent.proto.offload.coalesce import MAX_COALESCED_LEN, coalesce
from agent.proto.offload.segment import segment
from agent.proto.offload.vnet import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    NO_OFFLOAD,
    VNET_HDR_LEN,
    ZERO_VNET_HDR,
    Buffer,
    VirtioNetHdr,
)

__all__ = [
    "Buffer",
    "VNET_HDR_LEN",
    "F_NEEDS_CSUM",
    "F_DATA_VALID",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "VirtioNetHdr",
    "NO_OFFLOAD",
    "ZERO_VNET_HDR",
    "MAX_COALESCED_LEN",
    "checksum_fold",
    "internet_sum",
    "segment",
    "complete_checksum",
    "coalesce",
]
