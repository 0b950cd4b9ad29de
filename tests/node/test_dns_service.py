"""DnsService: the data plane's route-miss hook, the bounded queue, names that follow the netmap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import dns.message
import dns.rcode
import pytest

from agent.config import parse_config
from agent.engine.dns_packets import build_udp
from agent.keys import DiscoPrivate, NodePrivate
from agent.node.dataplane import LocalHandler
from agent.node.dns_service import BATCH, BURST, QUEUE_MAX, RATE, DnsService
from agent.node.metrics import Snapshot, render
from agent.proto.coordinator_messages import NetMap, NodeInfo
from agent.proto.derpmap import DerpConfig
from agent.proto.dns.names import SERVICE_V4
from agent.proto.offload import Buffer

OWN = NodePrivate.generate()
PEER = NodePrivate.generate().public()
CONF = f"""
[interface]
private_key = "{OWN.to_b64()}"
addresses = ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]

[dns]
upstreams = []

[[peers]]
name = "static-b"
public_key = "{PEER.to_b64()}"
allowed_ips = ["100.64.0.2/32", "10.9.0.0/24"]
"""
CLIENT = ip_address("100.64.0.1")


class FakeDataPlane:
    on_local: LocalHandler | None = None


class FakeTun:
    name = "agent-test"

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write_packets(self, packets: Sequence[Buffer]) -> int:
        self.written += [bytes(p) for p in packets]
        return 0


def query(name: str, rdtype: str = "A", sport: int = 40000) -> bytes:
    wire = dns.message.make_query(name, rdtype).to_wire()
    return build_udp(CLIENT, sport, SERVICE_V4, 53, wire)


def answers(packet: bytes) -> tuple[str, list[str]]:
    msg = dns.message.from_wire(packet[(20 if packet[0] >> 4 == 4 else 40) + 8 :])
    return dns.rcode.to_text(msg.rcode()), sorted(r.to_text() for rr in msg.answer for r in rr)


def node(i: int, name: str) -> NodeInfo:
    return NodeInfo(
        id=i,
        name=name,
        node_key=OWN.public() if i == 1 else NodePrivate.generate().public(),
        disco_key=DiscoPrivate.generate().public(),
        ipv4=IPv4Address(f"100.64.0.{i}"),
        ipv6=IPv6Address(f"fd7a:115c:a1e0::{i}"),
        endpoints=(),
        home_region=None,
        key_expiry=None,
    )


def netmap(*peers: NodeInfo) -> NetMap:
    return NetMap(
        version=1,
        self_node=node(1, "node-a"),
        peers=peers,
        ipv4_range=IPv4Network("100.64.0.0/10"),
        ipv6_range=IPv6Network("fd7a:115c:a1e0::/48"),
        derp=DerpConfig(),
        dns_domain="corp.internal",
    )


async def started() -> tuple[DnsService, FakeDataPlane, FakeTun]:
    svc = DnsService(parse_config(CONF), "My Laptop", use_resolved=False)
    dp, tun = FakeDataPlane(), FakeTun()
    await svc.start(dp, tun)
    return svc, dp, tun


@pytest.mark.asyncio
async def test_routes_and_static_names_answered_through_the_hook() -> None:
    svc, dp, tun = await started()
    assert [str(r) for r in svc.routes()] == ["100.100.100.100/32", "fd7a:115c:a1e0::53/128"]
    assert dp.on_local is not None
    assert dp.on_local(query("static-b.mesh.internal"))
    assert dp.on_local(query("my-laptop", "AAAA"))
    assert not dp.on_local(build_udp(CLIENT, 1, ip_address("100.64.0.9"), 53, b"x" * 12))
    await asyncio.sleep(0)
    assert [answers(p) for p in tun.written] == [
        ("NOERROR", ["100.64.0.2"]),
        ("NOERROR", ["fd7a:115c:a1e0::1"]),
    ]
    status = svc.status()
    assert status["answered"] == 2
    assert status["names"] == 2
    assert status["resolved"] == "off"
    await svc.close()


@pytest.mark.asyncio
async def test_names_follow_the_netmap_and_a_lost_coordinator() -> None:
    svc, dp, tun = await started()
    assert dp.on_local is not None
    svc.on_netmap(netmap(node(3, "node-c")))
    assert svc.domain == "corp.internal"
    for name in ("node-c.corp.internal", "node-a", "static-b", "my-laptop.corp.internal"):
        dp.on_local(query(name))
    await asyncio.sleep(0)
    assert [answers(p) for p in tun.written] == [
        ("NOERROR", ["100.64.0.3"]),
        ("NOERROR", ["100.64.0.1"]),
        ("NOERROR", ["100.64.0.2"]),
        ("NXDOMAIN", []),
    ]
    tun.written.clear()
    svc.on_netmap(netmap())  # node-c removed
    dp.on_local(query("node-c.corp.internal"))
    await asyncio.sleep(0)
    svc.on_netmap(None)  # out of the network: the config's names again
    dp.on_local(query("my-laptop.mesh.internal"))
    await asyncio.sleep(0)
    assert [answers(p)[0] for p in tun.written] == ["NXDOMAIN", "NOERROR"]
    await svc.close()


@pytest.mark.asyncio
async def test_a_flood_is_bounded_counted_and_answered_a_batch_per_iteration() -> None:
    svc, dp, tun = await started()
    assert dp.on_local is not None
    packet = query("static-b")
    flood = 10 * QUEUE_MAX
    for _ in range(flood):  # all in one TUN drain: nothing answered yet
        assert dp.on_local(packet)
    assert tun.written == []
    assert svc.status()["dropped"] == {"queue_full": flood - QUEUE_MAX}
    batches: list[float] = []
    start = time.monotonic()
    while len(tun.written) < QUEUE_MAX and time.monotonic() - start < 5:
        before, t0 = len(tun.written), time.perf_counter()
        await asyncio.sleep(0)  # one loop iteration: at most one batch
        batches.append(time.perf_counter() - t0)
        assert len(tun.written) - before <= BATCH
    took = time.monotonic() - start
    assert len(tun.written) == QUEUE_MAX
    assert took >= (QUEUE_MAX - BURST) / RATE * 0.9  # the rate held, after the burst
    # one batch keeps the loop away from the tunnel for a few ms at most
    assert max(batches) < 0.05, batches
    status = svc.status()
    assert status["answered"] == QUEUE_MAX
    text = render(Snapshot(dns=status))
    assert f"agent_dns_answered_total {QUEUE_MAX}" in text
    assert f'agent_dns_dropped_total{{reason="queue_full"}} {flood - QUEUE_MAX}' in text
    await svc.close()


@pytest.mark.asyncio
async def test_disabled_takes_nothing() -> None:
    conf = CONF.replace("[dns]\n", "[dns]\nenable = false\n")
    svc = DnsService(parse_config(conf), use_resolved=False)
    dp = FakeDataPlane()
    await svc.start(dp, FakeTun())
    assert svc.routes() == []
    assert dp.on_local is None
    assert svc.status() == {"enabled": False}
    await svc.close()


@pytest.mark.asyncio
async def test_configured_upstreams_are_used() -> None:
    conf = CONF.replace("upstreams = []", 'upstreams = ["127.0.0.1:5353"]')
    svc = DnsService(parse_config(conf), use_resolved=False)
    assert svc.status()["upstreams"] == []  # not started
    await svc.start(FakeDataPlane(), FakeTun())
    assert svc.status()["upstreams"] == ["127.0.0.1:5353"]
    await svc.close()


@pytest.mark.asyncio
async def test_tcp_to_the_service_is_taken_by_the_hook_and_answered() -> None:
    from agent.engine.tcp_segment import ACK, PSH, RST, SYN, build_segment, parse_segment

    svc, dp, tun = await started()
    assert dp.on_local is not None

    def seg(flags: int, seq: int, ack: int = 0, payload: bytes = b"", dport: int = 53) -> bytes:
        return build_segment(
            CLIENT, 40500, SERVICE_V4, dport, seq=seq, ack=ack, flags=flags, window=65535,
            payload=payload, mss=1200 if flags & SYN else None,
        )  # fmt: skip

    assert dp.on_local(seg(SYN, 100))
    await asyncio.sleep(0)
    (syn_ack,) = [parse_segment(p) for p in tun.written]
    assert syn_ack.flags == SYN | ACK
    wire = dns.message.make_query("static-b", "A").to_wire()
    ours = syn_ack.seq + 1
    dp.on_local(seg(ACK, 101, ours))
    dp.on_local(seg(ACK | PSH, 101, ours, len(wire).to_bytes(2, "big") + wire))
    dp.on_local(seg(SYN, 7, dport=80))  # TCP to another port: refused
    await asyncio.sleep(0)
    ack, data, rst = [parse_segment(p) for p in tun.written[1:]]
    assert ack.flags == ACK
    assert rst.flags & RST
    answer = dns.message.from_wire(data.payload[2:])
    assert answer.answer[0][0].to_text() == "100.64.0.2"
    status = svc.status()
    assert status["tcp"] == {"connections": 1, "queries": 1}
    assert status["answered"] == 1
    tun.written.clear()
    await svc.close()
    assert parse_segment(tun.written[0]).flags & RST  # closing resets the open connection
