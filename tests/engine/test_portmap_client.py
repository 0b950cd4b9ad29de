"""The port-mapping client against an in-memory router, on a fake clock."""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from agent.engine.portmap import (
    MappingChanged,
    MappingLost,
    Phase,
    PortmapClient,
    PortmapConfig,
    PortmapTimings,
    ProbeDone,
    Protocol,
)
from agent.proto.portmap import pcp, pmp, ssdp
from agent.proto.portmap.errors import MalformedAnswer
from agent.proto.portmap.http import HttpResponse

GW, ME, WAN = "10.7.0.1", "10.7.0.2", "198.18.7.1"
PORT = 41641
V4 = ipaddress.IPv4Address

DESC = b"""<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device>
<UDN>uuid:1</UDN><serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></root>"""


def _soap(action: str, **out: str) -> HttpResponse:
    args = "".join(f"<{k}>{v}</{k}>" for k, v in out.items())
    body = f'<s:Envelope xmlns:s="e"><s:Body><u:{action}Response xmlns:u="x">{args}'
    return HttpResponse(200, {}, f"{body}</u:{action}Response></s:Body></s:Envelope>".encode())


def _fault(code: int) -> HttpResponse:
    body = f"<Envelope><Body><Fault><detail><UPnPError><errorCode>{code}</errorCode>"
    return HttpResponse(500, {}, f"{body}<errorDescription>x</errorDescription></UPnPError>"
                        "</detail></Fault></Body></Envelope>".encode())  # fmt: skip


@dataclass
class Router:
    """Speaks what `protocols` lists; `epoch_start` is when its table began (restart = now)."""

    protocols: set[Protocol]
    epoch_start: float = 0.0
    external_port: int = 50000
    table: dict[int, tuple[str, int]] = field(default_factory=dict)  # external -> internal
    requests: list[object] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # UPnP faults to give AddPortMapping

    def epoch(self, now: float) -> int:
        return int(now - self.epoch_start)

    def restart(self, now: float) -> None:
        self.epoch_start = now
        self.table.clear()

    def udp(
        self, data: bytes, dest: tuple[str, int], now: float
    ) -> list[tuple[bytes, tuple[str, int]]]:
        if dest[1] == ssdp.PORT:
            if Protocol.UPNP not in self.protocols or dest[0] != GW:
                return []
            return [
                (
                    b"HTTP/1.1 200 OK\r\nST: "
                    + ssdp.ST_IGD1.encode()
                    + f"\r\nLOCATION: http://{GW}:5000/rootDesc.xml\r\n\r\n".encode(),
                    (GW, 1900),
                )
            ]
        src = (GW, pmp.PORT)
        if data[0] == 0:
            if Protocol.PMP not in self.protocols:
                return []
            if len(data) == 2:
                return [(pmp.ExternalAddressResponse(0, self.epoch(now), V4(WAN)).encode(), src)]
            req = pmp.MapRequest.parse(data)
            self.requests.append(req)
            if req.lifetime == 0:
                self.table = {k: v for k, v in self.table.items() if v[1] != req.internal_port}
                return [
                    (pmp.MapResponse(0, self.epoch(now), req.internal_port, 0, 0).encode(), src)
                ]
            self.table[self.external_port] = (ME, req.internal_port)
            resp = pmp.MapResponse(
                0, self.epoch(now), req.internal_port, self.external_port, req.lifetime
            )
            return [(resp.encode(), src)]
        if Protocol.PCP not in self.protocols:
            return (
                [(bytes.fromhex("0080000100000000"), src)] if Protocol.PMP in self.protocols else []
            )
        if data[1] == pcp.Opcode.ANNOUNCE:
            return [(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, self.epoch(now)).encode(), src)]
        preq = pcp.MapRequest.parse(data)
        self.requests.append(preq)
        if preq.lifetime == 0:
            self.table.clear()
        else:
            self.table[self.external_port] = (str(preq.client), preq.internal_port)
        ext = self.external_port if preq.lifetime else 0
        epoch = self.epoch(now)
        resp2 = pcp.MapResponse(
            0, preq.lifetime, epoch, preq.nonce, 17, preq.internal_port, ext, V4(WAN)
        )
        return [(resp2.encode(), src)]

    def http(self, method: str, path: str, body: bytes) -> HttpResponse:
        if method == "GET":
            return HttpResponse(200, {}, DESC)
        text = body.decode()
        action = re.search(r"<u:(\w+) ", text)
        assert action is not None
        assert path == "/ctl/IPConn"
        name = action.group(1)
        args = dict(re.findall(r"<(New\w+)>([^<]*)</New\w+>", text))
        self.requests.append((name, args))
        if name == "AddPortMapping":
            if self.faults:
                return _fault(self.faults.pop(0))
            self.table[int(args["NewExternalPort"])] = (args["NewInternalClient"],
                                                        int(args["NewInternalPort"]))  # fmt: skip
            return _soap(name)
        if name == "GetExternalIPAddress":
            return _soap(name, NewExternalIPAddress=WAN)
        if name == "GetSpecificPortMappingEntry":
            entry = self.table.get(int(args["NewExternalPort"]))
            if entry is None:
                return _fault(714)
            return _soap(name, NewInternalClient=entry[0], NewInternalPort=str(entry[1]),
                         NewEnabled="1", NewLeaseDuration="100")  # fmt: skip
        if name == "DeletePortMapping":
            self.table.pop(int(args["NewExternalPort"]), None)
            return _soap(name)
        raise AssertionError(name)


class Net:
    def __init__(self, client: PortmapClient, router: Router, clock: Callable[[], float]) -> None:
        self.client, self.router, self.clock = client, router, clock
        self.events: list[object] = []

    def pump(self) -> None:
        for _ in range(50):
            now = self.clock()
            grams = self.client.datagrams_to_send()
            reqs = self.client.http_requests()
            if not grams and not reqs:
                break
            for data, dest in grams:
                for resp, src in self.router.udp(data, dest, now):
                    self.client.receive_udp(resp, src, now)
            for r in reqs:
                assert (r.host, r.port) == (GW, 5000)
                answer = self.router.http(r.exchange.method, r.exchange.target, r.exchange.body)
                self.client.receive_http(r.id, answer, now)
        self.events += self.client.events()

    def advance(self, clock: object, seconds: float, step: float = 0.25) -> None:
        end = self.clock() + seconds
        while self.clock() < end:
            clock.advance(step)  # type: ignore[attr-defined]
            self.client.on_timer(self.clock())
            self.pump()


TIMINGS = PortmapTimings(lifetime=100, check_interval=10.0, backoff_min=5.0, backoff_max=20.0)


def _setup(
    fake_clock: object, protocols: set[Protocol], order: tuple[Protocol, ...] | None = None,
    faults: tuple[int, ...] = (),
) -> Net:  # fmt: skip
    cfg = PortmapConfig(PORT, protocols=order or tuple(Protocol), timings=TIMINGS)
    client = PortmapClient(cfg, randbytes=random.Random(1).randbytes)
    net = Net(client, Router(protocols, faults=list(faults)), fake_clock)  # type: ignore[arg-type]
    client.set_network(GW, ME, fake_clock())  # type: ignore[operator]
    net.pump()
    return net


def _mapped(net: Net) -> list[MappingChanged]:
    return [e for e in net.events if isinstance(e, MappingChanged)]


@pytest.mark.parametrize("proto", list(Protocol))
def test_maps_renews_our_port_and_deletes(fake_clock: object, proto: Protocol) -> None:
    net = _setup(fake_clock, {proto}, (proto,))
    net.advance(fake_clock, 2.5)
    assert ProbeDone(frozenset({proto}), GW) in net.events
    [changed] = _mapped(net)
    assert changed.mapping.protocol is proto
    # NAT-PMP/PCP: the port the router chose; UPnP v1: the port we asked for (ours)
    assert changed.mapping.external == (WAN, PORT if proto is Protocol.UPNP else 50000)
    assert net.client.phase is Phase.MAPPED

    # The router hands out another external port from now on; renewals still map OUR port.
    net.router.external_port = 50001
    net.advance(fake_clock, 120)
    ports = [r.internal_port for r in net.router.requests if not isinstance(r, tuple)]
    ports += [int(r[1]["NewInternalPort"]) for r in net.router.requests
              if isinstance(r, tuple) and "NewInternalPort" in r[1]]  # fmt: skip
    assert len(ports) >= 3
    assert set(ports) == {PORT}
    if proto is Protocol.PCP:
        nonces = {r.nonce for r in net.router.requests if isinstance(r, pcp.MapRequest)}
        assert len(nonces) == 1

    net.client.stop(fake_clock())  # type: ignore[operator]
    net.pump()
    assert net.client.stopped
    assert not net.router.table
    assert isinstance(net.events[-1], MappingLost)
    assert net.events[-1].reason == "stopped"


@pytest.mark.parametrize("proto", list(Protocol))
def test_router_restart_is_noticed_and_remapped(fake_clock: object, proto: Protocol) -> None:
    net = _setup(fake_clock, {proto}, (proto,))
    net.advance(fake_clock, 20)
    assert len(_mapped(net)) == 1
    net.router.restart(fake_clock())  # type: ignore[operator]
    net.advance(fake_clock, 12)  # one check interval
    lost = [e for e in net.events if isinstance(e, MappingLost)]
    assert lost
    assert lost[0].protocol is proto
    assert net.router.table  # mapped again
    assert net.client.phase is Phase.MAPPED
    assert net.client.mapping is not None


def test_preference_and_fallback(fake_clock: object) -> None:
    net = _setup(fake_clock, {Protocol.PMP, Protocol.UPNP})
    net.advance(fake_clock, 2.5)
    assert ProbeDone(frozenset({Protocol.PMP, Protocol.UPNP}), GW) in net.events
    assert _mapped(net)[0].mapping.protocol is Protocol.PMP  # PCP absent, NAT-PMP next


def test_nothing_answers_backs_off_and_probes_again(fake_clock: object) -> None:
    net = _setup(fake_clock, set())
    net.advance(fake_clock, 2.5)
    assert ProbeDone(frozenset(), GW) in net.events
    assert net.client.phase is Phase.BACKOFF
    net.router.protocols = {Protocol.PCP}
    net.advance(fake_clock, 10)
    assert _mapped(net)
    assert _mapped(net)[0].mapping.protocol is Protocol.PCP


def test_upnp_conflict_picks_another_external_port(fake_clock: object) -> None:
    net = _setup(fake_clock, {Protocol.UPNP}, (Protocol.UPNP,), faults=(718,))
    net.advance(fake_clock, 2.5)
    [changed] = _mapped(net)
    assert changed.mapping.external[1] != PORT
    assert net.router.table[changed.mapping.external[1]] == (ME, PORT)


def test_foreign_answers_are_typed_errors(fake_clock: object) -> None:
    net = _setup(fake_clock, {Protocol.PCP}, (Protocol.PCP,))
    net.advance(fake_clock, 2.5)
    now = fake_clock()  # type: ignore[operator]
    wrong = pcp.MapResponse(0, 100, 5, b"x" * 12, 17, PORT, 50000, V4(WAN)).encode()
    with pytest.raises(MalformedAnswer):
        net.client.receive_udp(wrong, (GW, pmp.PORT), now)
    with pytest.raises(MalformedAnswer):
        net.client.receive_udp(b"\x00\x80" + b"\x00" * 10, ("10.7.0.99", pmp.PORT), now)


def test_network_change_loses_and_reprobes(fake_clock: object) -> None:
    net = _setup(fake_clock, {Protocol.PCP}, (Protocol.PCP,))
    net.advance(fake_clock, 2.5)
    net.client.set_network(GW, "10.7.0.3", fake_clock())  # type: ignore[operator]
    net.pump()
    assert any(isinstance(e, MappingLost) and e.reason == "network changed" for e in net.events)
    assert len(_mapped(net)) == 2  # probed again from the new address and mapped again
    assert net.router.table[50000] == ("10.7.0.3", PORT)


def test_probe_only_reports_and_maps_nothing(fake_clock: object) -> None:
    cfg = PortmapConfig(PORT, timings=TIMINGS, probe_only=True)
    client = PortmapClient(cfg, randbytes=random.Random(1).randbytes)
    net = Net(client, Router(set(Protocol)), fake_clock)  # type: ignore[arg-type]
    client.set_network(GW, ME, fake_clock())  # type: ignore[operator]
    net.pump()
    net.advance(fake_clock, 3.0)
    assert ProbeDone(frozenset(Protocol), GW) in net.events
    assert client.stopped
    assert client.mapping is None
    assert not net.router.table
    assert client.next_deadline() is None


# --- announcements on 224.0.0.1:5350 ------------------------------------------------------------


def _announcement(router: Router, proto: Protocol, now: float, address: str = WAN) -> bytes:
    epoch = router.epoch(now)
    if proto is Protocol.PMP:
        return pmp.ExternalAddressResponse(0, epoch, V4(address)).encode()
    return pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, epoch).encode()


@pytest.mark.parametrize("proto", [Protocol.PCP, Protocol.PMP])
def test_an_announced_restart_is_mapped_again_at_once(fake_clock: object, proto: Protocol) -> None:
    net = _setup(fake_clock, {proto}, (proto,))
    net.advance(fake_clock, 3)
    assert len(_mapped(net)) == 1
    now = fake_clock()  # type: ignore[operator]
    net.router.restart(now)
    net.client.receive_announcement(_announcement(net.router, proto, now), (GW, pmp.PORT), now)
    net.pump()
    [lost] = [e for e in net.events if isinstance(e, MappingLost)]
    assert "announced" in lost.reason
    assert not net.router.table
    net.advance(fake_clock, TIMINGS.announce_delay + 0.5)  # well before the next check (10 s)
    assert net.router.table  # mapped again
    assert net.client.mapping is not None
    assert net.client.announcements == 1


def test_an_announcement_in_step_changes_nothing(fake_clock: object) -> None:
    net = _setup(fake_clock, {Protocol.PCP}, (Protocol.PCP,))
    net.advance(fake_clock, 3)
    requests = len(net.router.requests)
    now = fake_clock()  # type: ignore[operator]
    ann = _announcement(net.router, Protocol.PCP, now)
    net.client.receive_announcement(ann, (GW, pmp.PORT), now)
    net.advance(fake_clock, 2)
    assert not [e for e in net.events if isinstance(e, MappingLost)]
    assert len(net.router.requests) == requests


def test_a_nat_pmp_announcement_of_a_new_address_moves_the_mapping(fake_clock: object) -> None:
    net = _setup(fake_clock, {Protocol.PMP}, (Protocol.PMP,))
    net.advance(fake_clock, 3)
    now = fake_clock()  # type: ignore[operator]
    ann = _announcement(net.router, Protocol.PMP, now, address="198.18.9.9")
    net.client.receive_announcement(ann, (GW, pmp.PORT), now)
    net.pump()
    assert _mapped(net)[-1].mapping.external == ("198.18.9.9", 50000)


def test_an_announcement_ends_a_backoff(fake_clock: object) -> None:
    net = _setup(fake_clock, set())
    net.advance(fake_clock, 2.5)
    assert net.client.phase is Phase.BACKOFF
    net.router.protocols = {Protocol.PCP}
    now = fake_clock()  # type: ignore[operator]
    net.client.receive_announcement(_announcement(net.router, Protocol.PCP, now), (GW, 5351), now)
    net.pump()
    net.advance(fake_clock, TIMINGS.probe_timeout + 0.5)  # a new probe, then the mapping ...
    assert _mapped(net)  # ... before the backoff (at least 5 s) would have ended


def test_a_upnp_mapping_is_checked_on_an_announcement(fake_clock: object) -> None:
    net = _setup(fake_clock, {Protocol.UPNP, Protocol.PCP}, (Protocol.UPNP,))
    net.advance(fake_clock, 3)
    now = fake_clock()  # type: ignore[operator]
    net.router.restart(now)
    net.client.receive_announcement(_announcement(net.router, Protocol.PCP, now), (GW, 5351), now)
    net.pump()
    assert [e for e in net.events if isinstance(e, MappingLost)]  # the entry check failed
    assert net.router.table  # and it was added again


@pytest.mark.parametrize(
    ("data", "src"),
    [
        (pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 1).encode(), ("10.7.0.99", 5351)),  # not the GW
        (pcp.Response(pcp.Opcode.MAP, 0, 0, 1).encode(), (GW, 5351)),  # not an announcement
        (b"junk", (GW, 5351)),
    ],
)
def test_foreign_announcements_are_typed_errors(
    fake_clock: object, data: bytes, src: tuple[str, int]
) -> None:
    net = _setup(fake_clock, {Protocol.PCP}, (Protocol.PCP,))
    net.advance(fake_clock, 3)
    with pytest.raises(MalformedAnswer):
        net.client.receive_announcement(data, src, fake_clock())  # type: ignore[operator]
    assert net.client.mapping is not None
