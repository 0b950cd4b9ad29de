"""NAT-PMP, PCP, SSDP and UPnP IGD codecs: golden bytes, round trips and hostile answers."""

from __future__ import annotations

import ipaddress

import pytest

from agent.proto.errors import LocalProtocolError, RemoteProtocolError
from agent.proto.portmap import announce, igd, pcp, pmp, ssdp
from agent.proto.portmap.epoch import EpochTracker
from agent.proto.portmap.errors import MalformedAnswer, RouterRefused, UpnpFault
from agent.proto.portmap.http import HttpExchange, HttpResponse

V4 = ipaddress.IPv4Address

# --- NAT-PMP (RFC 6886) ---------------------------------------------------------------------


def test_pmp_requests_golden() -> None:
    assert pmp.ExternalAddressRequest().encode() == b"\x00\x00"
    assert pmp.MapRequest(41641, 41641, 7200).encode() == bytes.fromhex("00010000a2a9a2a900001c20")
    assert pmp.MapRequest(41641, 0, 0).encode() == bytes.fromhex("00010000a2a9000000000000")


def test_pmp_responses_parse() -> None:
    addr = bytes.fromhex("0080000000000e10c6120701")
    msg = pmp.parse_response(addr)
    assert msg == pmp.ExternalAddressResponse(0, 3600, V4("198.18.7.1"))
    mapped = bytes.fromhex("0081000000000e10a2a9c35000001c20")
    assert pmp.parse_response(mapped) == pmp.MapResponse(0, 3600, 41641, 50000, 7200)
    assert pmp.parse_response(mapped + b"\x00" * 4) == pmp.MapResponse(0, 3600, 41641, 50000, 7200)
    for m in (msg, pmp.MapResponse(2, 1, 2, 3, 4)):
        assert pmp.parse_response(m.encode()) == m


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x02\x80\x00\x00" + b"\x00" * 8, b"\x00\x81\x00\x00" + b"\x00" * 4,
     b"\x00\x05\x00\x00", b"\x00\x80" + b"\x00" * 2000],
)  # fmt: skip
def test_pmp_garbage_is_typed(data: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        pmp.parse_response(data)


def test_pmp_unsupported_version_answer() -> None:
    assert pmp.parse_response(bytes.fromhex("0081000100000000")) == pmp.UnsupportedVersion(1)


def test_pmp_request_checks_its_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        pmp.MapRequest(0, 1, 1)
    with pytest.raises(LocalProtocolError):
        pmp.MapRequest(1, 70000, 1)


# --- PCP (RFC 6887) -------------------------------------------------------------------------

NONCE = bytes(range(12))
CLIENT = V4("10.7.0.2")


def test_pcp_map_request_golden() -> None:
    req = pcp.MapRequest(CLIENT, NONCE, 41641, 7200, 41641, V4("198.18.7.1"))
    data = req.encode()
    assert len(data) == 60
    assert data[:4] == bytes.fromhex("02010000")
    assert data[4:8] == (7200).to_bytes(4, "big")
    assert data[8:24] == b"\x00" * 10 + b"\xff\xff" + CLIENT.packed
    assert data[24:36] == NONCE
    assert data[36] == 17
    assert data[40:44] == bytes.fromhex("a2a9a2a9")
    assert data[44:60] == b"\x00" * 10 + b"\xff\xff" + V4("198.18.7.1").packed
    assert pcp.MapRequest.parse(data) == req
    assert pcp.AnnounceRequest(CLIENT).encode()[:8] == bytes.fromhex("0200000000000000")


def test_pcp_responses_round_trip() -> None:
    resp = pcp.MapResponse(0, 3600, 77, NONCE, 17, 41641, 50000, V4("198.18.7.1"))
    assert pcp.parse_response(resp.encode()) == resp
    ann = pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, 12)
    assert pcp.parse_response(ann.encode()) == ann
    err = pcp.Response(pcp.Opcode.MAP, pcp.ResultCode.NOT_AUTHORIZED, 30, 12)
    assert pcp.parse_response(err.encode()) == err
    assert pcp.parse_response(bytes.fromhex("0081000100000000")) == pcp.VersionMismatch(1)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x02", b"\x02\x81" + b"\x00" * 21, b"\x01" + b"\x00" * 23, b"\x02\x01" + b"\x00" * 58,
     b"\x02\x81\x00\x00" + b"\x00" * 20, b"\x02\x81" + b"\x00" * 1200,
     pcp.MapResponse(0, 1, 1, NONCE, 17, 1, 0, None).encode(),
     pcp.MapResponse(0, 1, 1, NONCE, 17, 1, 0, None).encode()[:-4]],
)  # fmt: skip
def test_pcp_garbage_is_typed(data: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        pcp.parse_response(data)


def test_pcp_nonce_size_is_checked() -> None:
    with pytest.raises(LocalProtocolError):
        pcp.MapRequest(CLIENT, b"short", 1, 1)


# --- epoch (RFC 6887 §8.5) ------------------------------------------------------------------


# --- announcements on 224.0.0.1:5350 ---------------------------------------------------------

# miniupnpd's PCP unsolicited ANNOUNCE: version 2, R|opcode 0, result 0, lifetime 0, epoch 3
PCP_ANNOUNCE = bytes.fromhex("028000000000000000000003") + bytes(12)


def test_announcements_golden() -> None:
    assert announce.parse_announcement(PCP_ANNOUNCE) == announce.Announcement("pcp", 3)
    pmp_addr = bytes.fromhex("0080000000000005c6120701")  # epoch 5, 198.18.7.1
    assert announce.parse_announcement(pmp_addr) == announce.Announcement(
        "pmp", 5, V4("198.18.7.1")
    )
    assert (announce.MULTICAST_ADDR, announce.PORT) == ("224.0.0.1", 5350)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        bytes.fromhex("0080000200000005c6120701"),  # NAT-PMP address answer with an error
        pmp.MapResponse(0, 5, 41641, 50000, 7200).encode(),  # a map answer
        pmp.ExternalAddressRequest().encode(),  # a request
        bytes.fromhex("02800008000000000000000300") + bytes(11),  # PCP ANNOUNCE, result 8
        pcp.Response(pcp.Opcode.MAP, 2, 0, 3).encode(),  # another opcode
        pcp.AnnounceRequest(V4("10.0.1.2")).encode(),  # a request
        PCP_ANNOUNCE[:-4],  # short
        PCP_ANNOUNCE + bytes(1100),  # long
        b"\x01" + PCP_ANNOUNCE[1:],  # unknown version
        b"M-SEARCH * HTTP/1.1\r\n\r\n",
    ],
)
def test_announcement_garbage_is_typed(data: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        announce.parse_announcement(data)


def test_epoch_tracker() -> None:
    t = EpochTracker()
    assert not t.observe(1000, 0.0)
    assert not t.observe(1060, 60.0)  # in step
    assert not t.observe(1119, 120.0)  # a second of slack is fine
    assert t.observe(5, 121.0)  # backwards: the router restarted
    assert not t.observe(65, 181.0)
    assert t.observe(70, 400.0)  # far too slow: it restarted while we were not looking


# --- SSDP -----------------------------------------------------------------------------------

MINIUPNPD_SSDP = (
    b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b::"
    b"urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"EXT:\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://10.7.0.1:5000/rootDesc.xml\r\n\r\n"
)


def test_ssdp_search_and_answer() -> None:
    search = ssdp.m_search()
    assert search.startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert b'MAN: "ssdp:discover"' in search
    assert search.endswith(b"\r\n\r\n")
    resp = ssdp.parse_response(MINIUPNPD_SSDP)
    assert resp.location == ssdp.Location(V4("10.7.0.1"), 5000, "/rootDesc.xml")
    assert "MiniUPnPd" in resp.server


@pytest.mark.parametrize(
    "data",
    [b"", b"HTTP/1.1 404 Not Found\r\n\r\n", MINIUPNPD_SSDP.replace(b"10.7.0.1", b"router.lan"),
     MINIUPNPD_SSDP.replace(b"http://", b"file://"),
     MINIUPNPD_SSDP.replace(b"InternetGateway", b"Media"),
     MINIUPNPD_SSDP.replace(b"LOCATION", b"X-LOC"), b"\xff" * 10, b"HTTP/1.1 200 OK\r\n" * 200,
     MINIUPNPD_SSDP.replace(b"10.7.0.1:5000", b"user@10.7.0.1:5000"),
     MINIUPNPD_SSDP.replace(b":5000", b":99999")],
)  # fmt: skip
def test_ssdp_garbage_is_typed(data: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        ssdp.parse_response(data)


def test_location_join() -> None:
    base = ssdp.Location.parse("http://10.7.0.1:5000/dev/rootDesc.xml")
    assert base.join("/ctl/IPConn").path == "/ctl/IPConn"
    assert base.join("ctl/IPConn").path == "/dev/ctl/IPConn"
    assert base.join("http://10.9.9.9/x").host == V4("10.9.9.9")


# --- IGD description and SOAP --------------------------------------------------------------

LOC = ssdp.Location(V4("10.7.0.1"), 5000, "/rootDesc.xml")


def _desc(service: str, control: str = "/ctl/IPConn", extra: str = "") -> bytes:
    return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">{extra}
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<UDN>uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b</UDN>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service><serviceType>{service}</serviceType>
<controlURL>{control}</controlURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>""".encode()


@pytest.mark.parametrize("service", [igd.WANIP1, igd.WANIP2, igd.WANPPP1])
def test_description_finds_the_wan_service(service: str) -> None:
    svc = igd.parse_description(_desc(service), LOC)
    assert svc.service_type == service
    assert svc.control == ssdp.Location(V4("10.7.0.1"), 5000, "/ctl/IPConn")
    assert svc.version == (2 if service == igd.WANIP2 else 1)
    assert svc.udn.startswith("uuid:")


@pytest.mark.parametrize(
    "data",
    [b"", b"<root", b"<notroot/>", _desc("urn:schemas-upnp-org:service:Layer3Forwarding:1"),
     _desc(igd.WANIP1, control="http://10.9.9.9/ctl"),  # another host: refused
     b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><root>&a;</root>',
     b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><root>&x;</root>',
     b"<root>" + b"<a/>" * 5000 + b"</root>", b"<root>" + b" " * 200_000 + b"</root>"],
)  # fmt: skip
def test_description_garbage_is_typed(data: bytes) -> None:
    with pytest.raises(MalformedAnswer):
        igd.parse_description(data, LOC)


def test_soap_request_and_answers() -> None:
    call = igd.add_port_mapping(igd.WANIP1, 41641, 41641, V4("10.7.0.2"), 7200, "a <b>")
    body = call.body()
    assert b'<u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">' in body
    assert b"<NewInternalClient>10.7.0.2</NewInternalClient>" in body
    assert b"<NewPortMappingDescription>a &lt;b&gt;</NewPortMappingDescription>" in body
    assert ("SOAPAction", f'"{igd.WANIP1}#AddPortMapping"') in call.headers()

    ok = HttpResponse(200, {}, b'<s:Envelope xmlns:s="x"><s:Body><u:GetExternalIPAddressResponse '
                      b'xmlns:u="y"><NewExternalIPAddress>198.18.7.1</NewExternalIPAddress>'
                      b"</u:GetExternalIPAddressResponse></s:Body></s:Envelope>")  # fmt: skip
    out = igd.parse_soap_response(igd.get_external_ip(igd.WANIP1), ok)
    assert igd.parse_external_ip(out) == V4("198.18.7.1")

    fault = HttpResponse(500, {}, b'<s:Envelope xmlns:s="x"><s:Body><s:Fault><detail><UPnPError '
                         b'xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>'
                         b"<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError>"
                         b"</detail></s:Fault></s:Body></s:Envelope>")  # fmt: skip
    with pytest.raises(UpnpFault) as info:
        igd.parse_soap_response(call, fault)
    assert info.value.code == igd.ERR_CONFLICT
    with pytest.raises(RouterRefused):
        igd.parse_soap_response(call, HttpResponse(404, {}, b""))
    with pytest.raises(MalformedAnswer):
        igd.parse_soap_response(call, HttpResponse(200, {}, b"<x/>"))
    with pytest.raises(MalformedAnswer):
        igd.parse_reserved_port({"NewReservedPort": "0"})
    entry = igd.parse_port_mapping_entry(
        {"NewInternalPort": "41641", "NewInternalClient": "10.7.0.2", "NewLeaseDuration": "30"}
    )
    assert entry == igd.PortMappingEntry(41641, "10.7.0.2", True, 30)


# --- HTTP exchange --------------------------------------------------------------------------


def test_http_exchange() -> None:
    ex = HttpExchange("GET", "10.7.0.1", 5000, "/rootDesc.xml")
    req = ex.request_bytes()
    assert req.startswith(b"GET /rootDesc.xml HTTP/1.1\r\n")
    assert b"host: 10.7.0.1:5000" in req.lower()
    assert not ex.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    assert ex.receive_data(b"cde")
    assert ex.response() == HttpResponse(200, {"content-length": "5"}, b"abcde")

    ex2 = HttpExchange("GET", "10.7.0.1", 80, "/")
    ex2.request_bytes()
    ex2.receive_data(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    assert ex2.receive_eof()
    assert ex2.response().body == b"until close"


def test_http_exchange_bounds_and_garbage() -> None:
    ex = HttpExchange("GET", "10.7.0.1", 80, "/", max_size=100)
    ex.request_bytes()
    with pytest.raises(MalformedAnswer):
        ex.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + b"x" * 200)
    bad = HttpExchange("GET", "10.7.0.1", 80, "/")
    bad.request_bytes()
    with pytest.raises(RemoteProtocolError):
        bad.receive_data(b"NOT HTTP AT ALL\r\n\r\n")
    short = HttpExchange("GET", "10.7.0.1", 80, "/")
    short.request_bytes()
    short.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nabc")
    with pytest.raises(RemoteProtocolError):
        short.receive_eof()
