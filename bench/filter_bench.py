"""Per-packet cost of the policy packet filter, with 1,000 rules, filter on vs off.

    .venv/bin/python bench/filter_bench.py [--rules 1000] [--packets 256000] [--batch 64]

Prints ns per packet, each figure the best of `--rounds` rounds:

- through `Access.inbound`, as the data plane calls it (batches of `--batch` decrypted packets
  from one peer): with no policy (the filter off), then with the policy, for a cached 64 B UDP
  flow a rule accepts, a cached TCP flow's non-SYN segments and UDP replies to a flow this node
  opened; "on - off" is what the filter adds to a packet;
- `PacketFilter.check_inbound` one packet at a time for the cached 64 B UDP flow (call and loop
  overhead removed);
- the first packet of new flows (nothing cached; `--new-flows` of them, best of 2 rounds, each
  round with source ports of its own): a UDP flow the last of the rules accepts, and TCP SYNs
  no rule accepts;
- `Access.outbound` for a 64 B UDP packet of a flow already open, and for a TCP segment;
- with the compiled module, the lanes' check (native/lanes.c): one `fast_rx` call receiving,
  opening and writing a batch of `--batch` 64 B datagrams of one flow over loopback (the TUN is
  /dev/null), with the filter's decisions handed over (`PacketFilter.fast_view`) and without;
  "on - off" is what the filter adds to a packet there (best of `--lane-rounds` each).

The rules are `--rules - 1` rules from 10.x.y.0/24 sources to other ports, and a last one that
admits the benchmark's UDP flow (so a linear scan goes through all of them).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Interface, ip_address, ip_network
from types import ModuleType

from agent.node.access import Access
from agent.node.udp import open_udp
from agent.policy.filter import PacketFilter, PeerSources
from agent.policy.rules import FilterRule, NetPortRange, PortRange
from agent.proto.errors import DropReason

ME, PEER = "100.64.0.1", "100.64.0.2"


def udp64(sport: int, dport: int, src: str = PEER, dst: str = ME) -> bytes:
    payload = b"x" * (64 - 28)
    header = struct.pack("!BBHHHBBH", 0x45, 0, 64, 1, 0, 64, 17, 0)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return header + ip_address(src).packed + ip_address(dst).packed + udp + payload


def tcp(sport: int, dport: int, flags: int = 0x10) -> bytes:
    header = struct.pack("!BBHHHBBH", 0x45, 0, 40, 1, 0, 64, 6, 0)
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0)
    return header + ip_address(PEER).packed + ip_address(ME).packed + segment


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


def best_ns(run: Callable[[], None], packets: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        run()
        best = min(best, (time.perf_counter_ns() - start) / packets)
    return best


class _Peer:
    """What the device's route cache maps an address to, as far as a lane looks."""

    def __init__(self, lane: object) -> None:
        self.lane = lane


def lane_ns(fp: ModuleType, access: Access, packet: bytes, size: int, rounds: int) -> float:
    """Best ns per packet of fast_rx over `size` datagrams carrying `packet`, filtered by
    `access` (None view: no filter)."""
    key, index = bytes(range(32)), 7
    sealer = fp.Sealer(fp.Aead(key), index)
    udp = open_udp(0, host="127.0.0.1")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tun = os.open("/dev/null", os.O_WRONLY)
    try:
        sender.bind(("127.0.0.1", 0))
        udp.use_native(fp)
        lane = fp.Lane()
        raw = udp.raw_target(sender.getsockname())
        lane.arm_rx(fp.Aead(key), fp.ReplayWindow(), index, raw, math.inf)
        routes = {packet[12:16]: _Peer(lane)}
        lanes = {index: lane}
        view = access.fast_view()
        target = ("127.0.0.1", udp.port)
        best = math.inf
        for _ in range(rounds):
            for d in sealer.seal([packet] * size):
                sender.sendto(d, target)
            start = time.perf_counter_ns()
            fp.fast_rx(udp.fileno(), size, lanes, routes, tun, False, False, 0.0, view)
            best = min(best, (time.perf_counter_ns() - start) / size)
            counts = lane.take()
            assert counts[7] == size, counts  # every packet went to the TUN in the lane
        return best
    finally:
        os.close(tun)
        sender.close()
        udp.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--packets", type=int, default=256_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-flows", type=int, default=2000)
    parser.add_argument("--lane-rounds", type=int, default=400)
    args = parser.parse_args()
    rounds, size = args.rounds, args.batch
    batches = max(1, args.packets // size)
    n = batches * size
    rules = tuple(make_rules(args.rules))
    addresses = [IPv4Interface(f"{ME}/32")]

    off = Access()
    on = Access()
    on.set_rules(rules, addresses)
    drops: dict[DropReason, int] = {}

    def through(access: Access, packet: bytes) -> Callable[[], None]:
        batch = [bytes(bytearray(packet)) for _ in range(size)]  # one object each, as decrypted
        inbound = access.inbound
        assert len(inbound(batch, drops)) == size

        def run() -> None:
            for _ in range(batches):
                inbound(batch, drops)

        return run

    allowed = udp64(40000, 9000)
    reply = udp64(53, 41000)
    on.outbound(udp64(41000, 53, src=ME, dst=PEER))
    figures: list[tuple[str, float]] = []
    t_off = best_ns(through(off, allowed), n, rounds)
    figures.append(("Access.inbound, filter off (64 B UDP)", t_off))
    for name, packet in (
        ("cached 64 B UDP flow, rule accepts", allowed),
        ("cached TCP flow, non-SYN segments", tcp(40000, 22)),
        ("UDP replies to a flow this node opened", reply),
    ):
        t = best_ns(through(on, packet), n, rounds)
        figures.append((f"Access.inbound, {name}", t))
        figures.append(("    on - off", t - t_off))

    flt = PacketFilter(rules, [ip_address(ME)])
    peer = PeerSources([ip_network(f"{PEER}/32")])
    check = flt.check_inbound
    assert check(allowed, peer) is None

    def per_packet() -> None:
        for _ in range(n):
            check(allowed, peer)

    def empty_loop() -> None:
        for _ in range(n):
            pass

    loop = best_ns(empty_loop, n, rounds)
    figures.append(
        ("check_inbound per packet, cached 64 B UDP", best_ns(per_packet, n, rounds) - loop)
    )

    # Each round takes source ports no earlier round used, so every packet is a new flow (and
    # the rules are not rebuilt inside the timing).
    flows, new_rounds = args.new_flows, 2

    def first_packets(make: Callable[[int], bytes]) -> Callable[[], None]:
        rounds = [[make(r * flows + i) for i in range(1, flows + 1)] for r in range(new_rounds)]

        def run() -> None:
            for p in rounds.pop():
                check(p, peer)

        return run

    new_udp = first_packets(lambda port: udp64(port, 9000))
    new_syn = first_packets(lambda port: tcp(port, 22, flags=0x02))
    figures.append(("new UDP flow, first packet (last rule)", best_ns(new_udp, flows, new_rounds)))
    figures.append(("new TCP SYN, denied (no rule)", best_ns(new_syn, flows, new_rounds)))

    outbound = on.outbound
    out_udp = udp64(41000, 53, src=ME, dst=PEER)
    out_tcp = tcp(22, 40000)

    def send(packet: bytes) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                outbound(packet)

        return run

    figures.append(
        ("Access.outbound, 64 B UDP (open flow)", best_ns(send(out_udp), n, rounds) - loop)
    )
    figures.append(("Access.outbound, TCP segment", best_ns(send(out_tcp), n, rounds) - loop))

    try:
        fp = importlib.import_module("agent._fastpath")
    except ImportError as e:
        figures.append((f"compiled lanes: not measured ({e})", math.nan))
    else:
        for name, packet in (
            ("cached 64 B UDP flow, rule accepts", allowed),
            ("cached TCP flow, non-SYN segments", tcp(40000, 22)),
        ):
            lane_off = lane_ns(fp, off, packet, size, args.lane_rounds)
            t = lane_ns(fp, on, packet, size, args.lane_rounds)
            figures.append((f"lanes (fast_rx), filter off, {name}", lane_off))
            figures.append((f"lanes (fast_rx), filter on, {name}", t))
            figures.append(("    on - off", t - lane_off))

    print(f"rules: {args.rules}, packets per round: {n} (batches of {size})")
    for name, ns in figures:
        print(f"{name:<58} {ns:10.1f} ns/packet")


if __name__ == "__main__":
    main()
