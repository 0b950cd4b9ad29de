"""The node's packet filter (agent/policy/filter.py): check_inbound, note_outbound.

Contract: nothing may raise for any packet bytes. Invariants: a drop is counted exactly once
per dropped packet; the decision cache and the flow table stay within their limits.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from agent.policy.filter import FilterLimits, PacketFilter, PeerSources
from agent.policy.rules import ALL_PORTS, FilterRule, NetPortRange, PortRange
from fuzz.common import Data, Seed, check

LOCAL = (ip_address("100.64.0.2"), ip_address("fd7a:115c:a1e0::2"))
PEER = PeerSources((ip_network("100.64.0.1/32"), ip_network("fd7a:115c:a1e0::1/128")))
RULES = (
    FilterRule(
        sources=(ip_network("100.64.0.0/10"),),
        destinations=(NetPortRange(ip_network("100.64.0.2/32"), PortRange(80, 443)),),
        protocols=frozenset({6, 17}),
    ),
    FilterRule(
        sources=(ip_network("fd7a:115c:a1e0::/48"),),
        destinations=(NetPortRange(ip_network("fd7a:115c:a1e0::2/128"), ALL_PORTS),),
        protocols=frozenset(),
    ),
)
LIMITS = FilterLimits(decisions=64, flows=32, log_flows=16)


A, B = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])


def _udp4(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    udp = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + b"\x00\x0c\x00\x00data"
    ip = bytes([0x45, 0, 0, 20 + len(udp), 0, 1, 0, 0, 64, 17, 0, 0])
    return ip + src + dst + udp


class Harness:
    name = "packet_filter"
    contract = "nothing"
    dictionary = (b"\x45\x00", b"\x60\x00\x00\x00", b"\x06", b"\x11", b"\x01", b"\x3a",
                  b"\x64\x40\x00\x01", b"\x64\x40\x00\x02", b"\x00\x50", b"\x01\xbb", b"\x02",
                  b"\x12", b"\x08\x00", b"\x00\x00")  # fmt: skip

    def __init__(self) -> None:
        self.filter = PacketFilter(RULES, LOCAL, LIMITS)

    def run(self, data: bytes) -> str:
        d = Data(data)
        f = self.filter
        outcomes = []
        for chunk in d.chunks():
            if chunk[:1] and chunk[0] & 1:
                f.note_outbound(chunk[1:])
                outcomes.append("out")
                continue
            before = sum(f.drops.values())
            why = f.check_inbound(chunk[1:], PEER)
            after = sum(f.drops.values())
            check(after - before == (0 if why is None else 1), "drop not counted once")
            outcomes.append("pass" if why is None else str(why))
        check(f.cached_decisions <= LIMITS.decisions, "decision cache over its limit")
        check(f.open_flows <= LIMITS.flows, "flow table over its limit")
        return ",".join(sorted(set(outcomes)))[:40]

    def seeds(self) -> list[bytes]:
        inbound, outbound = b"\x00", b"\x01"
        allowed_and_not = [inbound + _udp4(A, B, 1000, 80), inbound + _udp4(A, B, 1000, 22)]
        # b opens a flow to a:22; a's reply passes though no rule opens port 1000 on b
        reply = [outbound + _udp4(B, A, 1000, 22), inbound + _udp4(A, B, 22, 1000)]
        return [Seed().chunks(allowed_and_not).build(), Seed().chunks(reply).build()]
