"""Router announcements on 224.0.0.1:5350, sans-I/O: the gateway tells its LAN its state changed.

    NAT-PMP (RFC 6886 §3.2.1)   when it reboots or its external address changes, the gateway
                                multicasts an external-address response (opcode 128, the new
                                epoch and address) to 224.0.0.1:5350
    PCP (RFC 6887 §14.1.3)      when it lost its state (a restart, a new external address), the
                                server multicasts an unsolicited ANNOUNCE response (opcode 0 with
                                the R bit, result 0, the new epoch) to 224.0.0.1:5350 (IPv4) or
                                [ff02::1]:5350 (IPv6)

Both come from the gateway's port 5351. A client that hears one from its gateway checks the epoch
as for any answer (`epoch.EpochTracker`): a server that lost its state has lost our mapping, so
the client maps again at once instead of at its next check.

    parse_announcement(data) -> Announcement(protocol "pmp" | "pcp", epoch, address | None)

Anything else (a request, a MAP answer, an error result, a short or long datagram) raises
MalformedAnswer: the group is shared, and only these two messages mean anything on it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

from . import pcp, pmp
from .errors import MalformedAnswer

__all__ = ["MULTICAST_ADDR", "MULTICAST_ADDR_V6", "PORT", "Announcement", "parse_announcement"]

MULTICAST_ADDR: Final = "224.0.0.1"  # all hosts
MULTICAST_ADDR_V6: Final = "ff02::1"
PORT: Final = 5350  # the client side of NAT-PMP/PCP (the gateway listens on 5351)


@dataclass(frozen=True, slots=True)
class Announcement:
    protocol: Literal["pmp", "pcp"]
    epoch: int
    address: ipaddress.IPv4Address | None = None  # NAT-PMP: the external address


def parse_announcement(data: bytes) -> Announcement:
    """A NAT-PMP address announcement or a PCP unsolicited ANNOUNCE; MalformedAnswer else."""
    if len(data) < 2 or len(data) > pcp.MAX_MESSAGE:
        raise MalformedAnswer(f"announcement of {len(data)} bytes")
    if data[0] == pmp.VERSION:
        msg = pmp.parse_response(data)
        if not isinstance(msg, pmp.ExternalAddressResponse):
            raise MalformedAnswer("NAT-PMP announcement that is no external-address response")
        if msg.result != pmp.ResultCode.SUCCESS:
            raise MalformedAnswer(f"NAT-PMP announcement with result {msg.result}")
        return Announcement("pmp", msg.epoch, msg.address)
    answer = pcp.parse_response(data)
    if not isinstance(answer, pcp.Response) or answer.opcode != pcp.Opcode.ANNOUNCE:
        raise MalformedAnswer("PCP announcement that is no ANNOUNCE response")
    if answer.result != pcp.ResultCode.SUCCESS:
        raise MalformedAnswer(f"PCP ANNOUNCE with result {answer.result}")
    return Announcement("pcp", answer.epoch)
