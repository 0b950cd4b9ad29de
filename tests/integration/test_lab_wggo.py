"""The lab itself works: two Debian wireguard-go peers in two namespaces ping each other.

ns agt-<hex>-a                                  ns agt-<hex>-b
+---------------------------+                   +---------------------------+
| wireguard-go  wg<hex>N    |                   | wireguard-go  wg<hex>M    |
| 100.64.0.1/32             |  WireGuard / UDP  | 100.64.0.2/32             |
| fd7a:115c:a1e0::1/128     | <---------------> | fd7a:115c:a1e0::2/128     |
| udp :51820                |                   | udp :51821                |
| veth0  198.18.0.1/24      |-------------------| veth0  198.18.0.2/24      |
+---------------------------+                   +---------------------------+
"""

from __future__ import annotations

import pytest

from .lab import Lab, Peer, WgGo, keypair, ping

pytestmark = [pytest.mark.netns, pytest.mark.interop]

A4, B4 = "100.64.0.1", "100.64.0.2"
A6, B6 = "fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"
PORT_A, PORT_B = 51820, 51821


def test_two_wireguard_go_peers_ping_each_other(lab: Lab) -> None:
    ns_a, ns_b = lab.add_ns("a"), lab.add_ns("b")
    ip_a, ip_b = lab.link(ns_a, ns_b)
    (priv_a, _), (priv_b, _) = keypair(), keypair()
    a = WgGo(lab, ns_a, private_key=priv_a, addresses=[f"{A4}/32", f"{A6}/128"], listen_port=PORT_A)
    b = WgGo(lab, ns_b, private_key=priv_b, addresses=[f"{B4}/32", f"{B6}/128"], listen_port=PORT_B)
    a.add_peer(Peer("b", b.public_key, (f"{B4}/32", f"{B6}/128"), endpoint=f"{ip_b}:{PORT_B}"))
    b.add_peer(Peer("a", a.public_key, (f"{A4}/32", f"{A6}/128"), endpoint=f"{ip_a}:{PORT_A}"))
    a.start()
    b.start()
    assert a.ifname != b.ifname  # one shared /run/wireguard

    assert ping(ns_a, B4), lab.logs()
    assert ping(ns_b, A4), lab.logs()
    assert ping(ns_a, B6), lab.logs()
    assert ping(ns_b, A6), lab.logs()
    assert a.latest_handshake(b.public_key) > 0
    assert b.latest_handshake(a.public_key) > 0

    assert a.stop() == 0
    assert not a.socket_path.exists()
