"""PathTable: which path a peer's datagrams take (direct, DERP, or both while unproven)."""

from __future__ import annotations

from agent.engine.paths import (
    DERP_MAGIC_IP,
    TRUST_UDP,
    PathStatus,
    PathTable,
    Targets,
    derp_endpoint,
    derp_region_of,
)
from agent.keys import NodePrivate

KEY = NodePrivate.generate().public()
OTHER = NodePrivate.generate().public()
EP = ("198.18.0.2", 41641)


def test_derp_pseudo_endpoints() -> None:
    assert derp_endpoint(900) == (DERP_MAGIC_IP, 900)
    assert derp_region_of(derp_endpoint(7)) == 7
    assert derp_region_of(EP) is None
    assert derp_region_of(None) is None


def test_unknown_peer_has_no_target() -> None:
    table = PathTable(900)
    assert table.targets(KEY, 0.0) == Targets()
    assert table.status(KEY, 0.0) == PathStatus("none", None, None)
    table.on_receive(KEY, EP, 0.0)  # ignored: not a peer of ours
    assert not table.has_peer(KEY)


def test_plain_wireguard_peer_uses_its_endpoint_only() -> None:
    table = PathTable(None)
    table.add_peer(KEY, endpoint=EP)
    assert table.targets(KEY, 0.0) == Targets(udp=EP)
    assert table.status(KEY, 0.0) == PathStatus("none", EP, None)
    table.on_receive(KEY, EP, 1.0)
    assert table.status(KEY, 1.0) == PathStatus("direct", EP, None)


def test_unproven_direct_path_sends_both_then_direct_once_heard() -> None:
    table = PathTable(900)
    table.add_peer(KEY, endpoint=EP, derp_region=901)
    assert table.targets(KEY, 0.0) == Targets(udp=EP, derp=901)
    assert table.status(KEY, 0.0).path == "derp"
    table.on_receive(KEY, EP, 10.0)
    assert table.targets(KEY, 10.0) == Targets(udp=EP)
    assert table.status(KEY, 10.0) == PathStatus("direct", EP, 901)
    # silence on the direct path for the trust window: both again, the relay carries traffic
    assert table.targets(KEY, 10.0 + TRUST_UDP - 0.01) == Targets(udp=EP)
    assert table.targets(KEY, 10.0 + TRUST_UDP) == Targets(udp=EP, derp=901)


def test_region_is_arrival_then_configured_then_home() -> None:
    table = PathTable(900)
    table.add_peer(KEY)
    assert table.targets(KEY, 0.0) == Targets(derp=900)
    table.add_peer(OTHER, derp_region=901)
    assert table.targets(OTHER, 0.0) == Targets(derp=901)
    table.on_receive(OTHER, derp_endpoint(902), 1.0)  # replies go where packets came from
    assert table.targets(OTHER, 1.0) == Targets(derp=902)
    assert table.status(OTHER, 1.0) == PathStatus("derp", None, 902)


def test_roaming_moves_the_direct_endpoint() -> None:
    table = PathTable(None)
    table.add_peer(KEY, endpoint=EP)
    table.on_receive(KEY, ("198.18.5.5", 1234), 0.0)
    assert table.targets(KEY, 0.0) == Targets(udp=("198.18.5.5", 1234))


def test_set_endpoint_resets_trust_and_remove_forgets() -> None:
    table = PathTable(900)
    table.add_peer(KEY, endpoint=EP)
    table.on_receive(KEY, EP, 0.0)
    table.set_endpoint(KEY, ("198.18.9.9", 1))
    assert table.targets(KEY, 0.0) == Targets(udp=("198.18.9.9", 1), derp=900)
    table.remove_peer(KEY)
    assert table.targets(KEY, 0.0) == Targets()


def test_status_if_added_is_what_adding_gives_and_adds_nothing() -> None:
    """A peer `wg set` added and nothing used yet: `agent status` shows the path its first use
    gives it, without creating the entry."""
    for home in (None, 900):
        table = PathTable(home)
        for endpoint in (EP, None, derp_endpoint(7)):
            shown = table.status_if_added(endpoint, 5.0)
            assert not table.has_peer(KEY)
            table.add_peer(KEY, endpoint=endpoint if derp_region_of(endpoint) is None else None)
            assert table.status(KEY, 5.0) == shown
            table.remove_peer(KEY)
