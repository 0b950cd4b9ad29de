"""The packet filter in the data plane: a real WireGuard pair, a policy on b, fake TUN and UDP.

What b's TUN receives from a is what b's policy lets through; replies to flows b opened pass;
without a policy everything passes. (The netns test with a coordinator and four nodes is
tests/integration/test_access_policy.py.)
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Interface, ip_address

from agent.node.access import Access
from agent.node.fastpath import PythonTunIo
from agent.policy.checks import check_policy
from agent.policy.compile import CompiledPolicy
from agent.policy.rules import FilterRule, Node
from agent.proto.errors import DropReason
from agent.proto.wireguard.transport import PYTHON
from tests.node.test_dataplane import (
    A4,
    B4,
    Clock,
    FakeTun,
    _deliver,
    _linked_planes,
    drain_tun,
)

A_IP, B_IP = ip_address(A4).packed, ip_address(B4).packed

POLICY = f"""{{
  // a may query b's port 53 over UDP; nothing else is opened towards b
  "acls": [{{"action": "accept", "src": ["{A4}"], "dst": ["{B4}:53"], "proto": "udp"}}],
  "tests": [{{"src": "{A4}", "proto": "udp", "accept": ["{B4}:53"], "deny": ["{B4}:22"]}}],
}}"""


def udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes = b"data") -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
    return ip + udp


def b_rules() -> tuple[FilterRule, ...]:
    me = Node(0, "b", None, frozenset(), (ip_address(B4),))
    return CompiledPolicy(check_policy(POLICY, nodes=[me]), [me]).filter_for(0)


def test_policy_on_b_decides_what_a_may_open() -> None:
    clock = Clock()
    (dp_a, tun_a, udp_a), (dp_b, _, udp_b) = _linked_planes(clock, PYTHON)
    tun_b = FakeTun()
    dp_b.tun = tun_b  # type: ignore[assignment]  # no echo: replies are made by hand below
    dp_b.tun_io = PythonTunIo(tun_b)
    dp_b.access = Access(clock)
    dp_b.access.set_rules(b_rules(), [IPv4Interface(f"{B4}/32")])

    def a_sends(*packets: bytes) -> None:
        tun_a.reads = list(packets)
        drain_tun(dp_a, tun_a)
        for _ in range(3):  # handshake, then the data
            _deliver(udp_a, udp_b, dp_b, "198.18.0.1")
            _deliver(udp_b, udp_a, dp_a, "198.18.0.2")

    allowed, denied = udp4(A_IP, B_IP, 1000, 53), udp4(A_IP, B_IP, 1000, 99)
    a_sends(allowed, denied)
    assert tun_b.written == [allowed]
    assert dp_b.stats.drops[DropReason.FILTER_DENIED] == 1

    # b opens a flow to a:3000; a's answer from 3000 passes, though no rule opens port 2000.
    tun_b.reads = [udp4(B_IP, A_IP, 2000, 3000)]
    dp_b.on_tun_readable()
    _deliver(udp_b, udp_a, dp_a, "198.18.0.2")
    reply, stranger = udp4(A_IP, B_IP, 3000, 2000), udp4(A_IP, B_IP, 3001, 2000)
    a_sends(reply, stranger)
    assert tun_b.written[1:] == [reply]
    assert dp_b.stats.drops[DropReason.FILTER_DENIED] == 2

    # No policy: everything passes again.
    dp_b.access.set_rules(None, [])
    a_sends(denied)
    assert tun_b.written[-1] == denied
    assert dp_b.stats.drops[DropReason.FILTER_DENIED] == 2


def test_rules_are_replaced_live_and_flows_kept() -> None:
    access = Access(Clock())
    access.set_rules(b_rules(), [IPv4Interface(f"{B4}/32")])
    drops: dict[DropReason, int] = {}
    access.outbound(udp4(B_IP, A_IP, 2000, 3000))
    assert access.inbound([udp4(A_IP, B_IP, 1000, 53)], drops)
    access.set_rules((), [IPv4Interface(f"{B4}/32")])  # a policy that opens nothing to b
    assert access.inbound([udp4(A_IP, B_IP, 1000, 53)], drops) == []
    assert drops == {DropReason.FILTER_DENIED: 1}
    assert access.inbound([udp4(A_IP, B_IP, 3000, 2000)], drops)  # the open flow survived
    assert access.inbound([b"\x45garbage"], drops) == []
    assert drops[DropReason.FILTER_MALFORMED] == 1


def test_flows_expire_on_the_access_clock() -> None:
    clock = Clock()
    access = Access(clock)
    access.set_rules(b_rules(), [IPv4Interface(f"{B4}/32")])
    drops: dict[DropReason, int] = {}
    reply = udp4(A_IP, B_IP, 3000, 2000)
    access.outbound(udp4(B_IP, A_IP, 2000, 3000))
    clock.now += 119.0
    assert access.inbound([reply, reply], drops) == [reply, reply]  # and keeps the flow open
    clock.now += 119.0
    assert access.inbound([reply], drops) == [reply]
    clock.now += 121.0  # quiet for longer than a UDP flow lives
    assert access.inbound([reply], drops) == []
    assert drops == {DropReason.FILTER_DENIED: 1}
    assert access.filter is not None
    assert access.filter.open_flows == 0
    access.outbound(udp4(B_IP, A_IP, 2000, 3000))  # b speaks again: the flow reopens
    assert access.inbound([reply], drops) == [reply]


def test_tcp_from_this_node_needs_no_flow_state() -> None:
    access = Access(Clock())
    access.set_rules(b_rules(), [IPv4Interface(f"{B4}/32")])
    syn = struct.pack("!HHIIBBHHH", 2000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, B_IP, A_IP)
    access.outbound(header + syn)
    assert access.filter is not None
    assert access.filter.open_flows == 0
