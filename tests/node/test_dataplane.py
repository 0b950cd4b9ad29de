"""DataPlane drop paths and batching with fake TUN/UDP objects and a real Device core."""

from __future__ import annotations

import struct
from ipaddress import ip_network
from typing import Any

import pytest

from agent.keys import NodePrivate
from agent.node.dataplane import DataPlane
from agent.proto.errors import DropReason
from agent.proto.offload import NO_OFFLOAD, ZERO_VNET_HDR
from agent.proto.wireguard.device import Device
from agent.proto.wireguard.transport import PYTHON, Transport

A_IP = bytes([100, 64, 0, 1])
B_IP = bytes([100, 64, 0, 2])


def ipv4(src: bytes, dst: bytes, payload: bytes = b"x" * 20) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, 17, 0, src, dst)
    return hdr + payload


class FakeTun:
    vnet_hdr = False

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.written: list[bytes] = []

    def fileno(self) -> int:
        return -1

    def read_frames(self, max_packets: int) -> tuple[list[tuple[Any, memoryview]], None]:
        return self.read_batch(max_packets), None

    def read_batch(self, max_packets: int) -> list[tuple[Any, memoryview]]:
        out = [(NO_OFFLOAD, memoryview(p)) for p in self.reads[:max_packets]]
        del self.reads[:max_packets]
        return out

    def write_packets(self, packets: list[bytes]) -> int:
        self.written.extend(bytes(p) for p in packets)
        return 0


class FakeUdp:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.inbox: list[tuple[list[memoryview], tuple[str, int]]] = []

    def fileno(self) -> int:
        return -1

    def send_batch(self, datagrams: list[bytes], addr: tuple[str, int]) -> int:
        self.sent.extend((bytes(d), addr) for d in datagrams)
        return 0

    def recv_batch(self, max_datagrams: int) -> list[tuple[list[memoryview], tuple[str, int]]]:
        out, self.inbox = self.inbox, []
        return out


TRANSPORTS = [PYTHON]
try:
    from agent.node.fastpath import native_module, native_transport

    TRANSPORTS.append(native_transport(native_module()))
except ImportError:  # the compiled module is not built: the Python twin only
    pass


@pytest.fixture(params=TRANSPORTS, ids=lambda t: t.name)
def transport(request: pytest.FixtureRequest) -> Transport:
    """Every test runs with the Python twin and, where it is built, the compiled module."""
    t: Transport = request.param
    return t


def drain_tun(dp: DataPlane, tun: FakeTun) -> None:
    """Readiness until the fake TUN is empty (a wakeup after a quiet spell reads only once)."""
    for _ in range(100):
        if not tun.reads:
            return
        dp.on_tun_readable()
    raise AssertionError("the TUN was never drained")


def make(
    endpoint: tuple[str, int] | None, transport: Transport = PYTHON
) -> tuple[DataPlane, FakeTun, FakeUdp, Device]:
    dev = Device(NodePrivate.generate(), transport=transport)
    dev.add_peer(
        NodePrivate.generate().public(),
        endpoint=endpoint,
        allowed_ips=[ip_network("100.64.0.2/32")],
    )
    tun, udp = FakeTun(), FakeUdp()
    activity: list[int] = []
    dp = DataPlane(tun, udp, dev, lambda: 1.0, lambda: activity.append(1))  # type: ignore[arg-type]
    return dp, tun, udp, dev


def test_unroutable_non_ip_and_no_endpoint_are_counted(transport: Transport) -> None:
    dp, tun, udp, _ = make(None, transport)
    tun.reads = [ipv4(A_IP, bytes([10, 0, 0, 1])), b"\x00garbage", ipv4(A_IP, B_IP)]
    drain_tun(dp, tun)
    assert dp.stats.drops[DropReason.NO_ROUTE] == 1
    assert dp.stats.drops[DropReason.NOT_IP] == 1
    assert dp.stats.drops[DropReason.NO_ENDPOINT] == 1
    assert udp.sent == []


def test_a_batch_for_one_peer_starts_one_handshake(transport: Transport) -> None:
    dp, tun, udp, dev = make(("198.18.0.2", 41641), transport)
    tun.reads = [ipv4(A_IP, B_IP) for _ in range(10)]
    drain_tun(dp, tun)
    assert len(udp.sent) == 1
    assert udp.sent[0][0][0] == 1  # one initiation; the packets are staged
    (peer,) = dev.peers.values()
    assert len(peer.staged) == 10


def test_garbage_datagrams_are_dropped_and_counted(transport: Transport) -> None:
    dp, tun, udp, dev = make(("198.18.0.2", 41641), transport)
    udp.inbox = [([memoryview(b"\x04" + bytes(40)), memoryview(b"junk")], ("198.18.0.2", 41641))]
    dp.on_udp_readable()
    assert tun.written == []
    assert dev.drops[DropReason.UNKNOWN_RECEIVER] == 1
    assert dp.stats.drops[DropReason.MALFORMED] == 1  # not WireGuard, and nobody claimed it


def test_non_wireguard_datagrams_go_to_the_foreign_handler(transport: Transport) -> None:
    seen: list[tuple[list[bytes], tuple[str, int], Any]] = []
    dp, _tun, udp, dev = make(("198.18.0.2", 41641), transport)
    dp.on_foreign = lambda dgs, src, key, now: seen.append(([bytes(d) for d in dgs], src, key))
    disco = "TS💬".encode() + bytes(60)
    stun_response = bytes([1, 1, 0, 12]) + bytes(28)  # Binding success: starts 0x0101
    udp.inbox = [([memoryview(disco), memoryview(stun_response)], ("198.18.0.9", 3478))]
    dp.on_udp_readable()
    assert seen == [([disco, stun_response], ("198.18.0.9", 3478), None)]
    assert not dp.stats.drops
    assert not any(dev.drops.values())


class FakeDerp:
    """Stands for DerpClients: records (region, dst, datagrams)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, Any, list[bytes]]] = []

    def send(self, region: int, dst: Any, datagrams: list[bytes]) -> int:
        self.sent.append((region, dst, [bytes(d) for d in datagrams]))
        return 0


def test_two_devices_handshake_and_carry_packets_through_derp_only(transport: Transport) -> None:
    from agent.engine.paths import PathTable
    from agent.node.transport import PeerTransport

    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    sides = {}
    for me, other, mine, theirs in ((ka, kb, A_IP, B_IP), (kb, ka, B_IP, A_IP)):
        dev = Device(me, transport=transport)
        dev.add_peer(other.public(), allowed_ips=[ip_network(f"{'.'.join(map(str, theirs))}/32")])
        paths = PathTable(900)
        paths.add_peer(other.public(), derp_region=900)
        tun, udp, derp = FakeTun(), FakeUdp(), FakeDerp()
        sender = PeerTransport(udp, derp, paths)  # type: ignore[arg-type]
        dp = DataPlane(tun, udp, dev, lambda: 1.0, lambda: None, sender=sender)  # type: ignore[arg-type]
        sides[me.public()] = (dp, tun, udp, derp, paths, mine)

    def pump() -> None:
        for _ in range(5):
            for key, (_dp, _tun, _udp, derp, _paths, _ip) in sides.items():
                sent, derp.sent = derp.sent, []
                for region, dst, datagrams in sent:
                    sides[dst][0].on_relayed(region, key, datagrams)

    dp_a, tun_a, udp_a, _, paths_a, _ = sides[ka.public()]
    dp_b, tun_b, udp_b, _, paths_b, _ = sides[kb.public()]
    tun_a.reads = [ipv4(A_IP, B_IP, b"hello through the relay")]
    dp_a.on_tun_readable()
    pump()
    assert tun_b.written == [ipv4(A_IP, B_IP, b"hello through the relay")]
    assert udp_a.sent == []  # no UDP endpoint known: DERP only
    assert udp_b.sent == []
    assert paths_a.status(kb.public(), 1.0).path == "derp"
    assert paths_b.status(ka.public(), 1.0).derp_region == 900
    tun_b.reads = [ipv4(B_IP, A_IP, b"and back")]
    dp_b.on_tun_readable()
    pump()
    assert tun_a.written == [ipv4(B_IP, A_IP, b"and back")]
    assert dp_a.stats.rx_packets == 1
    assert dp_b.stats.rx_packets == 1


class VnetTun(FakeTun):
    """A TUN with a vnet header and USO: reads carry headers, writes are coalesced items."""

    vnet_hdr = True
    offload = "tso+uso"

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[Any, memoryview]] = []
        self.items: list[tuple[bytes, list[Any]]] = []

    def read_batch(self, max_packets: int) -> list[tuple[Any, memoryview]]:
        out, self.frames = self.frames, []
        return out

    def write_coalesced(self, items: list[tuple[bytes, list[Any]]]) -> int:
        self.items.extend(items)
        return 0

    def write_packets(self, packets: list[Any]) -> int:
        self.items.extend((ZERO_VNET_HDR, [p]) for p in packets)
        return 0


def _udp_partial(src: bytes, dst: bytes, payload: bytes, ip_id: int) -> bytes:
    """A UDP packet as the kernel hands it with NEEDS_CSUM: the pseudo-header sum in the field."""
    ulen = 8 + len(payload)
    ih = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ip_id, 0x4000, 64, 17, 0, src, dst)
    total = sum(struct.unpack("!4H", src + dst)) + 17 + ulen
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    s = sum(struct.unpack("!10H", ih))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    ih = ih[:10] + struct.pack("!H", ~s & 0xFFFF) + ih[12:]
    return ih + struct.pack("!HHHH", 4000, 5000, ulen, total) + payload


def test_small_udp_through_two_planes_is_checksummed_and_coalesced(transport: Transport) -> None:
    from agent.proto.offload import F_NEEDS_CSUM, GSO_UDP_L4, VirtioNetHdr, segment

    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    dev_a, dev_b = Device(ka, transport=transport), Device(kb, transport=transport)
    dev_a.add_peer(
        kb.public(), endpoint=("198.18.0.2", 1), allowed_ips=[ip_network("100.64.0.2/32")]
    )
    dev_b.add_peer(
        ka.public(), endpoint=("198.18.0.1", 1), allowed_ips=[ip_network("100.64.0.1/32")]
    )
    tun_a, tun_b = VnetTun(), VnetTun()
    udp_a, udp_b = FakeUdp(), FakeUdp()
    dp_a = DataPlane(tun_a, udp_a, dev_a, lambda: 1.0, lambda: None)  # type: ignore[arg-type]
    dp_b = DataPlane(tun_b, udp_b, dev_b, lambda: 1.0, lambda: None)  # type: ignore[arg-type]

    def pump() -> None:
        for _ in range(4):
            for src, dst, dp, ep in (
                (udp_a, udp_b, dp_b, "198.18.0.1"),
                (udp_b, udp_a, dp_a, "198.18.0.2"),
            ):
                sent, src.sent = src.sent, []
                if sent:
                    dst.inbox = [([memoryview(d) for d, _ in sent], (ep, 1))]
                    dp.on_udp_readable()

    csum = VirtioNetHdr(F_NEEDS_CSUM, 0, 0, 0, 20, 6)
    nowhere = bytes([10, 9, 9, 9])
    packets = [_udp_partial(A_IP, B_IP, bytes([i]) * 64, 100 + i) for i in range(10)]
    frames = []
    for p in packets:  # alternate a routable and an unroutable destination
        frames.append((csum, memoryview(p)))
        frames.append((csum, memoryview(_udp_partial(A_IP, nowhere, b"x" * 64, 1))))
    tun_a.frames = frames[:2]  # the first packet starts the handshake and is staged
    dp_a.on_tun_readable()
    pump()
    tun_a.frames = frames[2:]
    dp_a.on_tun_readable()
    pump()

    assert dp_a.stats.drops[DropReason.NO_ROUTE] == 10
    assert dp_b.stats.rx_packets == 10
    got: list[bytes] = []
    for head, bufs in tun_b.items:
        hdr = VirtioNetHdr.parse(head)
        body = head[10:] + b"".join(bytes(b) for b in bufs)
        if hdr.gso_type == GSO_UDP_L4:
            got.extend(bytes(s) for s in segment(hdr, body))
        else:
            got.append(body)
    assert [g[28:] for g in got] == [p[28:] for p in packets]
    for g in got:  # the UDP checksum was finished on the way out
        words = sum(struct.unpack("!4H", g[12:20])) + 17 + len(g) - 20
        words += sum(struct.unpack(f"!{(len(g) - 20) // 2}H", g[20:]))
        while words > 0xFFFF:
            words = (words & 0xFFFF) + (words >> 16)
        assert words == 0xFFFF
    assert any(VirtioNetHdr.parse(h).gso_type == GSO_UDP_L4 for h, _ in tun_b.items)


class EchoTun(FakeTun):
    """A TUN whose kernel answers every written packet at once (an echo reply, a TCP ACK)."""

    def write_packets(self, packets: list[bytes]) -> int:
        super().write_packets(packets)
        for p in packets:
            p = bytes(p)
            self.reads.append(ipv4(p[16:20], p[12:16], b"reply:" + p[20:]))
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _linked_planes(
    clock: Clock, transport: Transport
) -> tuple[tuple[DataPlane, FakeTun, FakeUdp], tuple[DataPlane, EchoTun, FakeUdp]]:
    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    dev_a, dev_b = Device(ka, transport=transport), Device(kb, transport=transport)
    dev_a.add_peer(kb.public(), endpoint=("198.18.0.2", 1), allowed_ips=[ip_network(f"{B4}/32")])
    dev_b.add_peer(ka.public(), endpoint=("198.18.0.1", 1), allowed_ips=[ip_network(f"{A4}/32")])
    tun_a, tun_b = FakeTun(), EchoTun()
    udp_a, udp_b = FakeUdp(), FakeUdp()
    dp_a = DataPlane(tun_a, udp_a, dev_a, clock, lambda: None)  # type: ignore[arg-type]
    dp_b = DataPlane(tun_b, udp_b, dev_b, clock, lambda: None)  # type: ignore[arg-type]
    return (dp_a, tun_a, udp_a), (dp_b, tun_b, udp_b)


A4, B4 = "100.64.0.1", "100.64.0.2"


def _deliver(src: FakeUdp, dst: FakeUdp, dp: DataPlane, ep: str) -> int:
    sent, src.sent = src.sent, []
    if sent:
        dst.inbox = [([memoryview(d) for d, _ in sent], (ep, 1))]
        dp.on_udp_readable()
    return len(sent)


def test_a_reply_the_tun_write_provoked_leaves_in_the_same_wakeup(transport: Transport) -> None:
    clock = Clock()
    (dp_a, tun_a, udp_a), (dp_b, tun_b, udp_b) = _linked_planes(clock, transport)
    tun_a.reads = [ipv4(A_IP, B_IP, b"ping")]
    dp_a.on_tun_readable()  # stages the packet, sends an initiation
    for _ in range(3):  # initiation, response (+ the staged packet), then its echo
        _deliver(udp_a, udp_b, dp_b, "198.18.0.1")
        if tun_b.reads:  # the event loop's turn: the TUN is readable
            dp_b.on_tun_readable()
        _deliver(udp_b, udp_a, dp_a, "198.18.0.2")
    assert tun_b.written == [ipv4(A_IP, B_IP, b"ping")]
    assert tun_a.written == [ipv4(B_IP, A_IP, b"reply:ping")]
    # A lone packet much later: b writes it, reads the answer and sends it in one wakeup.
    clock.now += 5.0
    tun_a.reads = [ipv4(A_IP, B_IP, b"again")]
    dp_a.on_tun_readable()
    assert _deliver(udp_a, udp_b, dp_b, "198.18.0.1") == 1
    assert tun_b.reads == []
    assert len(udp_b.sent) == 1
    _deliver(udp_b, udp_a, dp_a, "198.18.0.2")
    assert tun_a.written[-1] == ipv4(B_IP, A_IP, b"reply:again")
    assert dp_b.stats.tun_reads == dp_b.stats.tun_writes == 2
    # The answer to something we sent a moment ago is not followed by a read of the TUN.
    reads = dp_a.stats.tun_reads
    tun_a.reads = [ipv4(A_IP, B_IP, b"third")]
    clock.now += 5.0
    dp_a.on_tun_readable()
    clock.now += 0.0002
    _deliver(udp_a, udp_b, dp_b, "198.18.0.1")
    tun_a.reads = [ipv4(A_IP, B_IP, b"queued")]
    _deliver(udp_b, udp_a, dp_a, "198.18.0.2")
    assert tun_a.written[-1] == ipv4(B_IP, A_IP, b"reply:third")
    assert dp_a.stats.tun_reads == reads + 1
    assert len(tun_a.reads) == 1


class CountingUdp(FakeUdp):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def recv_batch(self, max_datagrams: int) -> list[tuple[list[memoryview], tuple[str, int]]]:
        self.asked.append(max_datagrams)
        return super().recv_batch(max_datagrams)


def test_a_wakeup_after_a_quiet_spell_reads_once_and_a_busy_one_drains(
    transport: Transport,
) -> None:
    clock = Clock()
    dev = Device(NodePrivate.generate(), transport=transport)
    dev.add_peer(NodePrivate.generate().public(), allowed_ips=[ip_network(f"{B4}/32")])
    tun, udp = FakeTun(), CountingUdp()
    dp = DataPlane(tun, udp, dev, clock, lambda: None)  # type: ignore[arg-type]
    tun.reads = [ipv4(A_IP, B_IP) for _ in range(5)]
    dp.on_tun_readable()
    assert dp.stats.tun_reads == 1
    assert len(tun.reads) == 4
    clock.now += 0.0001  # readable again at once (level-triggered): drain
    dp.on_tun_readable()
    assert dp.stats.tun_reads == 5
    assert tun.reads == []
    assert dp.stats.drops[DropReason.NO_ENDPOINT] == 5  # every packet still counted
    clock.now += 1.0
    tun.reads = [ipv4(A_IP, B_IP) for _ in range(2)]
    dp.on_tun_readable()
    assert dp.stats.tun_reads == 6
    dp.on_udp_readable()
    clock.now += 0.0001
    dp.on_udp_readable()
    assert udp.asked == [1, dp.max_datagrams]


def test_a_packet_for_no_peer_may_be_served_locally(transport: Transport) -> None:
    """The DNS service address is no peer's: on_local takes it, routed traffic never asks."""
    dp, tun, _, _ = make(("198.18.0.2", 41641), transport)
    taken: list[bytes] = []

    def serve(pkt: bytes) -> bool:
        taken.append(pkt)
        return pkt[16:20] == bytes([100, 100, 100, 100])

    dp.on_local = serve
    dns = ipv4(A_IP, bytes([100, 100, 100, 100]))
    tun.reads = [dns, ipv4(A_IP, bytes([10, 0, 0, 1])), ipv4(A_IP, B_IP)]
    drain_tun(dp, tun)
    assert taken == [dns, ipv4(A_IP, bytes([10, 0, 0, 1]))]  # the routed packet was not offered
    assert dp.stats.local == 1
    assert dp.stats.drops[DropReason.NO_ROUTE] == 1
