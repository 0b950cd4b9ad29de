"""Random bytes into every port-mapping parser and the client's receive path: typed errors only."""

from __future__ import annotations

import contextlib
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine.portmap import PortmapClient, PortmapConfig
from agent.proto.errors import RemoteProtocolError
from agent.proto.portmap import announce, igd, pcp, pmp, ssdp
from agent.proto.portmap.http import HttpExchange, HttpResponse

LOC = ssdp.Location(ipaddress.IPv4Address("10.7.0.1"), 5000, "/rootDesc.xml")
XMLISH = st.one_of(
    st.binary(max_size=600),
    st.lists(
        st.sampled_from([b"<root>", b"</root>", b"<device>", b"</device>", b"<serviceList>",
                         b"<service>", b"</service>", b"<serviceType>", igd.WANIP1.encode(),
                         b"</serviceType>", b"<controlURL>", b"/ctl", b"http://", b"</controlURL>",
                         b"<!DOCTYPE x>", b"&amp;", b"<UPnPError>", b"<errorCode>", b"718",
                         b"</errorCode>", b"<URLBase>", b"</URLBase>", b"\xff", b"<?xml?>"]),
        max_size=40,
    ).map(b"".join),
)  # fmt: skip


def _only_typed(parse: object, data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse(data)  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1300))
def test_udp_parsers(data: bytes) -> None:
    _only_typed(pmp.parse_response, data)
    _only_typed(pcp.parse_response, data)
    _only_typed(pcp.MapRequest.parse, data)
    _only_typed(pmp.MapRequest.parse, data)
    _only_typed(ssdp.parse_response, data)
    _only_typed(announce.parse_announcement, data)


@settings(max_examples=300, deadline=None)
@given(XMLISH)
def test_xml_parsers(data: bytes) -> None:
    _only_typed(lambda d: igd.parse_description(d, LOC), data)
    call = igd.get_external_ip(igd.WANIP1)
    for status in (200, 500, 404):
        _only_typed(lambda d, s=status: igd.parse_soap_response(call, HttpResponse(s, {}, d)), data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=5), st.booleans())
def test_http_exchange(chunks: list[bytes], eof: bool) -> None:
    ex = HttpExchange("GET", "10.7.0.1", 5000, "/", max_size=1000)
    ex.request_bytes()
    try:
        for c in chunks:
            ex.receive_data(c)
        if eof:
            ex.receive_eof()
        ex.response()
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=200), st.sampled_from([5351, 1900, 40000])),
                max_size=8))  # fmt: skip
def test_client_receive_path(grams: list[tuple[bytes, int]]) -> None:
    client = PortmapClient(PortmapConfig(41641))
    client.set_network("10.7.0.1", "10.7.0.2", 0.0)
    for i, (data, port) in enumerate(grams):
        with contextlib.suppress(RemoteProtocolError):
            client.receive_udp(data, ("10.7.0.1", port), float(i))
        with contextlib.suppress(RemoteProtocolError):
            client.receive_announcement(data, ("10.7.0.1", 5351), float(i) + 0.25)
        client.on_timer(float(i) + 0.5)
