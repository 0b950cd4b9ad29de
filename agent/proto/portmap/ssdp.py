"""SSDP discovery of an Internet Gateway Device (UPnP Device Architecture 1.1 §1.3), sans-I/O.

Flow (client C on the LAN; the router's UPnP daemon listens on 239.255.255.250:1900):

    C -> 239.255.255.250:1900 (and the gateway's own :1900, for routers that ignore multicast)
         M-SEARCH * HTTP/1.1  ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1
    G -> C (unicast, from any source port)
         HTTP/1.1 200 OK      LOCATION: http://<gateway>:<port>/rootDesc.xml  ST, USN, SERVER

An IGD:2 device answers the :1 search too. The answer is an HTTP-like header block in one
datagram; `parse_response` checks the status line, bounds it, and requires a LOCATION that is a
plain `http://IPv4[:port]/path` URL (no names: nothing is resolved, and the client then insists
the host is the router that answered). NOTIFY ssdp:alive announcements parse the same way.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Self

from .errors import MalformedAnswer

__all__ = [
    "MULTICAST_ADDR",
    "PORT",
    "ST_IGD1",
    "ST_IGD2",
    "MAX_ANSWER",
    "Location",
    "SearchResponse",
    "m_search",
    "parse_response",
]

MULTICAST_ADDR: Final = "239.255.255.250"
PORT: Final = 1900
ST_IGD1: Final = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
ST_IGD2: Final = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
MAX_ANSWER: Final = 2048
MAX_URL: Final = 512


def m_search(st: str = ST_IGD1, mx: int = 1) -> bytes:
    """The M-SEARCH datagram; `mx` is the seconds a device may wait before answering."""
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {MULTICAST_ADDR}:{PORT}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {st}\r\n"
        "\r\n"
    ).encode("ascii")


@dataclass(frozen=True, slots=True)
class Location:
    """An `http://IPv4[:port]/path` URL."""

    host: ipaddress.IPv4Address
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Self:
        if len(url) > MAX_URL or not url.isascii() or any(c in url for c in " \r\n\t\\"):
            raise MalformedAnswer("UPnP URL too long or with forbidden characters")
        if not url.lower().startswith("http://"):
            raise MalformedAnswer("UPnP URL is not http://")
        rest = url[7:]
        hostport, slash, path = rest.partition("/")
        path = slash + path if slash else "/"
        path = path.partition("#")[0]
        host, colon, port_s = hostport.partition(":")
        if "@" in hostport or not host:
            raise MalformedAnswer("UPnP URL with credentials or without a host")
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            raise MalformedAnswer("UPnP URL host is not an IPv4 address") from None
        port = 80
        if colon:
            if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
                raise MalformedAnswer("UPnP URL port is not 1..65535")
            port = int(port_s)
        return cls(addr, port, path)

    def join(self, ref: str) -> Location:
        """Resolve a URL found in a description (absolute, absolute path or relative path)."""
        ref = ref.strip()
        if not ref:
            raise MalformedAnswer("empty UPnP URL")
        if "://" in ref:
            return Location.parse(ref)
        if len(ref) > MAX_URL or not ref.isascii() or any(c in ref for c in " \r\n\t\\"):
            raise MalformedAnswer("UPnP URL too long or with forbidden characters")
        if ref.startswith("/"):
            return Location(self.host, self.port, ref)
        base = self.path.rpartition("/")[0]
        return Location(self.host, self.port, f"{base}/{ref}")

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class SearchResponse:
    location: Location
    st: str
    usn: str
    server: str


def parse_response(data: bytes) -> SearchResponse:
    """An M-SEARCH answer (or NOTIFY ssdp:alive) announcing an IGD; MalformedAnswer otherwise."""
    if len(data) > MAX_ANSWER:
        raise MalformedAnswer(f"SSDP answer of {len(data)} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedAnswer("SSDP answer is not ASCII") from None
    lines = text.split("\r\n") if "\r\n" in text else text.split("\n")
    first = lines[0].strip().upper()
    notify = first == "NOTIFY * HTTP/1.1"
    if not notify and not first.startswith(("HTTP/1.1 200", "HTTP/1.0 200")):
        raise MalformedAnswer("SSDP answer is not a 200 response")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line.strip():
            break
        name, colon, value = line.partition(":")
        if not colon:
            raise MalformedAnswer("SSDP header line without a colon")
        headers[name.strip().lower()] = value.strip()
    st = headers.get("nt" if notify else "st", "")
    if notify and headers.get("nts", "").lower() != "ssdp:alive":
        raise MalformedAnswer("SSDP NOTIFY that is not ssdp:alive")
    if "InternetGatewayDevice" not in st and "WANIPConnection" not in st \
            and "WANPPPConnection" not in st:  # fmt: skip
        raise MalformedAnswer(f"SSDP answer for {st[:80]!r}, not an internet gateway")
    if "location" not in headers:
        raise MalformedAnswer("SSDP answer without LOCATION")
    return SearchResponse(
        Location.parse(headers["location"]), st, headers.get("usn", ""), headers.get("server", "")
    )
