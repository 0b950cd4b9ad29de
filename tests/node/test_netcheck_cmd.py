"""Netcheck over asyncio against our relay on loopback: STUN, the HTTPS latency check, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio
import structlog

from agent import cli
from agent.config import DerpConfig, DerpNode, DerpRegion
from agent.engine.netcheck import Netchecker, NetcheckTimings, Report, StunTarget
from agent.keys import NodePrivate
from agent.netio.certs import make_self_signed
from agent.node.netcheck_cmd import (
    NetcheckDriver,
    format_report,
    measure_https_latency,
    netcheck_once,
    resolve_regions,
)
from agent.relay.server import RelayServer, serve_relay

LOG = structlog.get_logger()
FAST = NetcheckTimings(stun_timeout=0.5, https_timeout=3.0)


@dataclass
class Relays:
    cert: Path
    one: RelayServer
    two: RelayServer
    no_stun: RelayServer

    def node(self, relay: RelayServer, stun_port: int | None = None) -> DerpNode:
        return DerpNode(
            host="127.0.0.1",
            port=relay.port,
            stun_port=(relay.stun_port or 0) if stun_port is None else stun_port,
            ca_file=str(self.cert),
        )


@pytest_asyncio.fixture
async def relays(tmp_path: Path) -> AsyncIterator[Relays]:
    cert, key = make_self_signed(tmp_path / "certs", "127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    started: list[RelayServer] = []
    try:
        for stun_port in (0, 0, None):
            started.append(
                await serve_relay(
                    "127.0.0.1",
                    0,
                    private_key=secrets.token_bytes(32),
                    ssl_context=ctx,
                    stun_port=stun_port,
                    log=LOG,
                )
            )
        yield Relays(cert, *started)
    finally:
        for relay in started:
            await relay.close()


@pytest.fixture
def silent_udp_port() -> Iterator[int]:
    """A bound UDP port that never answers: STUN to it is "blocked"."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _closed_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _derp(*regions: tuple[int, str, DerpNode], home: int | None = None) -> DerpConfig:
    return DerpConfig(
        home_region=home,
        regions=tuple(DerpRegion(id=i, code=c, nodes=(n,)) for i, c, n in regions),
    )


# -- STUN and HTTPS against the relay -------------------------------------------------------------


@pytest.mark.asyncio
async def test_stun_to_two_regions(relays: Relays) -> None:
    derp = _derp((1, "one", relays.node(relays.one)), (2, "two", relays.node(relays.two)))
    report = await asyncio.wait_for(netcheck_once(derp, timings=FAST), 10)
    assert report.udp
    assert report.ipv4
    assert set(report.region_latency) == {1, 2}
    assert set(report.region_v4_latency) == {1, 2}
    assert all(0 < d < 0.5 for d in report.region_latency.values())
    assert report.https_regions == frozenset()
    assert report.global_v4 is not None
    assert report.global_v4[0] == "127.0.0.1"
    assert report.mapping_varies_by_dest_ip is False  # one socket, two servers, one mapping
    assert report.preferred_region == report.nearest_region
    assert report.preferred_region in (1, 2)
    assert report.full
    assert report.duration < FAST.stun_timeout  # every region answered: no waiting
    assert relays.one.stats.stun_answered >= 1
    assert relays.two.stats.stun_answered >= 1


@pytest.mark.asyncio
async def test_region_without_stun_is_timed_over_https(relays: Relays) -> None:
    derp = _derp((1, "one", relays.node(relays.one)), (3, "nostun", relays.node(relays.no_stun, 0)))
    report = await asyncio.wait_for(netcheck_once(derp, timings=FAST), 10)
    assert report.udp
    assert set(report.region_latency) == {1, 3}
    assert report.https_regions == {3}
    assert 3 not in report.region_v4_latency
    assert 0 < report.region_latency[3] < 1.0


@pytest.mark.asyncio
async def test_udp_blocked_every_latency_from_https(relays: Relays, silent_udp_port: int) -> None:
    derp = _derp(
        (1, "one", relays.node(relays.one, silent_udp_port)),
        (2, "two", relays.node(relays.two, silent_udp_port)),
    )
    report = await asyncio.wait_for(netcheck_once(derp, timings=FAST), 10)
    assert not report.udp
    assert report.global_v4 is None
    assert report.mapping_varies_by_dest_ip is None
    assert report.https_regions == {1, 2}
    assert set(report.region_latency) == {1, 2}
    assert report.preferred_region in (1, 2)
    assert report.duration >= FAST.stun_timeout  # waited for STUN first


@pytest.mark.asyncio
async def test_unreachable_region_has_no_latency(relays: Relays) -> None:
    dead = DerpNode(host="127.0.0.1", port=_closed_tcp_port(), stun_port=0, ca_file=None)
    derp = _derp((1, "one", relays.node(relays.one)), (9, "dead", dead))
    report = await asyncio.wait_for(netcheck_once(derp, timings=FAST), 10)
    assert set(report.region_latency) == {1}
    assert report.preferred_region == 1
    text = format_report(report, derp, wall=0)
    assert "- dead: unreachable  (region 9)" in text


@pytest.mark.asyncio
async def test_measure_https_latency_tries_the_nodes_in_order(relays: Relays) -> None:
    dead = DerpNode(host="127.0.0.1", port=_closed_tcp_port(), stun_port=0)
    region = DerpRegion(id=1, code="one", nodes=(dead, relays.node(relays.one)))
    latency = await measure_https_latency(region, 3.0)
    assert latency is not None
    assert 0 < latency < 1.0
    assert await measure_https_latency(DerpRegion(id=2, code="x", nodes=(dead,)), 1.0) is None


@pytest.mark.asyncio
async def test_measure_https_latency_refuses_an_untrusted_certificate(relays: Relays) -> None:
    untrusted = DerpNode(host="127.0.0.1", port=relays.one.port, stun_port=0)  # system store
    assert await measure_https_latency(DerpRegion(id=1, code="x", nodes=(untrusted,)), 2) is None


@pytest.mark.asyncio
async def test_resolve_regions_names_and_literals() -> None:
    derp = DerpConfig(
        regions=(
            DerpRegion(
                id=1,
                code="a",
                nodes=(
                    DerpNode(host="localhost", stun_port=3478),
                    DerpNode(host="::1", stun_port=3479),
                    DerpNode(host="127.0.0.2", stun_port=0),  # no STUN on this node
                ),
            ),
        )
    )
    (region,) = await resolve_regions(derp, have_v6=True)
    assert region.id == 1
    assert region.https
    assert region.stun[0].v4 == ("127.0.0.1", 3478)
    assert region.stun[1] == StunTarget(v6=("::1", 3479))
    assert len(region.stun) == 2
    (no6,) = await resolve_regions(derp, have_v6=False)
    assert all(t.v6 is None for t in no6.stun)


@pytest.mark.asyncio
async def test_driver_runs_incremental_reports_and_keeps_the_home(relays: Relays) -> None:
    """The daemon's use: one driver, STUN through a socket it owns, reports in a row."""
    derp = _derp((1, "one", relays.node(relays.one)), (2, "two", relays.node(relays.two)))
    loop = asyncio.get_running_loop()
    holder: list[NetcheckDriver] = []

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
            assert holder[0].receive(data, (str(addr[0]), int(addr[1])))

    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
    try:
        driver = NetcheckDriver(
            derp,
            lambda data, ep: transport.sendto(data, ep),
            netchecker=Netchecker(timings=FAST),
        )
        holder.append(driver)
        first = await asyncio.wait_for(driver.run(), 10)
        assert first.full
        assert first.preferred_region is not None
        home = first.preferred_region
        for _ in range(3):
            report = await asyncio.wait_for(driver.run(derp_heard=dict), 10)
            assert not report.full
            assert set(report.region_latency) == {1, 2}
            assert report.preferred_region == home  # loopback regions are near-equal
        assert driver.netchecker.reports == 4
        assert not driver.receive(b"late", ("127.0.0.1", 1))  # no report running
    finally:
        transport.close()


@pytest.mark.asyncio
async def test_pinned_home_region(relays: Relays) -> None:
    derp = _derp((1, "one", relays.node(relays.one)), (2, "two", relays.node(relays.two)), home=2)
    report = await asyncio.wait_for(netcheck_once(derp, timings=FAST), 10)
    assert report.preferred_region == 2
    assert report.pinned
    assert "(pinned by the config)" in format_report(report, derp, wall=0)


# -- output ----------------------------------------------------------------------------------------


def test_format_report_like_tailscale_netcheck() -> None:
    derp = _derp(
        (1, "fra", DerpNode(host="a")),
        (2, "nyc", DerpNode(host="b")),
        (3, "sfo", DerpNode(host="c")),
    )
    report = Report(
        udp=True,
        ipv4=True,
        ipv6=False,
        ipv6_os=True,
        global_v4=("203.0.113.7", 41641),
        global_v6=None,
        endpoints=(("203.0.113.7", 41641),),
        mapping_varies_by_dest_ip=False,
        region_latency={1: 0.0123, 2: 0.0456},
        region_v4_latency={1: 0.0123},
        region_v6_latency={},
        https_regions=frozenset({2}),
        full=True,
        started=0.0,
        duration=0.2,
        preferred_region=1,
    )
    assert format_report(report, derp, wall=0) == "\n".join(
        [
            "Report:",
            "\t* Time: 1970-01-01T00:00:00Z",
            "\t* UDP: true",
            "\t* IPv4: yes, 203.0.113.7:41641",
            "\t* IPv6: no, but OS has support",
            "\t* MappingVariesByDestIP: false",
            "\t* Nearest DERP: fra (region 1)",
            "\t* DERP latency:",
            "\t\t- fra: 12.3ms  (region 1)",
            "\t\t- nyc: 45.6ms (https)  (region 2)",
            "\t\t- sfo: unreachable  (region 3)",
        ]
    )


def test_format_report_port_mapping_line() -> None:
    derp = _derp((1, "fra", DerpNode(host="a")))
    base = Report(
        udp=True, ipv4=True, ipv6=False, ipv6_os=False, global_v4=("203.0.113.7", 41641),
        global_v6=None, endpoints=(), mapping_varies_by_dest_ip=True, region_latency={1: 0.01},
        region_v4_latency={1: 0.01}, region_v6_latency={}, https_regions=frozenset(), full=True,
        started=0.0, duration=0.1,
    )  # fmt: skip
    assert "port mapping" not in format_report(base, derp, wall=0)  # not probed
    lines = format_report(replace(base, port_mapping=("upnp", "pmp", "pcp")), derp, wall=0)
    assert "\t* MappingVariesByDestIP: true\n\t* port mapping: upnp, pmp, pcp\n" in lines
    assert "\t* port mapping: none\n" in format_report(replace(base, port_mapping=()), derp)
    assert replace(base, port_mapping=("pmp",)).to_dict()["port_mapping"] == ["pmp"]
    assert base.to_dict()["port_mapping"] is None


# -- the CLI ---------------------------------------------------------------------------------------


def _write_config(path: Path, derp: DerpConfig) -> Path:
    lines = [
        "[interface]",
        f'private_key = "{NodePrivate.generate().to_b64()}"',
        'addresses = ["100.64.0.1/32"]',
    ]
    for region in derp.regions:
        (n,) = region.nodes
        lines += [
            "",
            "[[derp.regions]]",
            f"id = {region.id}",
            f'code = "{region.code}"',
            f'nodes = [{{ host = "{n.host}", port = {n.port}, stun_port = {n.stun_port}, '
            f'ca_file = "{n.ca_file}" }}]',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.asyncio
async def test_cli_netcheck_json_and_text(
    relays: Relays, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    derp = _derp((1, "one", relays.node(relays.one)), (3, "nostun", relays.node(relays.no_stun, 0)))
    conf = _write_config(tmp_path / "agent.conf", derp)
    # the relays run on this loop; the command runs its own in a thread, as with no daemon
    rc = await asyncio.to_thread(cli.main, ["netcheck", "-c", str(conf), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    assert data["udp"] is True
    assert data["global_v4"].startswith("127.0.0.1:")
    assert set(data["region_latency"]) == {"1", "3"}
    assert data["https_regions"] == [3]
    assert data["preferred_region"] in (1, 3)
    assert data["mapping_varies_by_dest_ip"] is None  # only one STUN server

    rc = await asyncio.to_thread(cli.main, ["netcheck", "-c", str(conf)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "\t* UDP: true\n" in out
    assert "\t* IPv4: yes, 127.0.0.1:" in out
    assert "\t* Nearest DERP: " in out
    assert "- one: " in out
    assert "ms (https)  (region 3)" in out


def test_cli_netcheck_without_regions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = _write_config(tmp_path / "agent.conf", DerpConfig())
    assert cli.main(["netcheck", "-c", str(conf)]) == 1
    assert "no [[derp.regions]]" in capsys.readouterr().err


def test_cli_netcheck_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[interface]\n")
    assert cli.main(["netcheck", "-c", str(conf)]) == 1
    assert "private_key" in capsys.readouterr().err
    with contextlib.suppress(FileNotFoundError):
        conf.unlink()
