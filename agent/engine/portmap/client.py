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
gone or pointing elsewhere) gives `MappingLost` and an immediate re-map. A router that says so
itself, on 224.0.0.1:5350 (`receive_announcement`: a NAT-PMP address announcement or a PCP
unsolicited ANNOUNCE with a new epoch), is mapped again within `announce_delay`, not at the next
check; a NAT-PMP announcement of a new external address moves the mapping to it; an
announcement while backing off probes at once, and one about a UPnP-mapped router checks the
entry; a router that stopped
answering gives `MappingLost` and a new probe; a failure backs off exponentially (with jitter)
before probing again. `stop()` deletes the mapping (lifetime 0 / DeletePortMapping) and waits at
most `stop_timeout` for the answer.

    phase       input                                   next
    IDLE        set_network                             PROBING
    PROBING     all answered / probe deadline           MAPPING (something answered) | BACKOFF
    PROBING     the same, with config.probe_only        STOPPED (after ProbeDone)
    MAPPING     granted                                 MAPPED
    MAPPING     refused / no answer                     MAPPING (next protocol) | BACKOFF
    MAPPED      renew deadline, router lost its state   MAPPING
    MAPPED      check failed (router unreachable)       PROBING
    BACKOFF     backoff deadline                        PROBING
    any         set_network (gateway or address moved)  PROBING
    any         stop                                    STOPPING (a mapping to delete) | STOPPED
    STOPPING    delete answered / stop deadline         STOPPED

Surface (sans-I/O): inputs `set_network`, `receive_udp`, `receive_announcement`, `receive_http`,
`http_failed`, `on_timer`, `stop`, each with `now`; outputs drained by the shell:
`datagrams_to_send()` (bytes to (ip, port)), `http_requests()` (one bounded HTTP exchange each,
answered by id), `events()`, and `next_deadline()`. `receive_udp` and `receive_announcement`
raise only RemoteProtocolError (the shell logs it and goes on).
"""

from __future__ import annotations

from agent.engine.portmap.answers import AnswerHandlers
from agent.engine.portmap.core import PCP_MAP, PMP_MAP, Timer, UpnpState
from agent.engine.portmap.model import (
    Endpoint,
    HttpRequest,
    IPv4,
    MappingLost,
    Phase,
    PortmapEvent,
    Protocol,
)
from agent.proto.errors import RemoteProtocolError
from agent.proto.portmap import announce, igd, pcp, pmp, ssdp
from agent.proto.portmap.errors import MalformedAnswer
from agent.proto.portmap.http import HttpResponse

__all__ = ["PortmapClient"]


class PortmapClient(AnswerHandlers):
    """The client for one internal UDP port. Owned by one caller (the shell's task)."""

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
        self._upnp = UpnpState()
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

    def receive_announcement(self, data: bytes, src: Endpoint, now: float) -> None:
        """A datagram to 224.0.0.1:5350. Raises RemoteProtocolError unless it is a NAT-PMP or
        PCP announcement from our gateway."""
        if self.gateway is None or src[0] != str(self.gateway):
            raise MalformedAnswer(f"announcement from {src[0]}, not the gateway")
        self._on_announcement(announce.parse_announcement(data), now)

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
        if self._due(Timer.STOP, now):
            self._reset(Phase.STOPPED)
        if self._due(Timer.PROBE, now):
            self._finish_probe(now)
        if self._due(Timer.ATTEMPT, now):
            self._attempt_failed("no answer", now)
        if self._due(Timer.BACKOFF, now):
            self._start_probe(now)
        if self._due(Timer.RENEW, now) and self.phase is Phase.MAPPED:
            self._start_mapping(now)
        if self._due(Timer.CHECK, now) and self.phase is Phase.MAPPED:
            self._check(now)
            d[Timer.CHECK] = now + self._t.check_interval

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
            self._send(PMP_MAP, pmp.MapRequest(self.config.internal_port, 0, 0).encode(), now)
        elif mapping.protocol is Protocol.PCP and self.local is not None:
            req = pcp.MapRequest(self.local, self._nonce, self.config.internal_port, 0)
            self._send(PCP_MAP, req.encode(), now)
        self._deadlines[Timer.STOP] = now + self._t.stop_timeout

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
