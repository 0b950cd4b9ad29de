"""The DNS service shell on loopback: TUN packets in and out, forwarding to a stub upstream
(UDP, TCP after truncation, timeouts), sockets, upstream discovery, resolved's messages.

    test ──packet──► DnsServer.handle_tun_packet ──► reply packet (local names)
                          │ forward
                          ▼
                     stub upstream 127.0.0.1:<port> (UDP: answers, TC for big.example,
                                                     silence for slow.example; TCP: answers)
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
import pytest_asyncio

from agent.engine.dns_packets import build_udp, parse_udp
from agent.node import resolved
from agent.node.dns_server import DnsServer, parse_resolv_conf, system_upstreams
from agent.proto.dns.forwarding import ForwardLimits
from agent.proto.dns.names import SERVICE_V4, SERVICE_V6
from agent.proto.dns.responder import NameTable

CLIENT = ipaddress.IPv4Address("100.64.0.9")
TABLE = NameTable({"laptop": [ipaddress.ip_address("100.64.0.7")]})


def stub_answer(data: bytes, over_tcp: bool) -> bytes | None:
    query = dns.message.from_wire(data)
    name = query.question[0].name.to_text()
    if name == "slow.example.":
        return None
    response = dns.message.make_response(query)
    count = 80 if name == "big.example." else 1
    for i in range(count):
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", f"192.0.2.{i + 1}"))
    try:
        return response.to_wire(max_size=0xFFFF if over_tcp else 512)
    except dns.exception.TooBig:
        cut = dns.message.make_response(query)
        cut.flags |= dns.flags.TC
        return cut.to_wire()


class StubUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.queries = 0

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queries += 1
        answer = stub_answer(data, over_tcp=False)
        if answer is not None:
            self.transport.sendto(answer, addr)


async def stub_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        answer = stub_answer(await reader.readexactly(n), over_tcp=True)
        if answer is not None:
            writer.write(struct.pack("!H", len(answer)) + answer)
            await writer.drain()
    finally:
        writer.close()


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    tcp = await asyncio.start_server(stub_tcp, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    udp, _ = await loop.create_datagram_endpoint(StubUdp, local_addr=("127.0.0.1", port))
    yield ("127.0.0.1", port)
    udp.close()
    tcp.close()
    await tcp.wait_closed()


def query_packet(name: str, rdtype: str = "A", sport: int = 40000) -> tuple[bytes, int]:
    query = dns.message.make_query(name, rdtype)
    return build_udp(CLIENT, sport, SERVICE_V4, 53, query.to_wire()), query.id


def answer_of(packet: bytes) -> dns.message.Message:
    # the reply goes from the service to the client: parse it with the roles swapped
    swapped = packet[:12] + packet[16:20] + packet[12:16] + packet[20:]
    swapped = swapped[:22] + b"\x00\x35" + swapped[24:]
    return dns.message.from_wire(parse_udp(swapped).payload)


@pytest.mark.asyncio
async def test_local_names_answered_from_the_packet(upstream: tuple[str, int]) -> None:
    async with DnsServer(TABLE, [upstream]) as server:
        packet, qid = query_packet("laptop.mesh.internal")
        reply = server.handle_tun_packet(packet)
        assert reply is not None
        answer = answer_of(reply)
        assert answer.id == qid
        assert answer.answer[0][0].to_text() == "100.64.0.7"
        assert server.handle_tun_packet(b"\x45garbage") is None
        assert server.stats()["drop_malformed_packet"] == 1


@pytest.mark.asyncio
async def test_forwarded_over_udp_and_tcp(upstream: tuple[str, int]) -> None:
    written: asyncio.Queue[bytes] = asyncio.Queue()
    async with DnsServer(TABLE, [upstream], write_tun=written.put_nowait) as server:
        packet, qid = query_packet("www.example")
        assert server.handle_tun_packet(packet) is None
        answer = answer_of(await asyncio.wait_for(written.get(), 5))
        assert answer.id == qid
        assert answer.answer[0][0].to_text() == "192.0.2.1"
        # too big for UDP: the upstream truncates, we ask over TCP, the client gets TC
        packet, qid = query_packet("big.example")
        assert server.handle_tun_packet(packet) is None
        answer = answer_of(await asyncio.wait_for(written.get(), 5))
        assert answer.id == qid
        assert answer.flags & dns.flags.TC
        stats = server.stats()
        assert stats["forward_retry_tcp"] == 1
        assert stats["forward_answered"] == 2


@pytest.mark.asyncio
async def test_timeout_servfail_and_failover(upstream: tuple[str, int]) -> None:
    written: asyncio.Queue[bytes] = asyncio.Queue()
    dead = ("127.0.0.1", 9)  # nothing answers there
    limits = ForwardLimits(timeout=0.3, max_outstanding=2)
    async with DnsServer(TABLE, [dead, upstream], write_tun=written.put_nowait, limits=limits) as s:
        packet, qid = query_packet("www.example")
        assert s.handle_tun_packet(packet) is None
        answer = answer_of(await asyncio.wait_for(written.get(), 5))
        assert answer.rcode() == dns.rcode.SERVFAIL
        assert answer.id == qid
        # the next query goes to the second upstream
        packet, _ = query_packet("www.example")
        s.handle_tun_packet(packet)
        assert answer_of(await asyncio.wait_for(written.get(), 5)).rcode() == dns.rcode.NOERROR
        # bounded: two silent queries fill the table, the third is SERVFAIL at once
        for i in range(2):
            assert s.handle_tun_packet(query_packet("slow.example", sport=41000 + i)[0]) is None
        full = s.handle_tun_packet(query_packet("slow.example", sport=42000)[0])
        assert full is not None
        assert answer_of(full).rcode() == dns.rcode.SERVFAIL
        assert s.stats()["forward_drop_forward_full"] == 1


@pytest.mark.asyncio
async def test_no_upstream_servfail() -> None:
    async with DnsServer(TABLE, []) as server:
        reply = server.handle_tun_packet(query_packet("www.example")[0])
        assert reply is not None
        assert answer_of(reply).rcode() == dns.rcode.SERVFAIL


@pytest.mark.asyncio
async def test_sockets_udp_and_tcp(upstream: tuple[str, int]) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with DnsServer(TABLE, [upstream]) as server:
        await server.serve_sockets("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        for name, expect in (("laptop.mesh.internal", "100.64.0.7"), ("www.example", "192.0.2.1")):
            query = dns.message.make_query(name, "A")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            wire = query.to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
            (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
            answer = dns.message.from_wire(await reader.readexactly(n))
            writer.close()
            assert answer.answer[0][0].to_text() == expect
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, wire)
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            assert dns.message.from_wire(data).answer[0][0].to_text() == expect


def test_parse_resolv_conf() -> None:
    text = (
        "# comment\nnameserver 192.0.2.1\nnameserver fe80::1%eth0 # link-local\n"
        "search lan\nnameserver not-an-address\noptions edns0\n nameserver 192.0.2.2\n"
    )
    assert parse_resolv_conf(text) == [
        ipaddress.ip_address("192.0.2.1"),
        ipaddress.ip_address("fe80::1"),
        ipaddress.ip_address("192.0.2.2"),
    ]


def test_system_upstreams(tmp_path: Path) -> None:
    conf, real = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    conf.write_text("nameserver 192.0.2.1\nnameserver 100.100.100.100\n")
    assert system_upstreams(conf, real) == [ipaddress.ip_address("192.0.2.1")]
    conf.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    real.write_text(
        "nameserver 198.51.100.1\nnameserver 100.100.100.100\nnameserver 198.51.100.1\n"
    )
    assert system_upstreams(conf, real) == [ipaddress.ip_address("198.51.100.1")]
    assert system_upstreams(tmp_path / "missing", tmp_path / "missing2") == []


# ------------------------------------------------------------------------------- resolved


def test_resolved_messages() -> None:
    from jeepney import HeaderFields  # type: ignore[import-untyped]
    from jeepney.low_level import Message  # type: ignore[import-untyped]

    msg = resolved.set_link_dns(7, [SERVICE_V4, SERVICE_V6])
    fields = msg.header.fields
    assert fields[HeaderFields.destination] == "org.freedesktop.resolve1"
    assert fields[HeaderFields.path] == "/org/freedesktop/resolve1"
    assert fields[HeaderFields.interface] == "org.freedesktop.resolve1.Manager"
    assert fields[HeaderFields.member] == "SetLinkDNS"
    assert fields[HeaderFields.signature] == "ia(iay)"
    assert msg.body == (
        7,
        [(socket.AF_INET, bytes([100, 100, 100, 100])), (socket.AF_INET6, SERVICE_V6.packed)],
    )
    domains = resolved.set_link_domains(7, [("mesh.internal", False)])
    assert domains.header.fields[HeaderFields.signature] == "ia(sb)"
    assert domains.body == (7, [("mesh.internal", False)])
    route = resolved.set_link_default_route(7, False)
    assert (route.header.fields[HeaderFields.member], route.body) == (
        "SetLinkDefaultRoute",
        (7, False),
    )
    revert = resolved.revert_link(7)
    assert (revert.header.fields[HeaderFields.member], revert.body) == ("RevertLink", (7,))
    # every message serialises and parses back unchanged (the bytes resolved would get)
    for m in (msg, domains, route, revert):
        data = m.serialise(serial=1)
        assert Message.from_buffer(data).body == m.body


def test_manual_hint_names_the_service() -> None:
    hint = resolved.manual_hint("mesh.internal")
    assert "100.100.100.100" in hint
    assert "server=/mesh.internal/100.100.100.100" in hint


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[str]:
    """A private dbus-daemon (no resolved on it): proves connection and absence handling only."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon not installed")
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1", "--nopidfile"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.asyncio
async def test_resolved_absent_gives_a_hint(
    session_bus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", session_bus)
    result = await resolved.ResolvedLink.connect(bus="SESSION", domain="mesh.internal")
    assert isinstance(result, resolved.ResolvedUnavailable)
    assert "org.freedesktop.resolve1 is not on the session bus" in result.reason
    assert "100.100.100.100" in result.hint


@pytest.mark.asyncio
async def test_no_bus_gives_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path}/nothing")
    result = await resolved.ResolvedLink.connect(bus="SESSION")
    assert isinstance(result, resolved.ResolvedUnavailable)
    assert "no D-Bus session bus" in result.reason
