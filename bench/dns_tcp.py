"""CPU of DNS over TCP at 100.100.100.100 (agent/engine/dns_tcp.py), without the kernel.

    .venv/bin/python bench/dns_tcp.py            # best of 5 repetitions of 2,000 connections

Cases:
    tcp connection    one whole connection through TcpResponder: SYN, ACK, query, answer,
                      FIN, ACK in (prebuilt, checksums verified), SYN-ACK, ACKs, answer, FIN
                      out; the DNS answer itself is not included
    per packet        the same divided by the 10 packets in and out
    dns answer        Responder.respond for one TCP query (dnspython), for comparison
"""

from __future__ import annotations

import argparse
import ipaddress
import struct
import time

import dns.message

from agent.engine.dns_tcp import TcpLimits, TcpResponder
from agent.engine.tcp_segment import ACK, FIN, PSH, SYN, build_segment
from agent.proto.dns.names import SERVICE_V4
from agent.proto.dns.responder import NameTable, Responder, Transport

CLIENT = ipaddress.IPv4Address("100.64.0.7")
ISS = 5000


def _connections(n: int) -> float:
    query = dns.message.make_query("b.mesh.internal", "A").to_wire()
    wire = struct.pack("!H", len(query)) + query
    answer = struct.pack("!H", 48) + bytes(48)
    tcp = TcpResponder(TcpLimits(), randbytes=lambda k: ISS.to_bytes(k, "big"))

    def seg(flags: int, seq: int, ack: int, payload: bytes = b"") -> bytes:
        mss = 1240 if flags & SYN else None
        return build_segment(
            CLIENT, 40000, SERVICE_V4, 53,
            seq=seq, ack=ack, flags=flags, window=65535, payload=payload, mss=mss,
        )  # fmt: skip

    ours, theirs = ISS + 1, 1001 + len(wire)
    syn, ack, data = seg(SYN, 1000, 0), seg(ACK, 1001, ours), seg(ACK | PSH, 1001, ours, wire)
    fin = seg(FIN | ACK, theirs, ours + len(answer))
    last = seg(ACK, theirs + 1, ours + len(answer) + 1)
    start = time.perf_counter()
    for _ in range(n):
        tcp.receive(syn, 0.0)
        tcp.receive(ack, 0.0)
        (query_event,) = tcp.receive(data, 0.0).queries
        tcp.answer(query_event.conn, answer, 0.0)
        tcp.receive(fin, 0.0)
        tcp.receive(last, 0.0)
    took = time.perf_counter() - start
    if len(tcp) or tcp.counters["tcp_closed"] != n:
        raise SystemExit("the connections did not all close")
    return took / n


def _answers(n: int) -> float:
    responder = Responder(NameTable({"b": [ipaddress.ip_address("100.64.0.2")]}))
    query = dns.message.make_query("b.mesh.internal", "A").to_wire()
    wire = struct.pack("!H", len(query)) + query
    start = time.perf_counter()
    for _ in range(n):
        responder.respond(wire, Transport.TCP)
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    conn = min(_connections(args.connections) for _ in range(args.reps))
    answer = min(_answers(args.connections) for _ in range(args.reps))
    print(f"tcp connection  {conn * 1e6:8.1f} us")
    print(f"per packet      {conn / 10 * 1e6:8.1f} us")
    print(f"dns answer      {answer * 1e6:8.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
