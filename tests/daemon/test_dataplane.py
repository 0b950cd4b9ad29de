"""DataPlane drop paths and batching with fake TUN/UDP objects and a real Device core."""

from __future__ import annotations

import struct
from ipaddress import ip_network
from typing import Any

from agent.daemon.dataplane import DataPlane
from agent.daemon.offload import NO_OFFLOAD
from agent.keys import NodePrivate
from agent.proto.errors import DropReason
from agent.proto.wireguard.device import Device

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


def make(endpoint: tuple[str, int] | None) -> tuple[DataPlane, FakeTun, FakeUdp, Device]:
    dev = Device(NodePrivate.generate())
    dev.add_peer(
        NodePrivate.generate().public(),
        endpoint=endpoint,
        allowed_ips=[ip_network("100.64.0.2/32")],
    )
    tun, udp = FakeTun(), FakeUdp()
    activity: list[int] = []
    dp = DataPlane(tun, udp, dev, lambda: 1.0, lambda: activity.append(1))  # type: ignore[arg-type]
    return dp, tun, udp, dev


def test_unroutable_non_ip_and_no_endpoint_are_counted() -> None:
    dp, tun, udp, _ = make(None)
    tun.reads = [ipv4(A_IP, bytes([10, 0, 0, 1])), b"\x00garbage", ipv4(A_IP, B_IP)]
    dp.on_tun_readable()
    assert dp.stats.drops[DropReason.NO_ROUTE] == 1
    assert dp.stats.drops[DropReason.NOT_IP] == 1
    assert dp.stats.drops[DropReason.NO_ENDPOINT] == 1
    assert udp.sent == []


def test_a_batch_for_one_peer_starts_one_handshake() -> None:
    dp, tun, udp, dev = make(("198.18.0.2", 41641))
    tun.reads = [ipv4(A_IP, B_IP) for _ in range(10)]
    dp.on_tun_readable()
    assert len(udp.sent) == 1
    assert udp.sent[0][0][0] == 1  # one initiation; the packets are staged
    (peer,) = dev.peers.values()
    assert len(peer.staged) == 10


def test_garbage_datagrams_are_dropped_and_counted() -> None:
    dp, tun, udp, dev = make(("198.18.0.2", 41641))
    udp.inbox = [([memoryview(b"\x04" + bytes(40)), memoryview(b"junk")], ("198.18.0.2", 41641))]
    dp.on_udp_readable()
    assert tun.written == []
    assert dev.drops[DropReason.UNKNOWN_RECEIVER] == 1
    assert dp.stats.drops[DropReason.MALFORMED] == 1  # not WireGuard, and nobody claimed it


def test_non_wireguard_datagrams_go_to_the_foreign_handler() -> None:
    seen: list[tuple[list[bytes], tuple[str, int], Any]] = []
    dp, _tun, udp, dev = make(("198.18.0.2", 41641))
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


def test_two_devices_handshake_and_carry_packets_through_derp_only() -> None:
    from agent.daemon.transport import PeerTransport
    from agent.engine.paths import PathTable

    ka, kb = NodePrivate.generate(), NodePrivate.generate()
    sides = {}
    for me, other, mine, theirs in ((ka, kb, A_IP, B_IP), (kb, ka, B_IP, A_IP)):
        dev = Device(me)
        dev.add_peer(other.public(), allowed_ips=[ip_network(f"{'.'.join(map(str, theirs))}/32")])
        paths = PathTable(900)
        paths.add_peer(other.public(), derp_region=900)
        tun, udp, derp = FakeTun(), FakeUdp(), FakeDerp()
        transport = PeerTransport(udp, derp, paths)  # type: ignore[arg-type]
        dp = DataPlane(tun, udp, dev, lambda: 1.0, lambda: None, sender=transport)  # type: ignore[arg-type]
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
