"""IP, TCP and UDP header fields that segmentation and coalescing read and rewrite."""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "PROTO_TCP",
    "PROTO_UDP",
    "TCP_FIN",
    "TCP_SYN",
    "TCP_RST",
    "TCP_PSH",
    "TCP_ACK",
    "TCP_URG",
    "TCP_CWR",
    "U16",
    "U32",
]

PROTO_TCP: Final = 6
PROTO_UDP: Final = 17

TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_PSH: Final = 0x08
TCP_ACK: Final = 0x10
TCP_URG: Final = 0x20
TCP_CWR: Final = 0x80

U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
