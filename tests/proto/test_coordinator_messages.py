"""Coordinator wire messages and config: round trips, and every bad input named precisely."""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, DerpConfig, DerpNode, DerpRegion
from agent.coordinator.config import (
    CoordinatorConfig,
    format_duration,
    parse_coordinator_config,
    parse_duration,
)
from agent.keys import DiscoPrivate, NodePrivate
from agent.proto.coordinator_messages import (
    BadMessage,
    NetMap,
    NodeInfo,
    RegisterRequest,
    Registration,
    SealedRequest,
    UpdateRequest,
    parse_endpoint,
)

DERP = DerpConfig(
    regions=(
        DerpRegion(
            id=900,
            code="lab",
            nodes=(DerpNode(host="derp.lab", port=8443, stun_port=0, ca_file="/etc/ca.pem"),),
        ),
    )
)


def _node(i: int) -> NodeInfo:
    return NodeInfo(
        id=i,
        name=f"n{i}",
        node_key=NodePrivate.generate().public(),
        disco_key=DiscoPrivate.generate().public(),
        ipv4=IPv4Address(f"100.64.0.{i}"),
        ipv6=IPv6Address(f"fd7a:115c:a1e0::{i}"),
        endpoints=(("198.18.0.1", 41641), ("2001:db8::1", 5)),
        home_region=900 if i % 2 else None,
        key_expiry=1.8e9 if i % 2 else None,
    )


def test_netmap_and_registration_round_trip() -> None:
    netmap = NetMap(
        version=7,
        self_node=_node(1),
        peers=(_node(2), _node(3)),
        ipv4_range=IPv4Network("100.64.0.0/10"),
        ipv6_range=IPv6Network("fd7a:115c:a1e0::/48"),
        derp=DERP,
    )
    assert NetMap.parse(netmap.encode()) == netmap
    assert [str(a) for a in netmap.addresses()] == ["100.64.0.1/10", "fd7a:115c:a1e0::1/48"]
    assert [str(n) for n in netmap.peers[0].allowed_ips()] == [
        "100.64.0.2/32",
        "fd7a:115c:a1e0::2/128",
    ]
    reg = Registration(_node(4), "t" * 64, netmap.ipv4_range, netmap.ipv6_range, DERP)
    assert Registration.parse(reg.encode()) == reg
    req = RegisterRequest("k", _node(1).disco_key, "h", (("::1", 1),), None, 12.5)
    assert RegisterRequest.parse(req.encode()) == req
    upd = UpdateRequest(_node(1).disco_key, (), 5)
    assert UpdateRequest.parse(upd.encode()) == upd


_KEY = b'"disco_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="'


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[]", "expected a JSON object"),
        (b"{", "not JSON"),
        (b"\xff", "not JSON"),
        (b'{"endpoints": [], "home_region": null}', "disco_key: missing"),
        (b'{"disco_key": "abc", "endpoints": [], "home_region": null}', "disco_key: not valid"),
        (
            b"{" + _KEY + b', "endpoints": ["1.2.3.4"], "home_region": null}',
            "endpoints[0]",
        ),
        (
            b"{" + _KEY + b', "endpoints": ["::1:5"], "home_region": null}',
            "write an IPv6 endpoint as [address]:port",
        ),
        (
            b"{" + _KEY + b', "endpoints": [], "home_region": 0}',
            "home_region: region 0 out of range",
        ),
        (
            b"{" + _KEY + b', "endpoints": [], "home_region": true}',
            "home_region: expected a number",
        ),
    ],
)
def test_bad_update_named(body: bytes, problem: str) -> None:
    with pytest.raises(BadMessage, match=problem.replace("[", r"\[").replace("]", r"\]")):
        UpdateRequest.parse(body)


def test_too_many_endpoints() -> None:
    upd = UpdateRequest(DiscoPrivate.generate().public(), (), None).encode()
    many = upd.replace(
        b'"endpoints":[]', b'"endpoints":[%s]' % b",".join(b'"10.0.0.%d:1"' % i for i in range(40))
    )
    with pytest.raises(BadMessage, match="more than 32"):
        UpdateRequest.parse(many)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.from_regex(rb'\{"[a-z_]{1,10}": ?[0-9a-z"\[\]{}, .:]{0,40}\}'))
def test_parsers_raise_only_bad_message(data: bytes) -> None:
    for parse in (
        NetMap.parse,
        Registration.parse,
        RegisterRequest.parse,
        SealedRequest.parse,
        UpdateRequest.parse,
    ):
        with contextlib.suppress(BadMessage):
            parse(data)  # anything else (another RemoteProtocolError too) fails the test


def test_parse_endpoint() -> None:
    assert parse_endpoint("198.18.0.1:41641") == ("198.18.0.1", 41641)
    assert parse_endpoint("[2001:db8::1]:5") == ("2001:db8::1", 5)
    for bad in ("host:1", "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.4", "[::1]:x"):
        with pytest.raises(ValueError, match=r"IP|not"):
            parse_endpoint(bad)


# -- config ----------------------------------------------------------------------------------------


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("1h30m") == 5400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("0") == 0
    assert format_duration(86400) == "1d"
    for bad in ("", "1", "3x", "h", "-1h"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_config_defaults_and_full(tmp_path: Path) -> None:
    assert parse_coordinator_config("") == CoordinatorConfig()
    cfg = parse_coordinator_config(
        """
        [coordinator]
        listen = "[::1]:9443"
        hostname = "coord.lab"
        database = "state/c.db"
        node_key_expiry = "0"
        [tls]
        mode = "manual"
        cert_dir = "certs"
        [addresses]
        ipv4 = "100.100.0.0/16"
        ipv6 = "fd00:1::/64"
        [[derp.regions]]
        id = 900
        code = "lab"
        nodes = [{ host = "derp.lab", port = 8443, stun_port = 0, ca_file = "/etc/ca.pem" }]
        """,
        base_dir=tmp_path,
    )
    assert cfg.listen == ("::1", 9443)
    assert cfg.database == str(tmp_path / "state/c.db")
    assert cfg.cert_dir == str(tmp_path / "certs")
    assert cfg.node_key_expiry is None
    assert cfg.tls_mode == "manual"
    assert cfg.ipv4_range == IPv4Network("100.100.0.0/16")
    assert cfg.derp == DERP
    url = "postgresql://coord@db.lab/coordinator"
    assert parse_coordinator_config(f'[coordinator]\ndatabase = "{url}"').database == url


def test_config_problems_name_their_keys() -> None:
    with pytest.raises(ConfigError) as err:
        parse_coordinator_config(
            """
            [coordinator]
            listen = "nowhere"
            node_key_expiry = "3x"
            database = "mysql://x"
            colour = "blue"
            [tls]
            mode = "acme"
            [addresses]
            ipv4 = "fd00::/64"
            ipv6 = "fd00::/120"
            [derp]
            home_region = 900
            """
        )
    problems = "\n".join(err.value.problems)
    for expected in (
        "coordinator.listen: 'nowhere' is not HOST:PORT",
        "coordinator.node_key_expiry: '3x' is not a duration",
        "coordinator.database: 'mysql' databases are not supported",
        "coordinator.colour: unknown key",
        "tls.mode: 'acme' is not self-signed or manual",
        "addresses.ipv4: fd00::/64 is not an IPv4 prefix",
        "addresses.ipv6: fd00::/120 has fewer addresses than addresses.ipv4",
        "derp.home_region: not used here",
    ):
        assert expected in problems
