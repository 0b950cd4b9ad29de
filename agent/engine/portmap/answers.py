"""The router's answers, per protocol: NAT-PMP and PCP datagrams (epochs, our port and nonce
checked), the SSDP answer and the UPnP IGD HTTP exchanges (description, SOAP results and faults).
Each moves the state machine of `core`; anything unusable raises RemoteProtocolError."""

from __future__ import annotations

from agent.engine.portmap.core import (
    MAX_CONFLICT_RETRIES,
    PCP_ANNOUNCE,
    PCP_MAP,
    PMP_ADDR,
    PMP_MAP,
    SSDP,
    MappingCore,
    Timer,
)
from agent.engine.portmap.model import IPv4, Phase, Protocol
from agent.proto.errors import RemoteProtocolError
from agent.proto.portmap import announce, igd, pcp, pmp, ssdp
from agent.proto.portmap.errors import MalformedAnswer, RouterRefused, UpnpFault
from agent.proto.portmap.http import HttpExchange, HttpResponse

__all__ = ["AnswerHandlers"]


class AnswerHandlers(MappingCore):
    """What each answer from the router does to the mapping state."""

    def _epoch_lost(self, epoch: int, now: float) -> bool:
        return self._epoch.observe(epoch, now) and self.mapping is not None

    def _on_pmp(
        self, msg: pmp.ExternalAddressResponse | pmp.MapResponse | pmp.UnsupportedVersion,
        now: float,
    ) -> None:  # fmt: skip
        if isinstance(msg, pmp.UnsupportedVersion):
            self._udp.pop(PCP_ANNOUNCE, None)  # a NAT-PMP-only server refusing our PCP
            self._udp.pop(PCP_MAP, None)
            if self.phase is Phase.MAPPING and self._current is Protocol.PCP:
                self._attempt_failed("PCP not supported", now)
            return
        if isinstance(msg, pmp.ExternalAddressResponse):
            self._udp.pop(PMP_ADDR, None)
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
        if msg.internal_port != self.config.internal_port or PMP_MAP not in self._udp:
            raise MalformedAnswer(f"NAT-PMP map answer for port {msg.internal_port}, not ours")
        self._udp.pop(PMP_MAP)
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
        ready = msg is not None and self._pmp_ip is not None and PMP_ADDR not in self._udp
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
            self._udp.pop(PCP_ANNOUNCE, None)
            if msg.result != pcp.ResultCode.SUCCESS:
                return
            if self.phase is Phase.PROBING:
                self._seen.add(Protocol.PCP)
            if self._current is Protocol.PCP and self._epoch_lost(msg.epoch, now):
                self._router_restarted(now)
            self._maybe_finish_probe(now)
            return
        if PCP_MAP not in self._udp:
            raise MalformedAnswer("PCP answer to no request of ours")
        if isinstance(msg, pcp.Response):  # an error answer to our MAP, without its payload
            self._udp.pop(PCP_MAP)
            if self.phase is Phase.STOPPING:
                self._reset(Phase.STOPPED)
            else:
                self._attempt_failed(f"PCP result {msg.result}", now)
            return
        if msg.nonce != self._nonce or msg.internal_port != self.config.internal_port:
            raise MalformedAnswer("PCP MAP answer with another nonce or internal port")
        self._udp.pop(PCP_MAP)
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

    def _on_announcement(self, ann: announce.Announcement, now: float) -> None:
        """The gateway says its state changed (224.0.0.1:5350)."""
        self.announcements += 1
        if self.phase is Phase.BACKOFF:
            self._start_probe(now)  # it is (back) up: no need to wait out the backoff
            return
        m = self.mapping
        if self.phase is not Phase.MAPPED or m is None:
            return
        if m.protocol.value != ann.protocol:
            self._check(now)  # not the protocol we map with: ask ours whether the state is gone
            return
        if self._epoch_lost(ann.epoch, now):
            self._lose("the router announced it lost its mappings")
            self._epoch.reset()
            jitter = self._randbytes(1)[0] / 256
            self._deadlines[Timer.RENEW] = now + jitter * self._t.announce_delay
        elif ann.address is not None and self._pmp_address_moved(ann.address):
            self._pmp_ip = ann.address
            self._granted((str(ann.address), m.external[1]), m.lifetime, now)

    def _on_ssdp(self, msg: ssdp.SearchResponse, now: float) -> None:
        if str(msg.location.host) != str(self.gateway):
            raise MalformedAnswer("SSDP LOCATION on another host than the answering gateway")
        if self.phase is not Phase.PROBING or self._upnp.location is not None:
            return
        self._udp.pop(SSDP, None)
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
            elif err.code == igd.ERR_CONFLICT and self._conflicts < MAX_CONFLICT_RETRIES:
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
