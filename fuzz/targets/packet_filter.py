"""The node's packet filter (agent/policy/filter.py): check_inbound, check_batch, note_outbound.

Input: chunks; a chunk's first byte says what to do with the rest: bit 0 set, send it
(note_outbound), else receive it (check_inbound, or with bit 1 set check_batch of two copies);
bits 2-7 are seconds the clock moves first (so flows expire).

Contract: nothing may raise for any packet bytes. Invariants: a drop is counted exactly once
per dropped packet; two copies of a packet in one batch get the same verdict; the decision
cache and the flow tables stay within their limits.
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
LIMITS = FilterLimits(decisions=64, flows=32, echoes=8, log_flows=16)


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
        self.now = 0.0

    def run(self, data: bytes) -> str:
        d = Data(data)
        f = self.filter
        outcomes = []
        for chunk in d.chunks():
            op = chunk[0] if chunk else 0
            self.now += op >> 2
            packet = chunk[1:]
            if op & 1:
                f.note_outbound(packet, self.now)
                outcomes.append("out")
                continue
            before = sum(f.drops.values())
            if op & 2:
                passed, dropped = f.check_batch([packet, packet], PEER, self.now)
                check(len(passed) + len(dropped) == 2, "a packet of a batch went missing")
                check(len(passed) != 1, "two copies of a packet decided apart")
                why = dropped[0][1] if dropped else None
                drops = len(dropped)
            else:
                why = f.check_inbound(packet, PEER, self.now)
                drops = 0 if why is None else 1
            after = sum(f.drops.values())
            check(after - before == drops, "drop not counted once")
            outcomes.append("pass" if why is None else str(why))
        check(f.cached_decisions <= LIMITS.decisions, "decision cache over its limit")
        check(f.open_flows <= LIMITS.flows + LIMITS.echoes, "flow tables over their limits")
        return ",".join(sorted(set(outcomes)))[:40]

    def seeds(self) -> list[bytes]:
        inbound, outbound = b"\x00", b"\x01"
        allowed_and_not = [inbound + _udp4(A, B, 1000, 80), inbound + _udp4(A, B, 1000, 22)]
        # b opens a flow to a:22; a's reply passes though no rule opens port 1000 on b
        reply = [outbound + _udp4(B, A, 1000, 22), inbound + _udp4(A, B, 22, 1000)]
        # replies 63 and 126 s later pass (each keeps the flow open for 120 s), one at 252 s not
        later, batch, tick = bytes([63 << 2]), bytes([63 << 2 | 2]), bytes([63 << 2 | 1])
        expiry = [
            outbound + _udp4(B, A, 1001, 22),
            batch + _udp4(A, B, 22, 1001),
            later + _udp4(A, B, 22, 1001),
            tick,
            later + _udp4(A, B, 22, 1001),
        ]
        return [Seed().chunks(c).build() for c in (allowed_and_not, reply, expiry)]
