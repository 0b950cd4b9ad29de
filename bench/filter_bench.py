"""Per-packet cost of the policy packet filter: a cached 64-byte UDP flow, 1,000 rules.

    .venv/bin/python bench/filter_bench.py [--rules 1000] [--packets 1000000]

Prints ns per packet for the cached path (the steady state of a flow), the TCP non-SYN path and
an uncached new flow (a full rule scan), each the best of 5 rounds.
"""

from __future__ import annotations

import argparse
import struct
import time
from ipaddress import ip_address, ip_network

from agent.policy.filter import PacketFilter, PeerSources
from agent.policy.rules import FilterRule, NetPortRange, PortRange

ME, PEER = "100.64.0.1", "100.64.0.2"


def udp64(sport: int, dport: int) -> bytes:
    payload = b"x" * (64 - 28)
    header = struct.pack("!BBHHHBBH", 0x45, 0, 64, 1, 0, 64, 17, 0)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return header + ip_address(PEER).packed + ip_address(ME).packed + udp + payload


def tcp_ack(sport: int, dport: int) -> bytes:
    header = struct.pack("!BBHHHBBH", 0x45, 0, 40, 1, 0, 64, 6, 0)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    return header + ip_address(PEER).packed + ip_address(ME).packed + tcp


def make_rules(count: int) -> list[FilterRule]:
    """`count` rules from other sources; the last one admits the benchmark flow."""
    rules = [
        FilterRule(
            (ip_network(f"10.{i // 256 % 256}.{i % 256}.0/24"),),
            (NetPortRange(ip_network(f"{ME}/32"), PortRange(1000 + i % 5000, 1000 + i % 5000)),),
            frozenset({6, 17}),
        )
        for i in range(count - 1)
    ]
    rules.append(
        FilterRule(
            (ip_network(f"{PEER}/32"),),
            (NetPortRange(ip_network(f"{ME}/32"), PortRange(9000, 9000)),),
            frozenset({17}),
        )
    )
    return rules


def best_ns(run: object, packets: int, rounds: int = 5) -> float:
    assert callable(run)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        run()
        best = min(best, (time.perf_counter_ns() - start) / packets)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--packets", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.packets
    flt = PacketFilter(make_rules(args.rules), [ip_address(ME)])
    peer = PeerSources([ip_network(f"{PEER}/32")])
    check = flt.check_inbound
    packet = udp64(40000, 9000)
    assert check(packet, peer) is None
    ack = tcp_ack(40000, 22)

    def cached() -> None:
        for _ in range(n):
            check(packet, peer)

    def non_syn() -> None:
        for _ in range(n):
            check(ack, peer)

    def empty_loop() -> None:
        for _ in range(n):
            pass

    new_flows = [udp64(port, 9000) for port in range(1, 20_001)]

    def uncached() -> None:
        flt.update_rules(make_rules(args.rules))
        for p in new_flows:
            check(p, peer)

    loop = best_ns(empty_loop, n)
    print(f"rules: {args.rules}, packets per round: {n}")
    print(f"cached 64 B UDP flow: {best_ns(cached, n) - loop:8.1f} ns/packet (loop removed)")
    print(f"TCP non-SYN:          {best_ns(non_syn, n) - loop:8.1f} ns/packet")
    print(f"new UDP flow (miss):  {best_ns(uncached, len(new_flows), rounds=2):8.1f} ns/packet")


if __name__ == "__main__":
    main()
