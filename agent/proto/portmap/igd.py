"""UPnP Internet Gateway Device: device description and WANIPConnection SOAP, sans-I/O.

Flow (after SSDP gave the description's Location):

    C -> G  GET /rootDesc.xml              G -> C  <root> ... <device> ... <serviceList> ...
    C -> G  POST controlURL  SOAPAction: "urn:schemas-upnp-org:service:WANIPConnection:N#Action"
            <s:Envelope><s:Body><u:Action xmlns:u="serviceType"> <NewArg>v</NewArg> ...
    G -> C  200 <u:ActionResponse> <NewOut>v</NewOut> ...      or
            500 <s:Fault> ... <UPnPError><errorCode>718</errorCode><errorDescription>...

Actions used (WANIPConnection:1 and :2, WANPPPConnection:1 has the same ones):
    GetExternalIPAddress   -> NewExternalIPAddress
    AddPortMapping         NewRemoteHost "", NewExternalPort, NewProtocol UDP, NewInternalPort,
                           NewInternalClient, NewEnabled 1, NewPortMappingDescription,
                           NewLeaseDuration                                     (v1 and v2)
    AddAnyPortMapping      the same arguments -> NewReservedPort               (v2 only)
    GetSpecificPortMappingEntry  NewRemoteHost, NewExternalPort, NewProtocol
                           -> NewInternalPort, NewInternalClient, NewEnabled, NewLeaseDuration, ...
    DeletePortMapping      NewRemoteHost, NewExternalPort, NewProtocol

UPnP error codes the client acts on: 714 NoSuchEntryInArray, 718 ConflictInMappingEntry,
724 SamePortValuesRequired, 725 OnlyPermanentLeasesSupported.

Hostile input: XML goes through defusedxml with DTDs forbidden (so no entity expansion and no
external fetches), after a size bound; element names are compared by local name, so namespace
prefixes do not matter. Control URLs must stay on the host that served the description.
Parsers raise only RemoteProtocolError (MalformedAnswer, UpnpFault, RouterRefused).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape

import defusedxml
import defusedxml.ElementTree as DefusedET

from .errors import MalformedAnswer, RouterRefused, UpnpFault
from .http import HttpResponse
from .ssdp import Location

__all__ = [
    "WANIP1",
    "WANIP2",
    "WANPPP1",
    "SERVICE_PREFERENCE",
    "MAX_XML",
    "ERR_NO_SUCH_ENTRY",
    "ERR_CONFLICT",
    "ERR_SAME_PORT_REQUIRED",
    "ERR_ONLY_PERMANENT_LEASES",
    "IgdService",
    "SoapCall",
    "PortMappingEntry",
    "parse_description",
    "get_external_ip",
    "add_port_mapping",
    "add_any_port_mapping",
    "get_specific_port_mapping_entry",
    "delete_port_mapping",
    "parse_soap_response",
    "parse_external_ip",
    "parse_reserved_port",
    "parse_port_mapping_entry",
]

WANIP1: Final = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2: Final = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1: Final = "urn:schemas-upnp-org:service:WANPPPConnection:1"
SERVICE_PREFERENCE: Final = (WANIP2, WANIP1, WANPPP1)
MAX_XML: Final = 128 * 1024
MAX_ELEMENTS: Final = 4096

ERR_NO_SUCH_ENTRY: Final = 714
ERR_CONFLICT: Final = 718
ERR_SAME_PORT_REQUIRED: Final = 724
ERR_ONLY_PERMANENT_LEASES: Final = 725


def _xml(data: bytes) -> Element:
    if len(data) > MAX_XML:
        raise MalformedAnswer(f"UPnP XML of {len(data)} bytes")
    try:
        root = DefusedET.fromstring(data, forbid_dtd=True, forbid_entities=True)
    except (ParseError, defusedxml.DefusedXmlException, ValueError, UnicodeError) as e:
        raise MalformedAnswer(f"UPnP XML: {type(e).__name__}") from None
    if sum(1 for _ in root.iter()) > MAX_ELEMENTS:
        raise MalformedAnswer("UPnP XML with too many elements")
    return root


def _local(tag: object) -> str:
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _children(el: Element, name: str) -> Iterator[Element]:
    return (c for c in el if _local(c.tag) == name)


def _text(el: Element, name: str) -> str:
    for c in _children(el, name):
        return (c.text or "").strip()
    return ""


@dataclass(frozen=True, slots=True)
class IgdService:
    """The WAN connection service chosen from a description, and where to POST to it."""

    service_type: str
    control: Location
    udn: str

    @property
    def version(self) -> int:
        return 2 if self.service_type == WANIP2 else 1


def parse_description(data: bytes, location: Location) -> IgdService:
    """The best WAN connection service (WANIPConnection:2, :1, then WANPPPConnection:1) of the
    device description fetched from `location`."""
    root = _xml(data)
    if _local(root.tag) != "root":
        raise MalformedAnswer("UPnP description without a <root>")
    base = location
    url_base = _text(root, "URLBase")
    if url_base:
        base = location.join(url_base)
    udn = ""
    found: dict[str, str] = {}
    for dev in root.iter():
        if _local(dev.tag) != "device":
            continue
        udn = udn or _text(dev, "UDN")
        for lst in _children(dev, "serviceList"):
            for svc in _children(lst, "service"):
                stype = _text(svc, "serviceType")
                ctl = _text(svc, "controlURL")
                if stype in SERVICE_PREFERENCE and ctl and stype not in found:
                    found[stype] = ctl
    for stype in SERVICE_PREFERENCE:
        if stype in found:
            control = base.join(found[stype])
            if control.host != location.host:
                raise MalformedAnswer("UPnP control URL on another host than the description")
            return IgdService(stype, control, udn[:128])
    raise MalformedAnswer("UPnP description without a WANIPConnection/WANPPPConnection service")


@dataclass(frozen=True, slots=True)
class SoapCall:
    """One SOAP action: the HTTP headers and body to POST to the service's control URL."""

    service_type: str
    action: str
    args: tuple[tuple[str, str], ...] = ()

    def headers(self) -> tuple[tuple[str, str], ...]:
        return (
            ("Content-Type", 'text/xml; charset="utf-8"'),
            ("SOAPAction", f'"{self.service_type}#{self.action}"'),
        )

    def body(self) -> bytes:
        inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in self.args)
        return (
            '<?xml version="1.0"?>\r\n'
            '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
            f'<s:Body><u:{self.action} xmlns:u="{self.service_type}">{inner}'
            f"</u:{self.action}></s:Body></s:Envelope>\r\n"
        ).encode()


def get_external_ip(service_type: str) -> SoapCall:
    return SoapCall(service_type, "GetExternalIPAddress")


def _mapping_args(
    external_port: int, internal_port: int, client: ipaddress.IPv4Address, lease: int, desc: str
) -> tuple[tuple[str, str], ...]:
    return (
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", "UDP"),
        ("NewInternalPort", str(internal_port)),
        ("NewInternalClient", str(client)),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", desc),
        ("NewLeaseDuration", str(lease)),
    )


def add_port_mapping(
    service_type: str, external_port: int, internal_port: int, client: ipaddress.IPv4Address,
    lease: int, desc: str,
) -> SoapCall:  # fmt: skip
    return SoapCall(
        service_type, "AddPortMapping",
        _mapping_args(external_port, internal_port, client, lease, desc),
    )  # fmt: skip


def add_any_port_mapping(
    service_type: str, external_port: int, internal_port: int, client: ipaddress.IPv4Address,
    lease: int, desc: str,
) -> SoapCall:  # fmt: skip
    return SoapCall(
        service_type, "AddAnyPortMapping",
        _mapping_args(external_port, internal_port, client, lease, desc),
    )  # fmt: skip


def _entry_args(external_port: int) -> tuple[tuple[str, str], ...]:
    return (("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP"))


def get_specific_port_mapping_entry(service_type: str, external_port: int) -> SoapCall:
    return SoapCall(service_type, "GetSpecificPortMappingEntry", _entry_args(external_port))


def delete_port_mapping(service_type: str, external_port: int) -> SoapCall:
    return SoapCall(service_type, "DeletePortMapping", _entry_args(external_port))


def parse_soap_response(call: SoapCall, response: HttpResponse) -> dict[str, str]:
    """The output arguments of `call`'s answer; UpnpFault for a UPnPError, RouterRefused for
    another HTTP error, MalformedAnswer for anything unparseable."""
    if response.status == 200:
        root = _xml(response.body)
        want = f"{call.action}Response"
        for el in root.iter():
            if _local(el.tag) == want:
                return {_local(c.tag): (c.text or "").strip()[:256] for c in el}
        raise MalformedAnswer(f"SOAP answer without <{want}>")
    if response.status == 500 and response.body:
        root = _xml(response.body)
        for el in root.iter():
            if _local(el.tag) == "UPnPError":
                code_s = _text(el, "errorCode")
                if not code_s.isdigit() or len(code_s) > 6:
                    raise MalformedAnswer("UPnPError without a numeric errorCode")
                raise UpnpFault(int(code_s), _text(el, "errorDescription")[:128])
        raise RouterRefused("SOAP fault without a UPnPError", 500)
    raise RouterRefused(f"HTTP {response.status} from the UPnP control URL", response.status)


def parse_external_ip(out: Mapping[str, str]) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(out.get("NewExternalIPAddress", ""))
    except ValueError:
        raise MalformedAnswer("GetExternalIPAddress without an IPv4 address") from None


def _port_of(out: Mapping[str, str], name: str) -> int:
    value = out.get(name, "")
    if not value.isdigit() or len(value) > 5 or not 1 <= int(value) <= 65535:
        raise MalformedAnswer(f"{name} is not a port")
    return int(value)


def parse_reserved_port(out: Mapping[str, str]) -> int:
    return _port_of(out, "NewReservedPort")


@dataclass(frozen=True, slots=True)
class PortMappingEntry:
    internal_port: int
    internal_client: str
    enabled: bool
    lease: int


def parse_port_mapping_entry(out: Mapping[str, str]) -> PortMappingEntry:
    lease_s = out.get("NewLeaseDuration", "0") or "0"
    if not lease_s.isdigit() or len(lease_s) > 10:
        raise MalformedAnswer("NewLeaseDuration is not a number")
    return PortMappingEntry(
        _port_of(out, "NewInternalPort"),
        out.get("NewInternalClient", ""),
        out.get("NewEnabled", "1") in ("1", "true", "yes"),
        int(lease_s),
    )
