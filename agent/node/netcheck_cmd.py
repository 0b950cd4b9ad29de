"""Netcheck over asyncio: `agent netcheck`, and the driver the daemon reuses for its reports.

The decisions live in agent/engine/netcheck.py; this module does the I/O around them:

    resolve_regions(derp, have_v6)      the config's DERP map -> RegionTargets (DNS for names)
    measure_https_latency(region)       TLS to the region's nodes in order; the time of one
                                        `GET /derp/latency-check` over it (status <= 299)
    NetcheckDriver(derp, send)          runs reports: STUN datagrams go out through `send`
                                        (the daemon's STUN sender, or our own sockets), answers
                                        come back through `receive(data, src)`, regions STUN did
                                        not measure are timed over HTTPS, in parallel
    run_reports(driver, ...)            the daemon's loop: a report every 20-26 s, the home
                                        region following the preferred one
    netcheck_once(derp)                 one full report from our own UDP sockets (IPv4, and IPv6
                                        where the host has it): needs no daemon
    format_report(report, derp)         the `tailscale netcheck`-like text

A run ends its STUN phase when every probe set answered, when the stop timer started by enough
answers fires, or after `stun_timeout`; HTTPS checks share `https_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

from agent.config import DerpConfig, DerpNode, DerpRegion
from agent.engine.netcheck import (
    Netchecker,
    NetcheckRun,
    NetcheckTimings,
    RegionTargets,
    Report,
    StunTarget,
)
from agent.log import get_logger
from agent.node.derp_client import ssl_context
from agent.proto.derp.upgrade import parse_response
from agent.proto.endpoint import format_endpoint, host_header
from agent.proto.errors import RemoteProtocolError

__all__ = [
    "LATENCY_CHECK_PATH",
    "NetcheckDriver",
    "format_report",
    "measure_https_latency",
    "netcheck_once",
    "resolve_regions",
    "run_reports",
]

log = get_logger("agent.netcheck")

Endpoint = tuple[str, int]
SendFn = Callable[[bytes, Endpoint], None]

LATENCY_CHECK_PATH: Final = "/derp/latency-check"
_MAX_HEAD: Final = 16 * 1024


# -- targets ---------------------------------------------------------------------------------------


async def _node_addresses(node: DerpNode, have_v6: bool) -> StunTarget:
    port = node.stun_port
    try:
        ip = ipaddress.ip_address(node.host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 4:
            return StunTarget(v4=(str(ip), port))
        return StunTarget(v6=(str(ip), port)) if have_v6 else StunTarget()
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(node.host, port, type=socket.SOCK_DGRAM)
    except OSError as e:
        log.info("netcheck_resolve_failed", host=node.host, error=str(e))
        return StunTarget()
    v4 = next((str(i[4][0]) for i in infos if i[0] == socket.AF_INET), None)
    v6 = next((str(i[4][0]) for i in infos if i[0] == socket.AF_INET6), None)
    return StunTarget(
        v4=(v4, port) if v4 is not None else None,
        v6=(v6, port) if v6 is not None and have_v6 else None,
    )


async def resolve_regions(derp: DerpConfig, *, have_v6: bool = False) -> list[RegionTargets]:
    """Every region of the map with the STUN servers of its nodes (those with a stun_port)."""
    out = []
    for region in derp.regions:
        targets = [await _node_addresses(n, have_v6) for n in region.nodes if n.stun_port]
        stun_targets = tuple(t for t in targets if t.v4 is not None or t.v6 is not None)
        out.append(RegionTargets(id=region.id, stun=stun_targets, https=bool(region.nodes)))
    return out


# -- HTTPS latency ---------------------------------------------------------------------------------


def _host_header(node: DerpNode) -> str:
    return host_header(node.host, node.port)


async def _https_once(node: DerpNode) -> float:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(
        node.host, node.port, ssl=ssl_context(node), server_hostname=node.host
    )
    try:
        request = (
            f"GET {LATENCY_CHECK_PATH} HTTP/1.1\r\nHost: {_host_header(node)}\r\n"
            "User-Agent: agent-netcheck\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        start = loop.time()
        writer.write(request)
        head = b""
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                raise ConnectionError("closed before the response head")
            head += chunk
            parsed = parse_response(head)
            if parsed is not None:
                break
            if len(head) > _MAX_HEAD:
                raise ConnectionError("response head too large")
        elapsed = loop.time() - start
        status = parsed[0].status
        if status > 299:
            raise ConnectionError(f"HTTP {status}")
        return elapsed
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def measure_https_latency(region: DerpRegion, budget: float = 5.0) -> float | None:
    """Seconds one `GET /derp/latency-check` took over a fresh TLS connection to the first node
    of `region` that answers (in node order); None when none did within `budget` seconds."""
    try:
        async with asyncio.timeout(budget):
            for node in region.nodes:
                try:
                    return await _https_once(node)
                except (OSError, ConnectionError, RemoteProtocolError) as e:
                    log.info(
                        "netcheck_https_failed", region=region.id, host=node.host, error=str(e)
                    )
    except TimeoutError:
        log.info("netcheck_https_timeout", region=region.id, budget=budget)
    return None


# -- the driver ------------------------------------------------------------------------------------


class NetcheckDriver:
    """Runs netcheck reports over asyncio; one report at a time."""

    def __init__(
        self,
        derp: DerpConfig,
        send: SendFn,
        *,
        netchecker: Netchecker | None = None,
        have_v4: bool = True,
        have_v6: bool = False,
    ) -> None:
        # Static after construction (replace `derp` with set_derp on a map change).
        self.derp = derp
        self.send = send
        self.netchecker = netchecker or Netchecker(pinned_home=derp.home_region)
        self.have_v4 = have_v4
        self.have_v6 = have_v6
        # Owned by run(); receive() only feeds the current run.
        self._run: NetcheckRun | None = None
        self._wake = asyncio.Event()
        self.send_errors = 0

    def set_derp(self, derp: DerpConfig) -> None:
        """A new DERP map; the next report is a full one (its region list differs)."""
        self.derp = derp

    def receive(self, data: bytes, src: Endpoint, now: float | None = None) -> bool:
        """A datagram from the socket the STUN requests left from; True when it answered the
        running report (then the caller drops it). Call it on the event loop's thread; `now`
        is loop.time() (read here when not given). Offer STUN here before StunProber, which
        claims every STUN datagram."""
        run = self._run
        if run is None:
            return False
        if now is None:
            now = asyncio.get_running_loop().time()
        if not run.receive(data, src, now):
            return False
        self._wake.set()
        return True

    async def run(
        self,
        *,
        full: bool = False,
        derp_heard: Callable[[], Mapping[int, float]] | None = None,
    ) -> Report:
        """One report. `derp_heard()` gives, per region, the loop time a DERP frame last came
        from it; it is read when the report is finished (the home region stays while heard)."""
        loop = asyncio.get_running_loop()
        timings = self.netchecker.timings
        regions = await resolve_regions(self.derp, have_v6=self.have_v6)
        run = self.netchecker.new_run(
            regions, loop.time(), have_v4=self.have_v4, have_v6=self.have_v6, full=full
        )
        self._run = run
        try:
            while True:
                for data, endpoint in run.on_timer(loop.time()):
                    try:
                        self.send(data, endpoint)
                    except OSError as e:  # no route for that family: the probe is lost
                        self.send_errors += 1
                        log.debug("netcheck_send_failed", to=endpoint, error=str(e))
                if run.stun_done(loop.time()):
                    break
                deadline = run.next_deadline()
                self._wake.clear()
                wait = 0.0 if deadline is None else max(deadline - loop.time(), 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            self._run = None
        wanted = [r for r in self.derp.regions if r.id in set(run.https_wanted())]
        if wanted:
            results = await asyncio.gather(
                *(measure_https_latency(r, timings.https_timeout) for r in wanted)
            )
            for region, latency in zip(wanted, results, strict=True):
                if latency is not None:
                    run.add_https_latency(region.id, latency)
        heard = derp_heard() if derp_heard is not None else None
        report = self.netchecker.finish(run, loop.time(), derp_heard=heard)
        log.debug(
            "netcheck_report",
            udp=report.udp,
            preferred=report.preferred_region,
            latency={r: round(d * 1000, 2) for r, d in report.region_latency.items()},
        )
        return report


async def run_reports(
    driver: NetcheckDriver,
    *,
    derp_heard: Callable[[], Mapping[int, float]],
    home: Callable[[], int | None],
    set_home: Callable[[int], None],
    on_report: Callable[[Report], None] = lambda report: None,
) -> None:
    """A report when the netchecker says one is due (every 20-26 s; the first one full), until
    cancelled; `set_home(region)` when the preferred region is not `home()` (the engine keeps
    the hysteresis, and a pinned home region always wins); `on_report` gets every report."""
    loop = asyncio.get_running_loop()
    full = True
    while True:
        try:
            report = await driver.run(full=full, derp_heard=derp_heard)
        except (OSError, ValueError, RemoteProtocolError) as e:
            log.warning("netcheck failed", error=str(e))
        else:
            full = False
            on_report(report)
            preferred = report.preferred_region
            if preferred is not None and preferred != home():
                set_home(preferred)
        await asyncio.sleep(max(0.0, driver.netchecker.next_run_at(loop.time()) - loop.time()))


# -- the standalone command ------------------------------------------------------------------------


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Endpoint], object]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        host = str(addr[0]).partition("%")[0]
        self.on_datagram(data, (host, int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("netcheck_socket_error", error=str(exc))


async def _open_udp(
    family: socket.AddressFamily, on_datagram: Callable[[bytes, Endpoint], object]
) -> asyncio.DatagramTransport | None:
    loop = asyncio.get_running_loop()
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Socket(on_datagram), sock=sock)
    except OSError:
        sock.close()
        return None
    return transport


async def netcheck_once(
    derp: DerpConfig, *, timings: NetcheckTimings | None = None, full: bool = True
) -> Report:
    """One report from fresh UDP sockets of our own (no daemon needed)."""
    holder: list[NetcheckDriver] = []

    def on_datagram(data: bytes, src: Endpoint) -> None:
        if holder:
            holder[0].receive(data, src)

    v4 = await _open_udp(socket.AF_INET, on_datagram)
    v6 = await _open_udp(socket.AF_INET6, on_datagram)

    def send(data: bytes, endpoint: Endpoint) -> None:
        transport = v6 if ":" in endpoint[0] else v4
        if transport is None:
            raise OSError(f"no socket for {endpoint[0]}")
        transport.sendto(data, endpoint)

    driver = NetcheckDriver(
        derp,
        send,
        netchecker=Netchecker(pinned_home=derp.home_region, timings=timings or NetcheckTimings()),
        have_v4=v4 is not None,
        have_v6=v6 is not None,
    )
    holder.append(driver)
    try:
        return await driver.run(full=full)
    finally:
        for transport in (v4, v6):
            if transport is not None:
                transport.close()


# -- output ----------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


def format_report(report: Report, derp: DerpConfig, *, wall: float | None = None) -> str:
    """A `tailscale netcheck`-like report; `wall` is the unix time to show (default now)."""
    codes = {r.id: r.code for r in derp.regions}

    def name(region: int | None) -> str:
        if region is None:
            return "(none)"
        code = codes.get(region)
        return f"{code} (region {region})" if code else f"region {region}"

    ipv4 = "no" if report.global_v4 is None else f"yes, {format_endpoint(report.global_v4)}"
    if report.global_v6 is not None:
        ipv6 = f"yes, {format_endpoint(report.global_v6)}"
    else:
        ipv6 = "no, but OS has support" if report.ipv6_os else "no, unavailable in OS"
    varies = report.mapping_varies_by_dest_ip
    pm = report.port_mapping  # None: not probed
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if wall is None else wall))
    lines = [
        "Report:",
        f"\t* Time: {stamp}",
        f"\t* UDP: {str(report.udp).lower()}",
        f"\t* IPv4: {ipv4}",
        f"\t* IPv6: {ipv6}",
        f"\t* MappingVariesByDestIP: {'' if varies is None else str(varies).lower()}",
        *([] if pm is None else [f"\t* port mapping: {', '.join(pm) or 'none'}"]),
        f"\t* Nearest DERP: {name(report.nearest_region)}",
    ]
    if report.pinned or report.preferred_region != report.nearest_region:
        why = " (pinned by the config)" if report.pinned else ""
        lines.append(f"\t* Home DERP: {name(report.preferred_region)}{why}")
    lines.append("\t* DERP latency:")
    lat = report.region_latency
    ordered = sorted(derp.regions, key=lambda r: (r.id not in lat, lat.get(r.id, 0.0), r.id))
    for region in ordered:
        d = lat.get(region.id)
        shown = "unreachable" if d is None else _ms(d)
        via = " (https)" if region.id in report.https_regions else ""
        lines.append(f"\t\t- {region.code}: {shown}{via}  (region {region.id})")
    return "\n".join(lines)
