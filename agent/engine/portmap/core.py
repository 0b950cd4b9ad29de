"""The mapping state machine's core: its state, probing the gateway, requesting and renewing
the mapping, and the bookkeeping of outstanding requests (UDP retransmits, HTTP ids, deadlines).
The answers that drive it are handled in `answers`; the public surface is `client`."""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from agent.engine.portmap.model import (
    Endpoint,
    HttpRequest,
    IPv4,
    Mapping,
    MappingChanged,
    MappingLost,
    Phase,
    PortmapConfig,
    PortmapEvent,
    ProbeDone,
    Protocol,
)
from agent.proto.portmap import igd, pcp, pmp, ssdp
from agent.proto.portmap.epoch import EpochTracker
from agent.proto.portmap.http import HttpExchange

__all__ = [
    "MAX_CONFLICT_RETRIES",
    "PCP_ANNOUNCE",
    "PCP_MAP",
    "PMP_ADDR",
    "PMP_MAP",
    "SSDP",
    "MappingCore",
    "Outstanding",
    "Timer",
    "UpnpState",
]


class Timer(Enum):
    PROBE = "probe"
    ATTEMPT = "attempt"
    RENEW = "renew"
    CHECK = "check"
    BACKOFF = "backoff"
    STOP = "stop"


@dataclass(slots=True)
class Outstanding:
    """A UDP request retransmitted until answered or `give_up`."""

    datagrams: list[tuple[bytes, Endpoint]]
    next_send: float
    interval: float
    give_up: float


# kinds of outstanding UDP requests
PMP_ADDR: Final = "pmp_addr"
PMP_MAP: Final = "pmp_map"
PCP_ANNOUNCE: Final = "pcp_announce"
PCP_MAP: Final = "pcp_map"
SSDP: Final = "ssdp"
MAX_CONFLICT_RETRIES: Final = 3


@dataclass(slots=True)
class UpnpState:
    location: ssdp.Location | None = None
    service: igd.IgdService | None = None
    desc_failed: bool = False


class MappingCore:
    """State and transitions of the client for one internal UDP port (see `client`)."""

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
        self._deadlines: dict[Timer, float | None] = dict.fromkeys(Timer)
        self._udp: dict[str, Outstanding] = {}
        self._out: list[tuple[bytes, Endpoint]] = []
        self._http_out: list[HttpRequest] = []
        self._http: dict[int, str] = {}  # request id -> purpose
        self._http_next = 1
        self._events: deque[PortmapEvent] = deque()
        self._epoch = EpochTracker()
        self._seen: set[Protocol] = set()
        self._upnp = UpnpState()
        self._pmp_ip: IPv4 | None = None
        self._nonce = randbytes(pcp.NONCE_SIZE)
        self._tried: list[Protocol] = []
        self._current: Protocol | None = None
        self._upnp_lease = self._t.lifetime
        self._upnp_port = 0  # external port asked for next
        self._conflicts = 0
        self._backoff = self._t.backoff_min
        self._pmp_map: pmp.MapResponse | None = None  # a NAT-PMP grant waiting for the address
        self.announcements = 0  # announcements heard from the gateway (224.0.0.1:5350)

    # --- probing ---------------------------------------------------------------------------

    def _start_probe(self, now: float) -> None:
        gw, lo = self.gateway, self.local
        if gw is None or lo is None:
            return
        self._reset(Phase.PROBING)
        self._seen = set()
        self._upnp = UpnpState()
        if Protocol.PMP in self.config.protocols:
            self._send(PMP_ADDR, pmp.ExternalAddressRequest().encode(), now)
        if Protocol.PCP in self.config.protocols:
            self._send(PCP_ANNOUNCE, pcp.AnnounceRequest(lo).encode(), now)
        if Protocol.UPNP in self.config.protocols:
            search = ssdp.m_search()
            self._send(
                SSDP, search, now,
                dests=[(ssdp.MULTICAST_ADDR, ssdp.PORT), (str(gw), ssdp.PORT)],
            )  # fmt: skip
        self._deadlines[Timer.PROBE] = now + self._t.probe_timeout

    def _probe_complete(self) -> bool:
        u = self._upnp
        if u.location is not None and u.service is None and not u.desc_failed:
            return False  # the description is on its way
        return self._seen >= set(self.config.protocols)

    def _maybe_finish_probe(self, now: float) -> None:
        if self.phase is Phase.PROBING and self._probe_complete():
            self._finish_probe(now)

    def _finish_probe(self, now: float) -> None:
        self._deadlines[Timer.PROBE] = None
        for kind in (PMP_ADDR, PCP_ANNOUNCE, SSDP):
            self._udp.pop(kind, None)
        avail = set(self._seen)
        if self._upnp.service is None:
            avail.discard(Protocol.UPNP)
        self.available = frozenset(avail)
        self._events.append(ProbeDone(self.available, str(self.gateway)))
        if self.config.probe_only:
            self._reset(Phase.STOPPED)
            return
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
        self._deadlines[Timer.BACKOFF] = now + self._backoff * jitter
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
            self._send(PMP_ADDR, pmp.ExternalAddressRequest().encode(), now)
            self._send(PMP_MAP, pmp.MapRequest(port, suggested, lifetime).encode(), now)
        elif proto is Protocol.PCP:
            req = pcp.MapRequest(
                lo, self._nonce, port, lifetime,
                suggested_external_port=prev[1] if prev else port,
                suggested_external_ip=IPv4(prev[0]) if prev else None,
            )  # fmt: skip
            self._send(PCP_MAP, req.encode(), now)
        else:
            self._upnp_add(prev[1] if prev else port)
        self._deadlines[Timer.ATTEMPT] = now + 2 * self._t.request_timeout

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
        self._deadlines[Timer.RENEW] = now + max(half, 1.0)
        self._deadlines[Timer.CHECK] = now + self._t.check_interval

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
            self._send(PMP_ADDR, pmp.ExternalAddressRequest().encode(), now)
        elif mapping.protocol is Protocol.PCP:
            self._send(PCP_ANNOUNCE, pcp.AnnounceRequest(lo).encode(), now)
        elif self._upnp.service is not None:
            svc = self._upnp.service
            call = igd.get_specific_port_mapping_entry(svc.service_type, mapping.external[1])
            self._http_call("check", call)

    def _router_restarted(self, now: float) -> None:
        self._lose("router lost its mappings")
        self._epoch.reset()
        self._start_mapping(now)

    # --- helpers ---------------------------------------------------------------------------

    def _due(self, timer: Timer, now: float) -> bool:
        when = self._deadlines[timer]
        if when is not None and now >= when:
            self._deadlines[timer] = None
            return True
        return False

    def _reset(self, phase: Phase, *, keep_mapping: bool = False) -> None:
        """Enter `phase` with no timers armed and no requests outstanding."""
        self.phase = phase
        self._deadlines = dict.fromkeys(Timer)
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
        self._udp[kind] = Outstanding(
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
