"""Two of our agents in two namespaces: overlay ping (v4 and v6), status, iperf3, clean shutdown.

ns agt-<hex>-a                                  ns agt-<hex>-b
+---------------------------+                   +---------------------------+
| agent  ag<hex>N           |                   | agent  ag<hex>M           |
| 100.64.0.1/32             |  WireGuard / UDP  | 100.64.0.2/32             |
| fd7a:115c:a1e0::1/128     | <---------------> | fd7a:115c:a1e0::2/128     |
| udp :41641                |                   | udp :41642                |
| veth0  198.18.0.1/24      |-------------------| veth0  198.18.0.2/24      |
+---------------------------+                   +---------------------------+
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

import pytest

from .lab import Agent, Lab, Peer, iperf3, keypair, ping

pytestmark = pytest.mark.netns

A4, B4 = "100.64.0.1", "100.64.0.2"
A6, B6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
PORT_A, PORT_B = 41641, 41642


@dataclass
class Pair:
    ns_a: str
    ns_b: str
    a: Agent
    b: Agent
    dataplane: str


@pytest.fixture(params=["native", "python"])
def pair(lab: Lab, request: pytest.FixtureRequest) -> Pair:
    """Two agents, both with the compiled data plane or both with its Python twin."""
    dataplane: str = request.param
    if dataplane == "native":
        pytest.importorskip("agent._fastpath", reason="the compiled module is not built")
    ns_a, ns_b = lab.add_ns("a"), lab.add_ns("b")
    ip_a, ip_b = lab.link(ns_a, ns_b)
    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    a = Agent(
        lab,
        ns_a,
        private_key=priv_a,
        addresses=[f"{A4}/32", f"{A6}/128"],
        listen_port=PORT_A,
        peers=[Peer("b", pub_b, (f"{B4}/32", f"{B6}/128"), endpoint=f"{ip_b}:{PORT_B}")],
        dataplane=dataplane,
    )
    b = Agent(
        lab,
        ns_b,
        private_key=priv_b,
        addresses=[f"{B4}/32", f"{B6}/128"],
        listen_port=PORT_B,
        peers=[Peer("a", pub_a, (f"{A4}/32", f"{A6}/128"), endpoint=f"{ip_a}:{PORT_A}")],
        dataplane=dataplane,
    )
    a.start()
    b.start()
    return Pair(ns_a, ns_b, a, b, dataplane)


def test_ping_v4_and_v6_both_ways(pair: Pair, lab: Lab) -> None:
    assert ping(pair.ns_a, B4), f"a -> b v4 failed\n{lab.logs()}"
    assert ping(pair.ns_b, A4), f"b -> a v4 failed\n{lab.logs()}"
    assert ping(pair.ns_a, B6), f"a -> b v6 failed\n{lab.logs()}"
    assert ping(pair.ns_b, A6), f"b -> a v6 failed\n{lab.logs()}"


def test_interface_has_the_default_mtu_and_transmit_queue(pair: Pair) -> None:
    out = subprocess.run(
        ["ip", "-j", "-n", pair.ns_a, "link", "show", pair.a.ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (link,) = json.loads(out)
    assert (link["mtu"], link["txqlen"]) == (1280, 2000), link


def test_status_shows_handshake_and_bytes(pair: Pair, lab: Lab) -> None:
    before = time.time()
    assert ping(pair.ns_a, B4), lab.logs()
    for agent, other in ((pair.a, pair.b), (pair.b, pair.a)):
        status = agent.status()
        assert status["interface"] == agent.ifname
        assert status["public_key"] == agent.public_key
        assert status["listen_port"] == agent.listen_port
        assert status["dataplane"]["impl"] == pair.dataplane, status["dataplane"]
        assert status["dataplane"]["impl_reason"] == ""
        peer = agent.peer_status(other.public_key)
        # whole seconds (Unix time), like `wg show`: allow for truncation and a slow start
        assert before - 60 <= peer["latest_handshake"] <= time.time() + 1, peer
        assert peer["rx_bytes"] > 0, peer
        assert peer["tx_bytes"] > 0, peer


def test_a_known_peer_s_packets_take_the_lanes(pair: Pair, lab: Lab) -> None:
    """After the first packets (the Python path arms the lanes), pings go read-seal-send and
    receive-open-write in one compiled call each way, on both agents, read by the lanes' own
    thread; the Python data plane is the reference path and has neither."""
    assert ping(pair.ns_a, B4), lab.logs()
    if pair.dataplane == "python":
        dp = pair.a.status()["dataplane"]
        assert dp["lane_tx_packets"] == dp["pump_batches"] == 0
        return
    before = {agent: agent.status()["dataplane"] for agent in (pair.a, pair.b)}
    assert ping(pair.ns_a, B4, count=5), lab.logs()
    for agent in (pair.a, pair.b):
        dp = agent.status()["dataplane"]
        sent = dp["lane_tx_packets"] - before[agent]["lane_tx_packets"]
        got = dp["lane_rx_packets"] - before[agent]["lane_rx_packets"]
        assert sent >= 5, (agent.ifname, dp)
        assert got >= 5, (agent.ifname, dp)
        assert dp["pump_batches"] > before[agent]["pump_batches"], (agent.ifname, dp)


def test_iperf3_tcp_through_the_tunnel(pair: Pair) -> None:
    result = iperf3(pair.ns_b, pair.ns_a, B4, seconds=3)
    end = result["end"]
    assert "error" not in result
    assert end["sum_received"]["bytes"] > 0
    # TCP delivered at least a little: a stuck tunnel shows up as ~0 bit/s, not as an error
    assert end["sum_received"]["bits_per_second"] > 1e6, end["sum_received"]
    # The metrics count what iperf3 moved: WireGuard wire bytes = payload + TCP/IP headers
    # (52 B) + WireGuard header and tag (32 B) per ~1368 B segment, plus ACKs the other way.
    text = pair.a.cli("metrics").stdout
    tx = _metric(text, "agent_peer_tx_bytes_total", 'peer="b"')
    rx = _metric(text, "agent_peer_rx_bytes_total", 'peer="b"')
    sent = end["sum_sent"]["bytes"]
    assert sent <= tx <= sent * 1.12 + 1_000_000, (sent, tx)
    assert 0 < rx < tx / 10  # ACKs only
    assert _metric(text, "agent_peer_handshakes_total", 'peer="b"') >= 1


def _metric(text: str, name: str, label: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} with {label} not in metrics:\n{text}")


def test_sigterm_exits_zero_and_removes_the_interface(pair: Pair, lab: Lab) -> None:
    assert ping(pair.ns_a, B4), lab.logs()
    pair.a.stop()  # asserts exit status 0 and that the interface is gone
    pair.b.stop()


def test_stock_wg_show_and_set_work_on_our_interface(pair: Pair, lab: Lab) -> None:
    """The daemon serves WireGuard's UAPI: Debian's `wg` reads and changes it."""
    import shutil

    if shutil.which("wg") is None:
        pytest.skip("wg missing: apt-get install wireguard-tools")
    assert ping(pair.ns_a, B4, count=1, timeout=10)
    dump = lab.run(pair.ns_a, "wg", "show", pair.a.ifname, "dump").stdout
    lines = [line.split("\t") for line in dump.strip().splitlines()]
    # `wg show IFACE dump`: private, public, port, fwmark / per peer: public, psk, endpoint,
    # allowed ips, latest handshake, rx, tx, keepalive
    assert lines[0][2] == str(PORT_A)
    peer = lines[1]
    assert peer[3] == f"{B4}/32,{B6}/128"
    assert int(peer[4]) > 0
    assert int(peer[5]) > 0
    assert int(peer[6]) > 0
    lab.run(pair.ns_a, "wg", "set", pair.a.ifname, "peer", peer[0], "persistent-keepalive", "7")
    assert pair.a.peer_status(peer[0])["persistent_keepalive"] == 7
    # `wg showconf` prints a config wg-quick could load, with our peer in it
    conf = lab.run(pair.ns_a, "wg", "showconf", pair.a.ifname).stdout
    assert f"ListenPort = {PORT_A}" in conf
    assert f"PublicKey = {peer[0]}" in conf
    assert "PersistentKeepalive = 7" in conf
    # removing the peer with `wg set` takes effect live: no more route to it, and nothing it
    # sends gets in any more, not even on the lane its session had
    assert ping(pair.ns_b, A4, count=1, timeout=10)
    lab.run(pair.ns_a, "wg", "set", pair.a.ifname, "peer", peer[0], "remove")
    assert pair.a.status()["peers"] == []
    before = pair.a.status()["dataplane"]
    assert not ping(pair.ns_a, B4, count=1, timeout=2)
    assert not ping(pair.ns_b, A4, count=2, timeout=2)
    after = pair.a.status()["dataplane"]
    assert after["rx_packets"] == before["rx_packets"], (before, after)
    assert lab.run(pair.ns_a, "wg", "show", pair.a.ifname, "peers").stdout.strip() == ""
