"""The DNS service behind a real TUN: the kernel's own sockets query 100.100.100.100 (root only).

    ns
    python socket ──UDP or TCP──► 100.100.100.100:53 / [fd7a:115c:a1e0::53]:53
                             │ route via dnsXXXX (TUN, 100.64.0.9/32, fd7a:115c:a1e0::9/128)
                             ▼
    thread: TUN read ──► DnsServer.handle_tun_packet (UDP) or DnsTcp (TCP) ──► TUN write
                                                               ──► the socket gets the answer

The kernel drops a datagram or segment whose checksum is wrong, so every answer that arrives
proves the IP, UDP and TCP headers we built; a TCP answer also proves the handshake, sequence
numbers and windows to the kernel's own TCP. `python -m tests.integration.test_dns_tun selftest
IFNAME` runs inside the namespace and prints the results as JSON.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import select
import socket
import struct
import sys
import threading

import dns.message
import dns.rcode
import pytest

from .lab import Lab

pytestmark = pytest.mark.netns


def _serve(tun_name: str, stop: threading.Event, ready: threading.Event, log: list[str]) -> None:
    from agent.engine.dns_tcp import is_service_tcp
    from agent.node.dns_server import DnsServer
    from agent.node.dns_tcp import DnsTcp
    from agent.node.tun import open_tun
    from agent.proto.dns.responder import NameTable

    table = NameTable(
        {
            "laptop": [
                ipaddress.ip_address("100.64.0.7"),
                ipaddress.ip_address("fd7a:115c:a1e0::7"),
            ],
            "server": [ipaddress.ip_address("100.64.0.8")],
        }
    )
    with open_tun(tun_name, offload=False) as tun:
        tun.configure(
            [
                ipaddress.ip_interface("100.64.0.9/32"),
                ipaddress.ip_interface("fd7a:115c:a1e0::9/128"),
            ],
            1280,
            [
                ipaddress.ip_network("100.100.100.100/32"),
                ipaddress.ip_network("fd7a:115c:a1e0::53/128"),
            ],
        )
        loop = asyncio.new_event_loop()
        server = DnsServer(table, [])
        tcp = DnsTcp(server, tun.write_packets)
        ready.set()
        try:
            while not stop.is_set():
                readable, _, _ = select.select([tun], [], [], 0.1)
                if not readable:
                    loop.run_until_complete(asyncio.sleep(0))  # due TCP timers
                    continue
                for _, packet in tun.read_batch(16):
                    if is_service_tcp(packet):
                        replies = loop.run_until_complete(_handle_tcp(tcp, bytes(packet)))
                        tun.write_packets(replies)
                        continue
                    reply = loop.run_until_complete(_handle(server, bytes(packet)))
                    if reply is not None:
                        tun.write_packets([reply])
                    else:
                        log.append(f"no reply to {bytes(packet[:40]).hex()}")
        finally:
            tcp.close()
            loop.close()


async def _handle(server: object, packet: bytes) -> bytes | None:
    from agent.node.dns_server import DnsServer

    assert isinstance(server, DnsServer)
    return server.handle_tun_packet(packet)


async def _handle_tcp(tcp: object, packet: bytes) -> list[bytes]:
    from agent.node.dns_tcp import DnsTcp

    assert isinstance(tcp, DnsTcp)
    return tcp.handle_packet(packet)


def _query(
    family: int, address: str, name: str, rdtype: str, *, tcp: bool = False
) -> dict[str, object]:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        with socket.create_connection((address, 53), timeout=3) as conn:
            source = conn.getpeername()
            wire = query.to_wire()
            conn.sendall(struct.pack("!H", len(wire)) + wire)
            data = _read_message(conn)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""  # our FIN after the answer
    else:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            sock.sendto(query.to_wire(), (address, 53))
            data, source = sock.recvfrom(4096)
    answer = dns.message.from_wire(data)
    return {
        "source": source[0],
        "id_ok": answer.id == query.id,
        "rcode": dns.rcode.to_text(answer.rcode()),
        "answers": sorted(rd.to_text() for rrset in answer.answer for rd in rrset),
    }


def _read_message(conn: socket.socket) -> bytes:
    buf = b""
    while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
        chunk = conn.recv(4096)
        if not chunk:
            raise OSError(f"connection closed after {len(buf)} bytes")
        buf += chunk
    return buf[2:]


def selftest(tun_name: str) -> None:
    stop, ready = threading.Event(), threading.Event()
    log: list[str] = []
    thread = threading.Thread(target=_serve, args=(tun_name, stop, ready, log), daemon=True)
    thread.start()
    ready.wait(10)
    results: dict[str, object] = {}
    try:
        for key, family, address, name, rdtype in (
            ("v4_a", socket.AF_INET, "100.100.100.100", "laptop.mesh.internal", "A"),
            ("v4_bare", socket.AF_INET, "100.100.100.100", "server", "A"),
            ("v4_nx", socket.AF_INET, "100.100.100.100", "nope.mesh.internal", "A"),
            ("v4_ptr", socket.AF_INET, "100.100.100.100", "7.0.64.100.in-addr.arpa", "PTR"),
            ("v6_aaaa", socket.AF_INET6, "fd7a:115c:a1e0::53", "laptop.mesh.internal", "AAAA"),
            ("tcp_v4_a", socket.AF_INET, "100.100.100.100", "laptop.mesh.internal", "A"),
            ("tcp_v6_ptr", socket.AF_INET6, "fd7a:115c:a1e0::53", "8.0.64.100.in-addr.arpa", "PTR"),
        ):
            try:
                results[key] = _query(family, address, name, rdtype, tcp=key.startswith("tcp"))
            except OSError as e:
                results[key] = {"error": repr(e)}
    finally:
        stop.set()
        thread.join(5)
    results["log"] = log
    print(json.dumps(results))


def test_kernel_sockets_get_answers_through_the_tun(lab: Lab) -> None:
    ns = lab.add_ns("dns")
    lab.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
    lab.run(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    tun = lab.ifname("dns")
    res = lab.run(ns, sys.executable, "-m", "tests.integration.test_dns_tun", "selftest", tun)
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert results["v4_a"] == {
        "source": "100.100.100.100",
        "id_ok": True,
        "rcode": "NOERROR",
        "answers": ["100.64.0.7"],
    }
    assert results["v4_bare"]["answers"] == ["100.64.0.8"]
    assert results["v4_nx"]["rcode"] == "NXDOMAIN"
    assert results["v4_ptr"]["answers"] == ["laptop.mesh.internal."]
    assert results["v6_aaaa"] == {
        "source": "fd7a:115c:a1e0::53",
        "id_ok": True,
        "rcode": "NOERROR",
        "answers": ["fd7a:115c:a1e0::7"],
    }
    assert results["tcp_v4_a"] == {**results["v4_a"]}
    assert results["tcp_v6_ptr"]["answers"] == ["server.mesh.internal."]
    assert results["tcp_v6_ptr"]["source"] == "fd7a:115c:a1e0::53"


if __name__ == "__main__":
    if sys.argv[1:2] == ["selftest"]:
        selftest(sys.argv[2])
