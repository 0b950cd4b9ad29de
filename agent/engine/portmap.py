"""Port-mapping client: asks the home router for a UDP port mapping to our WireGuard port.

Theory of operation. The shell tells the client the default gateway and our LAN address
(`set_network`). The client probes the gateway with every configured protocol at once (NAT-PMP
external-address request, PCP ANNOUNCE, SSDP M-SEARCH then the device description), waits for
the answers (or `probe_timeout`), reports `ProbeDone` and maps our internal port with the first
protocol of `PortmapConfig.protocols` that answered. A granted mapping is announced as
`MappingChanged(protocol, external ip:port)`, renewed at half its lifetime and checked every
`check_interval` (NAT-PMP/PCP: the epoch of a cheap request; UPnP: GetSpecificPortMappingEntry).
Every request, renewals included, maps OUR internal port: the external port we were given is
only ever a suggestion for the external side (tailscale#18348 is the bug this rules out).

A router that lost its table (epoch going backwards or too slowly, RFC 6887 §8.5; a UPnP entry
gone or pointing elsewhere) gives `MappingLost` and an immediate re-map; a router that stopped
answering gives `MappingLost` and a new probe; a failure backs off exponentially (with jitter)
before probing again. `stop()` deletes the mapping (lifetime 0 / DeletePortMapping) and waits at
most `stop_timeout` for the answer.

    phase       input                                   next
    IDLE        set_network                             PROBING
    PROBING     all answered / probe deadline           MAPPING (something answered) | BACKOFF
    MAPPING     granted                                 MAPPED
    MAPPING     refused / no answer                     MAPPING (next protocol) | BACKOFF
    MAPPED      renew deadline, router lost its state   MAPPING
    MAPPED      check failed (router unreachable)       PROBING
    BACKOFF     backoff deadline                        PROBING
    any         set_network (gateway or address moved)  PROBING
    any         stop                                    STOPPING (a mapping to delete) | STOPPED
    STOPPING    delete answered / stop deadline         STOPPED

Surface (sans-I/O): inputs `set_network`, `receive_udp`, `receive_http`, `http_failed`,
`on_timer`, `stop`, each with `now`; outputs drained by the shell: `datagrams_to_send()` (bytes to
(ip, port)), `http_requests()` (one bounded HTTP exchange each, answered by id), `events()`, and
`next_deadline()`. `receive_udp` raises only RemoteProtocolError (the shell logs it and goes on).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Final

from agent.proto.errors import LocalProtocolError, RemoteProtocolError
from agent.proto.portmap import igd, pcp, pmp, ssdp
from agent.proto.portmap.epoch import EpochTracker
from agent.proto.portmap.errors import MalformedAnswer, RouterRefused, UpnpFault
from agent.proto.portmap.http import HttpExchange, HttpResponse

__all__ = [
    "Protocol",
    "Phase",
    "PortmapTimings",
    "PortmapConfig",
    "Mapping",
    "HttpRequest",
    "ProbeDone",
    "MappingChanged",
    "MappingLost",
    "PortmapEvent",
    "PortmapClient",
]

IPv4 = ipaddress.IPv4Address
Endpoint = tuple[str, int]


class Protocol(StrEnum):
    """Names as `agent netcheck` prints them (tailscale netcheck: "PortMapping: UPnP, NAT-PMP")."""

    PCP = "pcp"
    PMP = "pmp"
    UPNP = "upnp"


class Phase(Enum):
    IDLE = "idle"
    PROBING = "probing"
    MAPPING = "mapping"
    MAPPED = "mapped"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class PortmapTimings:
    probe_timeout: float = 2.0  # a probe waits this long for all three protocols
    retransmit: float = 0.25  # first UDP retransmit (RFC 6886 §3.1), doubling each time
    request_timeout: float = 3.0  # a mapping request (UDP or one HTTP exchange) gives up
    lifetime: int = 7200  # seconds asked for (RFC 6886 §3.3 recommends two hours)
    permanent_renew: float = 1200.0  # how often a "permanent" (lease 0) UPnP entry is re-added
    check_interval: float = 60.0  # between renewals: is the router's state still there?
    backoff_min: float = 10.0
    backoff_max: float = 600.0
    stop_timeout: float = 1.0  # how long stop() waits for the delete's answer


@dataclass(frozen=True, slots=True)
class PortmapConfig:
    internal_port: int  # our WireGuard UDP port: the one port every request maps
    protocols: tuple[Protocol, ...] = (Protocol.PCP, Protocol.PMP, Protocol.UPNP)  # preference
    description: str = "agent wireguard"
    timings: PortmapTimings = PortmapTimings()

    def __post_init__(self) -> None:
        if not 1 <= self.internal_port <= 65535:
            raise LocalProtocolError(f"internal port {self.internal_port} is not 1..65535")
        if not self.protocols or len(set(self.protocols)) != len(self.protocols):
            raise LocalProtocolError("protocols must name each protocol at most once")


@dataclass(frozen=True, slots=True)
class Mapping:
    protocol: Protocol
    external: Endpoint
    internal_port: int
    lifetime: int  # seconds granted; 0 = permanent (UPnP)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """Do this exchange (connect host:port, send, read within `timeout`), then answer with
    receive_http(id, ...) or http_failed(id, ...)."""

    id: int
    host: str
    port: int
    exchange: HttpExchange
    timeout: float


@dataclass(frozen=True, slots=True)
class ProbeDone:
    available: frozenset[Protocol]
    gateway: str


@dataclass(frozen=True, slots=True)
class MappingChanged:
    mapping: Mapping


@dataclass(frozen=True, slots=True)
class MappingLost:
    protocol: Protocol
    external: Endpoint
    reason: str


PortmapEvent = ProbeDone | MappingChanged | MappingLost


class _Timer(Enum):
    PROBE = "probe"
    ATTEMPT = "attempt"
    RENEW = "renew"
    CHECK = "check"
    BACKOFF = "backoff"
    STOP = "stop"


@dataclass(slots=True)
class _Outstanding:
    """A UDP request retransmitted until answered or `give_up`."""

    datagrams: list[tuple[bytes, Endpoint]]
    next_send: float
    interval: float
    give_up: float


# kinds of outstanding UDP requests
_PMP_ADDR: Final = "pmp_addr"
_PMP_MAP: Final = "pmp_map"
_PCP_ANNOUNCE: Final = "pcp_announce"
_PCP_MAP: Final = "pcp_map"
_SSDP: Final = "ssdp"
_MAX_CONFLICT_RETRIES: Final = 3


@dataclass(slots=True)
class _Upnp:
    location: ssdp.Location | None = None
    service: igd.IgdService | None = None
    desc_failed: bool = False


class PortmapClient:
    """The client for one internal UDP port. Owned by one caller (the shell's task)."""

    def __init__(
        self, config: PortmapConfig, *, randbytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> None:
        self.config = config
        self._t = config.timings
        self._randbytes = randbytes
        self.phase = Phase.IDLE
        self.gateway: IPv4 | None = None
        self.local: IPv4 | None = None
        self.available: frozenset[Protocol] = frozenset()
        self.mapping: Mapping | None = None
        self._deadlines: dict[_Timer, float | None] = dict.fromkeys(_Timer)
        self._udp: dict[str, _Outstanding] = {}
        self._out: list[tuple[bytes, Endpoint]] = []
        self._http_out: list[HttpRequest] = []
        self._http: dict[int, str] = {}  # request id -> purpose
        self._http_next = 1
        self._events: deque[PortmapEvent] = deque()
        self._epoch = EpochTracker()
        self._seen: set[Protocol] = set()
        self._upnp = _Upnp()
        self._pmp_ip: IPv4 | None = None
        self._nonce = randbytes(pcp.NONCE_SIZE)
        self._tried: list[Protocol] = []
        self._current: Protocol | None = None
        self._upnp_lease = self._t.lifetime
        self._upnp_port = 0  # external port asked for next
        self._conflicts = 0
        self._backoff = self._t.backoff_min
        self._pmp_map: pmp.MapResponse | None = None  # a NAT-PMP grant waiting for the address

    # --- inputs ----------------------------------------------------------------------------

    def set_network(self, gateway: str | None, local: str | None, now: float) -> None:
        """The default gateway or our address toward it changed (or is first known): re-probe.
        None for either stops mapping until it is known again."""
        gw = IPv4(gateway) if gateway else None
        lo = IPv4(local) if local else None
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            return
        if (gw, lo) == (self.gateway, self.local) and self.phase is not Phase.IDLE:
            return
        self._lose("network changed")
        self.gateway, self.local = gw, lo
        self._upnp = _Upnp()
        self._epoch.reset()
        self._backoff = self._t.backoff_min
        if gw is None or lo is None:
            self._reset(Phase.IDLE)
            return
        self._start_probe(now)

    def receive_udp(self, data: bytes, src: Endpoint, now: float) -> None:
        """A datagram on the client's socket: NAT-PMP/PCP from gateway:5351, or an SSDP answer.
        Raises RemoteProtocolError for anything that is not a usable answer."""
        if self.gateway is None or src[0] != str(self.gateway):
            raise MalformedAnswer(f"port-mapping answer from {src[0]}, not the gateway")
        if src[1] == pmp.PORT and data[:1] == b"\x00":
            self._on_pmp(pmp.parse_response(data), now)
        elif src[1] == pmp.PORT:
            self._on_pcp(pcp.parse_response(data), now)
        else:
            self._on_ssdp(ssdp.parse_response(data), now)

    def receive_http(self, request_id: int, response: HttpResponse, now: float) -> None:
        purpose = self._http.pop(request_id, None)
        if purpose is None or self.phase is Phase.STOPPED:
            return
        try:
            self._on_http(purpose, response, now)
        except RemoteProtocolError as e:
            self._on_http_error(purpose, e, now)

    def http_failed(self, request_id: int, reason: str, now: float) -> None:
        """The exchange failed: connection refused or reset, timeout, or a malformed answer."""
        purpose = self._http.pop(request_id, None)
        if purpose is not None and self.phase is not Phase.STOPPED:
            self._on_http_error(purpose, MalformedAnswer(reason), now)

    def on_timer(self, now: float) -> None:
        for kind, out in list(self._udp.items()):
            if now >= out.give_up:
                del self._udp[kind]
            elif now >= out.next_send:
                self._out.extend(out.datagrams)
                out.interval *= 2
                out.next_send = now + out.interval
        d = self._deadlines
        if self._due(_Timer.STOP, now):
            self._reset(Phase.STOPPED)
        if self._due(_Timer.PROBE, now):
            self._finish_probe(now)
        if self._due(_Timer.ATTEMPT, now):
            self._attempt_failed("no answer", now)
        if self._due(_Timer.BACKOFF, now):
            self._start_probe(now)
        if self._due(_Timer.RENEW, now) and self.phase is Phase.MAPPED:
            self._start_mapping(now)
        if self._due(_Timer.CHECK, now) and self.phase is Phase.MAPPED:
            self._check(now)
            d[_Timer.CHECK] = now + self._t.check_interval

    def stop(self, now: float) -> None:
        """Delete the mapping (if any) and finish; `stopped` turns True when done."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            return
        mapping, gw = self.mapping, self.gateway
        self._reset(Phase.STOPPING)
        if mapping is None or gw is None:
            self._reset(Phase.STOPPED)
            return
        self._events.append(MappingLost(mapping.protocol, mapping.external, "stopped"))
        if mapping.protocol is Protocol.UPNP and self._upnp.service is not None:
            svc = self._upnp.service
            call = igd.delete_port_mapping(svc.service_type, mapping.external[1])
            self._http_call("delete", call)
        elif mapping.protocol is Protocol.PMP:
            self._send(_PMP_MAP, pmp.MapRequest(self.config.internal_port, 0, 0).encode(), now)
        elif mapping.protocol is Protocol.PCP and self.local is not None:
            req = pcp.MapRequest(self.local, self._nonce, self.config.internal_port, 0)
            self._send(_PCP_MAP, req.encode(), now)
        self._deadlines[_Timer.STOP] = now + self._t.stop_timeout

    # --- outputs ---------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self._out = self._out, []
        return out

    def http_requests(self) -> list[HttpRequest]:
        out, self._http_out = self._http_out, []
        return out

    def events(self) -> list[PortmapEvent]:
        out = list(self._events)
        self._events.clear()
        return out

    def next_deadline(self) -> float | None:
        times = [t for t in self._deadlines.values() if t is not None]
        times += [min(o.next_send, o.give_up) for o in self._udp.values()]
        return min(times) if times else None

    @property
    def stopped(self) -> bool:
        return self.phase is Phase.STOPPED

    # --- probing ---------------------------------------------------------------------------

    def _start_probe(self, now: float) -> None:
        gw, lo = self.gateway, self.local
        if gw is None or lo is None:
            return
        self._reset(Phase.PROBING)
        self._seen = set()
        self._upnp = _Upnp()
        if Protocol.PMP in self.config.protocols:
            self._send(_PMP_ADDR, pmp.ExternalAddressRequest().encode(), now)
        if Protocol.PCP in self.config.protocols:
            self._send(_PCP_ANNOUNCE, pcp.AnnounceRequest(lo).encode(), now)
        if Protocol.UPNP in self.config.protocols:
            search = ssdp.m_search()
            self._send(
                _SSDP, search, now,
                dests=[(ssdp.MULTICAST_ADDR, ssdp.PORT), (str(gw), ssdp.PORT)],
            )  # fmt: skip
        self._deadlines[_Timer.PROBE] = now + self._t.probe_timeout

    def _probe_complete(self) -> bool:
        u = self._upnp
        if u.location is not None and u.service is None and not u.desc_failed:
            return False  # the description is on its way
        return self._seen >= set(self.config.protocols)

    def _maybe_finish_probe(self, now: float) -> None:
        if self.phase is Phase.PROBING and self._probe_complete():
            self._finish_probe(now)

    def _finish_probe(self, now: float) -> None:
        self._deadlines[_Timer.PROBE] = None
        for kind in (_PMP_ADDR, _PCP_ANNOUNCE, _SSDP):
            self._udp.pop(kind, None)
        avail = set(self._seen)
        if self._upnp.service is None:
            avail.discard(Protocol.UPNP)
        self.available = frozenset(avail)
        self._events.append(ProbeDone(self.available, str(self.gateway)))
        self._tried = []
        self._next_protocol(now)

    def _next_protocol(self, now: float) -> None:
        for proto in self.config.protocols:
            if proto in self.available and proto not in self._tried:
                self._tried.append(proto)
                if proto is not self._current:
                    self._current = proto
                    self._upnp_port, self._conflicts = 0, 0
                    self._nonce = self._randbytes(pcp.NONCE_SIZE)
                self._start_mapping(now)
                return
        self._lose("no protocol could map the port")
        self._reset(Phase.BACKOFF)
        jitter = 1.0 + self._randbytes(1)[0] / 1024  # up to +25 %
        self._deadlines[_Timer.BACKOFF] = now + self._backoff * jitter
        self._backoff = min(self._backoff * 2, self._t.backoff_max)

    # --- mapping ---------------------------------------------------------------------------

    def _start_mapping(self, now: float) -> None:
        """Request (or renew) the mapping of OUR internal port with the current protocol."""
        proto, lo = self._current, self.local
        if proto is None or lo is None:
            return
        self._reset(Phase.MAPPING, keep_mapping=True)
        port = self.config.internal_port  # never the external port, even on renewal
        prev = self.mapping.external if self.mapping is not None else None
        lifetime = self._t.lifetime
        if proto is Protocol.PMP:
            suggested = prev[1] if prev else port
            self._send(_PMP_ADDR, pmp.ExternalAddressRequest().encode(), now)
            self._send(_PMP_MAP, pmp.MapRequest(port, suggested, lifetime).encode(), now)
        elif proto is Protocol.PCP:
            req = pcp.MapRequest(
                lo, self._nonce, port, lifetime,
                suggested_external_port=prev[1] if prev else port,
                suggested_external_ip=IPv4(prev[0]) if prev else None,
            )  # fmt: skip
            self._send(_PCP_MAP, req.encode(), now)
        else:
            self._upnp_add(prev[1] if prev else port)
        self._deadlines[_Timer.ATTEMPT] = now + 2 * self._t.request_timeout

    def _upnp_add(self, external_port: int) -> None:
        svc, lo = self._upnp.service, self.local
        if svc is None or lo is None:
            return
        self._upnp_port = external_port
        make = igd.add_any_port_mapping if svc.version == 2 else igd.add_port_mapping
        port = self.config.internal_port
        desc = self.config.description
        call = make(svc.service_type, external_port, port, lo, self._upnp_lease, desc)
        self._http_call("add", call)

    def _granted(self, external: Endpoint, lifetime: int, now: float) -> None:
        proto = self._current
        assert proto is not None
        old = self.mapping
        self.mapping = Mapping(proto, external, self.config.internal_port, lifetime)
        self._reset(Phase.MAPPED, keep_mapping=True)
        self._backoff = self._t.backoff_min
        if old is None or old.external != external or old.protocol is not proto:
            self._events.append(MappingChanged(self.mapping))
        half = lifetime / 2 if lifetime else self._t.permanent_renew
        self._deadlines[_Timer.RENEW] = now + max(half, 1.0)
        self._deadlines[_Timer.CHECK] = now + self._t.check_interval

    def _attempt_failed(self, reason: str, now: float) -> None:
        if self.phase is not Phase.MAPPING:
            return
        self._lose(reason)
        self._next_protocol(now)

    def _check(self, now: float) -> None:
        """Between renewals: is the router still there, with our mapping?"""
        mapping, lo = self.mapping, self.local
        if mapping is None or lo is None:
            return
        if mapping.protocol is Protocol.PMP:
            self._send(_PMP_ADDR, pmp.ExternalAddressRequest().encode(), now)
        elif mapping.protocol is Protocol.PCP:
            self._send(_PCP_ANNOUNCE, pcp.AnnounceRequest(lo).encode(), now)
        elif self._upnp.service is not None:
            svc = self._upnp.service
            call = igd.get_specific_port_mapping_entry(svc.service_type, mapping.external[1])
            self._http_call("check", call)

    def _router_restarted(self, now: float) -> None:
        self._lose("router lost its mappings")
        self._epoch.reset()
        self._start_mapping(now)

    # --- answers ---------------------------------------------------------------------------

    def _epoch_lost(self, epoch: int, now: float) -> bool:
        return self._epoch.observe(epoch, now) and self.mapping is not None

    def _on_pmp(
        self, msg: pmp.ExternalAddressResponse | pmp.MapResponse | pmp.UnsupportedVersion,
        now: float,
    ) -> None:  # fmt: skip
        if isinstance(msg, pmp.UnsupportedVersion):
            self._udp.pop(_PCP_ANNOUNCE, None)  # a NAT-PMP-only server refusing our PCP
            self._udp.pop(_PCP_MAP, None)
            if self.phase is Phase.MAPPING and self._current is Protocol.PCP:
                self._attempt_failed("PCP not supported", now)
            return
        if isinstance(msg, pmp.ExternalAddressResponse):
            self._udp.pop(_PMP_ADDR, None)
            if msg.result != pmp.ResultCode.SUCCESS:
                return
            if self.phase is Phase.PROBING:
                self._seen.add(Protocol.PMP)
            lost = self._current is Protocol.PMP and self._epoch_lost(msg.epoch, now)
            self._pmp_ip = msg.address
            if lost:
                self._router_restarted(now)
            elif self._pmp_address_moved(msg.address):
                assert self.mapping is not None
                external = (str(msg.address), self.mapping.external[1])
                self._granted(external, self.mapping.lifetime, now)
            else:
                self._pmp_try_finish(now)
            self._maybe_finish_probe(now)
            return
        if msg.internal_port != self.config.internal_port or _PMP_MAP not in self._udp:
            raise MalformedAnswer(f"NAT-PMP map answer for port {msg.internal_port}, not ours")
        self._udp.pop(_PMP_MAP)
        if self.phase is Phase.STOPPING:
            self._reset(Phase.STOPPED)
            return
        if msg.result != pmp.ResultCode.SUCCESS:
            self._attempt_failed(f"NAT-PMP result {msg.result}", now)
            return
        if self._epoch_lost(msg.epoch, now):
            self._router_restarted(now)
            return
        self._pmp_map = msg
        self._pmp_try_finish(now)

    def _pmp_address_moved(self, address: IPv4) -> bool:
        m = self.mapping
        return (
            self.phase is Phase.MAPPED
            and m is not None
            and m.protocol is Protocol.PMP
            and m.external[0] != str(address)
        )

    def _pmp_try_finish(self, now: float) -> None:
        """A NAT-PMP mapping needs both answers: the map and the external address."""
        msg = self._pmp_map
        ready = msg is not None and self._pmp_ip is not None and _PMP_ADDR not in self._udp
        if ready and self.phase is Phase.MAPPING and self._current is Protocol.PMP:
            assert msg is not None
            self._pmp_map = None
            self._granted((str(self._pmp_ip), msg.external_port), msg.lifetime, now)

    def _on_pcp(
        self, msg: pcp.Response | pcp.MapResponse | pcp.VersionMismatch, now: float
    ) -> None:
        if isinstance(msg, pcp.VersionMismatch):
            return  # answered our NAT-PMP request: only a PCP server does that; nothing to learn
        if isinstance(msg, pcp.Response) and msg.opcode == pcp.Opcode.ANNOUNCE:
            self._udp.pop(_PCP_ANNOUNCE, None)
            if msg.result != pcp.ResultCode.SUCCESS:
                return
            if self.phase is Phase.PROBING:
                self._seen.add(Protocol.PCP)
            if self._current is Protocol.PCP and self._epoch_lost(msg.epoch, now):
                self._router_restarted(now)
            self._maybe_finish_probe(now)
            return
        if _PCP_MAP not in self._udp:
            raise MalformedAnswer("PCP answer to no request of ours")
        if isinstance(msg, pcp.Response):  # an error answer to our MAP, without its payload
            self._udp.pop(_PCP_MAP)
            if self.phase is Phase.STOPPING:
                self._reset(Phase.STOPPED)
            else:
                self._attempt_failed(f"PCP result {msg.result}", now)
            return
        if msg.nonce != self._nonce or msg.internal_port != self.config.internal_port:
            raise MalformedAnswer("PCP MAP answer with another nonce or internal port")
        self._udp.pop(_PCP_MAP)
        if self.phase is Phase.STOPPING:
            self._reset(Phase.STOPPED)
            return
        if msg.result != pcp.ResultCode.SUCCESS or msg.external_ip is None:
            self._attempt_failed(f"PCP result {msg.result}", now)
            return
        if self._epoch_lost(msg.epoch, now):
            self._router_restarted(now)
            return
        self._granted((str(msg.external_ip), msg.external_port), msg.lifetime, now)

    def _on_ssdp(self, msg: ssdp.SearchResponse, now: float) -> None:
        if str(msg.location.host) != str(self.gateway):
            raise MalformedAnswer("SSDP LOCATION on another host than the answering gateway")
        if self.phase is not Phase.PROBING or self._upnp.location is not None:
            return
        self._udp.pop(_SSDP, None)
        self._upnp.location = msg.location
        loc = msg.location
        exchange = HttpExchange("GET", str(loc.host), loc.port, loc.path)
        self._http_request("desc", exchange)

    def _on_http(self, purpose: str, response: HttpResponse, now: float) -> None:
        svc = self._upnp.service
        if purpose == "desc":
            loc = self._upnp.location
            if response.status != 200 or loc is None:
                raise RouterRefused(f"HTTP {response.status} for the description", response.status)
            self._upnp.service = igd.parse_description(response.body, loc)
            self._seen.add(Protocol.UPNP)
            self._maybe_finish_probe(now)
            return
        if svc is None:
            return
        if purpose == "delete":
            if self.phase is Phase.STOPPING:
                self._reset(Phase.STOPPED)
            return
        if purpose == "add":
            action = "AddAnyPortMapping" if svc.version == 2 else "AddPortMapping"
            out = igd.parse_soap_response(igd.SoapCall(svc.service_type, action), response)
            if svc.version == 2:
                self._upnp_port = igd.parse_reserved_port(out)
            self._http_call("extip", igd.get_external_ip(svc.service_type))
        elif purpose == "extip":
            ip = igd.parse_external_ip(igd.parse_soap_response(igd.get_external_ip(""), response))
            if self.phase is Phase.MAPPING:
                self._granted((str(ip), self._upnp_port), self._upnp_lease, now)
        elif purpose == "check" and self.mapping is not None:
            call = igd.get_specific_port_mapping_entry(svc.service_type, 0)
            entry = igd.parse_port_mapping_entry(igd.parse_soap_response(call, response))
            ours = (self.config.internal_port, str(self.local))
            if (entry.internal_port, entry.internal_client) != ours:
                self._router_restarted(now)  # the entry now points elsewhere

    def _on_http_error(self, purpose: str, err: RemoteProtocolError, now: float) -> None:
        if purpose == "desc":
            self._upnp.desc_failed = True
            self._maybe_finish_probe(now)
        elif purpose == "delete":
            if self.phase is Phase.STOPPING:
                self._reset(Phase.STOPPED)
        elif purpose == "add" and isinstance(err, UpnpFault) and self.phase is Phase.MAPPING:
            port = self.config.internal_port
            if err.code == igd.ERR_ONLY_PERMANENT_LEASES and self._upnp_lease:
                self._upnp_lease = 0
                self._upnp_add(self._upnp_port)
            elif err.code == igd.ERR_CONFLICT and self._conflicts < _MAX_CONFLICT_RETRIES:
                self._conflicts += 1  # someone else holds that external port: pick another
                self._upnp_add(1024 + int.from_bytes(self._randbytes(2)) % (65536 - 1024))
            elif err.code == igd.ERR_SAME_PORT_REQUIRED and self._upnp_port != port:
                self._upnp_add(port)
            else:
                self._attempt_failed(str(err), now)
        elif purpose == "check" and isinstance(err, UpnpFault):
            self._router_restarted(now)  # 714 NoSuchEntryInArray: the entry is gone
        elif purpose == "check":
            self._lose(f"router unreachable: {err}")  # the description's server is gone
            self._start_probe(now)
        else:
            self._attempt_failed(str(err), now)

    # --- helpers ---------------------------------------------------------------------------

    def _due(self, timer: _Timer, now: float) -> bool:
        when = self._deadlines[timer]
        if when is not None and now >= when:
            self._deadlines[timer] = None
            return True
        return False

    def _reset(self, phase: Phase, *, keep_mapping: bool = False) -> None:
        """Enter `phase` with no timers armed and no requests outstanding."""
        self.phase = phase
        self._deadlines = dict.fromkeys(_Timer)
        self._udp.clear()
        self._http.clear()
        self._pmp_map = None
        if not keep_mapping:
            self.mapping = None

    def _lose(self, reason: str) -> None:
        if self.mapping is not None:
            self._events.append(MappingLost(self.mapping.protocol, self.mapping.external, reason))
            self.mapping = None

    def _send(
        self, kind: str, data: bytes, now: float, dests: list[Endpoint] | None = None
    ) -> None:
        gw = str(self.gateway)
        grams = [(data, d) for d in (dests or [(gw, pmp.PORT)])]
        self._out.extend(grams)
        self._udp[kind] = _Outstanding(
            grams, now + self._t.retransmit, self._t.retransmit, now + self._t.request_timeout
        )

    def _http_call(self, purpose: str, call: igd.SoapCall) -> None:
        svc = self._upnp.service
        if svc is None:
            return
        ctl = svc.control
        exchange = HttpExchange(
            "POST", str(ctl.host), ctl.port, ctl.path, headers=call.headers(), body=call.body()
        )
        self._http_request(purpose, exchange)

    def _http_request(self, purpose: str, exchange: HttpExchange) -> None:
        rid = self._http_next
        self._http_next += 1
        self._http[rid] = purpose
        self._http_out.append(
            HttpRequest(rid, exchange.host, exchange.port, exchange, self._t.request_timeout)
        )
