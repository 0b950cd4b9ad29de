"""Inputs the fuzzers (fuzz/) found that escaped the error contract of agent/proto/offload."""

from __future__ import annotations

import struct

import pytest

from agent.proto.errors import MalformedPacket
from agent.proto.offload import F_NEEDS_CSUM, GSO_TCPV4, VirtioNetHdr, segment


@pytest.mark.parametrize("vectorise", [False, True])
def test_odd_transport_offset_is_malformed(vectorise: bool) -> None:
    # csum_start 21: numpy's 16-bit view of the rows raised ValueError (the pure path went on)
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1041, 0, 0, 64, 6, 0, bytes(4), bytes(4))
    packet = ip + b"\0" + tcp + bytes(1000)
    hdr = VirtioNetHdr(F_NEEDS_CSUM, GSO_TCPV4, 41, 100, 21, 16)
    with pytest.raises(MalformedPacket, match="odd offset"):
        segment(hdr, packet, vectorise=vectorise)
