"""StunSender: one sender for the StunProber's rounds and the netcheck driver's reports, each
answer routed back to the one that asked. Real cores (StunProber, Netchecker through
NetcheckDriver); only the socket is replaced, by an in-memory STUN server that sees us at
MAPPED and answers on the next turn of the event loop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from agent.config import DerpConfig, DerpNode, DerpRegion
from agent.engine.netcheck import Netchecker, NetcheckTimings
from agent.engine.stun_probe import StunProber, StunServer
from agent.node.netcheck_cmd import NetcheckDriver
from agent.node.stun_sender import StunSender, stun_servers
from agent.proto import stun

SERVER = ("192.0.2.1", 3478)
MAPPED = ("198.51.100.7", 40000)
DERP = DerpConfig(
    regions=(DerpRegion(id=1, code="one", nodes=(DerpNode(host=SERVER[0], stun_port=SERVER[1]),)),)
)
FAST = NetcheckTimings(stun_timeout=0.5, https_timeout=0.2)


class StunServerWire:
    """The WireGuard socket's send_batch, with a STUN server behind it."""

    def __init__(self, *, fail: bool = False) -> None:
        self.requests: list[tuple[bytes, tuple[str, int]]] = []
        self.sender: StunSender | None = None
        self.fail = fail

    def send_batch(self, datagrams: Sequence[bytes], endpoint: tuple[str, int]) -> int:
        if self.fail:
            return len(datagrams)
        loop = asyncio.get_running_loop()
        for data in datagrams:
            self.requests.append((data, endpoint))
            answer = stun.binding_response(stun.parse_binding_request(data), MAPPED)
            loop.call_soon(self._deliver, answer, endpoint)
        return 0

    def _deliver(self, answer: bytes, src: tuple[str, int]) -> None:
        assert self.sender is not None
        assert self.sender.receive(answer, src, asyncio.get_running_loop().time())


def make(wire: StunServerWire) -> tuple[StunSender, NetcheckDriver]:
    rng = random.Random(7)
    prober = StunProber(stun_servers(DERP), randbytes=rng.randbytes)
    sender = StunSender(wire.send_batch, prober)
    wire.sender = sender
    driver = NetcheckDriver(
        DERP, sender.send_request, netchecker=Netchecker(timings=FAST, randbytes=rng.randbytes)
    )
    sender.netcheck = driver
    return sender, driver


def test_stun_servers_are_the_derp_nodes_given_by_address() -> None:
    by_name = DerpRegion(id=2, code="two", nodes=(DerpNode(host="derp.example", stun_port=3478),))
    no_stun = DerpRegion(id=3, code="three", nodes=(DerpNode(host="192.0.2.3", stun_port=0),))
    derp = DerpConfig(regions=(*DERP.regions, by_name, no_stun))
    assert stun_servers(derp) == [StunServer(1, SERVER)]


@pytest.mark.asyncio
async def test_one_sender_serves_the_prober_and_a_netcheck_report_at_once() -> None:
    wire = StunServerWire()
    sender, driver = make(wire)
    loop = asyncio.get_running_loop()
    report_task = asyncio.create_task(driver.run(full=True))
    await asyncio.sleep(0)  # the report's first probes are out
    netcheck_requests = len(wire.requests)
    assert netcheck_requests >= 1
    sender.start(loop.time())  # the prober's first round, while the report runs
    report = await asyncio.wait_for(report_task, 5)
    # Every request left through the one sender, to the one server
    assert sender.sent == len(wire.requests) == netcheck_requests + 1
    assert {ep for _, ep in wire.requests} == {SERVER}
    assert sender.failed == 0
    # Each answer reached the one that asked
    prober = sender.prober
    assert (prober.sent, prober.answered, prober.ignored) == (1, 1, 0)
    assert prober.public_endpoints() == [MAPPED]
    assert sender.endpoints_changed()
    assert not sender.endpoints_changed()
    assert report.udp
    assert report.global_v4 == MAPPED
    assert set(report.region_v4_latency) == {1}
    # The prober's next round goes out through the same sender
    deadline = sender.next_deadline()
    assert deadline is not None
    sender.on_timer(deadline)
    assert sender.sent == netcheck_requests + 2
    await asyncio.sleep(0)
    assert prober.answered == 2


@pytest.mark.asyncio
async def test_stun_nobody_asked_for_is_consumed_and_counted() -> None:
    wire = StunServerWire()
    sender, _ = make(wire)
    stray = stun.binding_response(b"\x01" * 12, MAPPED)
    assert sender.receive(stray, SERVER, 1.0)
    assert sender.prober.ignored == 1
    assert not sender.receive(b"\x00" * 40, SERVER, 1.0)  # not STUN: someone else's


@pytest.mark.asyncio
async def test_failed_sends_are_counted() -> None:
    wire = StunServerWire(fail=True)
    sender, _ = make(wire)
    sender.start(asyncio.get_running_loop().time())
    assert (sender.sent, sender.failed) == (1, 1)
