"""Our own endpoints by source: port mapping first, then STUN, then local addresses."""

from __future__ import annotations

from agent.engine.local_endpoints import EndpointSource, gather


def test_order_and_sources() -> None:
    found = gather(
        {
            EndpointSource.LOCAL: [("10.0.0.2", 41641)],
            EndpointSource.STUN: [("198.18.1.1", 61000), ("198.18.1.1", 61001)],
            EndpointSource.PORTMAP: [("198.18.1.1", 41641)],
        }
    )
    assert found == [
        (("198.18.1.1", 41641), EndpointSource.PORTMAP),
        (("198.18.1.1", 61000), EndpointSource.STUN),
        (("198.18.1.1", 61001), EndpointSource.STUN),
        (("10.0.0.2", 41641), EndpointSource.LOCAL),
    ]


def test_an_endpoint_found_twice_keeps_its_first_source() -> None:
    # A full-cone router that mapped our port: STUN sees the same endpoint.
    ep = ("198.18.1.1", 41641)
    found = gather({EndpointSource.STUN: [ep], EndpointSource.PORTMAP: [ep]})
    assert found == [(ep, EndpointSource.PORTMAP)]


def test_nothing_found() -> None:
    assert gather({}) == []
