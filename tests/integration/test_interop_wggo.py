"""Our agent against Debian's wireguard-go: both directions, with and without a preshared key,
each side as the initiator, and recovery after wireguard-go restarts (losing every session).

ns agt-<hex>-a                                  ns agt-<hex>-b
+---------------------------+                   +---------------------------+
| agent  ag<hex>N           |                   | wireguard-go  wg<hex>M    |
| 100.64.0.1/32             |  WireGuard / UDP  | 100.64.0.2/32             |
| fd7a:115c:a1e0::1/128     | <---------------> | fd7a:115c:a1e0::2/128     |
| udp :41641                |                   | udp :51820                |
| veth0  198.18.0.1/24      |-------------------| veth0  198.18.0.2/24      |
+---------------------------+                   +---------------------------+

The first side to ping initiates the handshake (both know the other's endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from .lab import Agent, Lab, Peer, WgGo, gen_psk, keypair, ping, ping_until

pytestmark = [pytest.mark.netns, pytest.mark.interop]

A4, B4 = "100.64.0.1", "100.64.0.2"
A6, B6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
PORT_AGENT, PORT_WGGO = 41641, 51820
# REKEY_TIMEOUT (5 s) + KEEPALIVE_TIMEOUT (10 s) + jitter: when data gets no answer, the sender
# starts a new handshake after ~15 s. Leave margin for a slow machine.
RECOVERY_WITHIN = 25.0


@dataclass
class Mixed:
    lab: Lab
    ns_agent: str
    ns_wggo: str
    agent: Agent
    wggo: WgGo


def build(lab: Lab, *, psk: bool, dataplane: str | None = None) -> Mixed:
    ns_a, ns_b = lab.add_ns("a"), lab.add_ns("b")
    ip_a, ip_b = lab.link(ns_a, ns_b)
    (priv_a, pub_a), (priv_b, pub_b) = keypair(), keypair()
    shared = gen_psk() if psk else None
    wggo = WgGo(
        lab, ns_b, private_key=priv_b, addresses=[f"{B4}/32", f"{B6}/128"], listen_port=PORT_WGGO
    )
    wggo.add_peer(
        Peer("a", pub_a, (f"{A4}/32", f"{A6}/128"), f"{ip_a}:{PORT_AGENT}", preshared_key=shared)
    )
    agent = Agent(
        lab,
        ns_a,
        private_key=priv_a,
        addresses=[f"{A4}/32", f"{A6}/128"],
        listen_port=PORT_AGENT,
        peers=[Peer("b", pub_b, (f"{B4}/32", f"{B6}/128"), f"{ip_b}:{PORT_WGGO}", shared)],
        dataplane=dataplane,
    )
    wggo.start()
    agent.start()
    return Mixed(lab, ns_a, ns_b, agent, wggo)


@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
@pytest.mark.parametrize("initiator", ["agent", "wireguard-go"])
@pytest.mark.parametrize("dataplane", ["native", "python"])
def test_ping_both_ways(lab: Lab, psk: bool, initiator: str, dataplane: str) -> None:
    if dataplane == "native":
        pytest.importorskip("agent._fastpath", reason="the compiled module is not built")
    m = build(lab, psk=psk, dataplane=dataplane)
    from_agent = [(m.ns_agent, B4), (m.ns_agent, B6)]
    from_wggo = [(m.ns_wggo, A4), (m.ns_wggo, A6)]
    order = from_agent + from_wggo if initiator == "agent" else from_wggo + from_agent
    for ns, addr in order:
        assert ping(ns, addr), f"ping {addr} from {ns} failed\n{lab.logs()}"
    assert m.wggo.latest_handshake(m.agent.public_key) > 0
    peer = m.agent.peer_status(m.wggo.public_key)
    assert peer["latest_handshake"] > 0, peer
    assert peer["rx_bytes"] > 0, peer
    assert peer["tx_bytes"] > 0, peer
    m.agent.stop()


@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
def test_session_comes_back_after_wireguard_go_restarts(lab: Lab, psk: bool) -> None:
    m = build(lab, psk=psk)
    assert ping(m.ns_agent, B4), lab.logs()
    m.wggo.restart()  # new process: no sessions, the agent still holds its old keypair
    took = ping_until(m.ns_agent, B4, within=RECOVERY_WITHIN)
    assert took is not None, f"no reply within {RECOVERY_WITHIN}s after the restart\n{lab.logs()}"
    assert ping(m.ns_wggo, A4), lab.logs()
    m.agent.stop()
