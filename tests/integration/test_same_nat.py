"""Two agents behind one NAT router go direct over their LAN, not through the router (root only).

    ns a 10.0.1.2 --+
                    +-- br0 10.0.1.1 (ns n, NAT)  wan 198.18.1.1 --- 198.18.1.2 (ns r, internet)
    ns b 10.0.1.3 --+   masquerade fully-random                     lo 198.18.0.10: agent derper
                        no hairpin: unsolicited packets from the wan side are dropped

Each agent's endpoints include its local address with the WireGuard port (source `local`,
engine/local_endpoints), sent in CallMeMaybe; the peer pings it over the bridge and the path
is direct to 10.0.1.x. The router's symmetric NAT makes the STUN endpoints useless, and a
counter on its LAN side shows that, once direct, no traffic is sent to its public address.
"""

from __future__ import annotations

import re

import pytest

from .lab import Lab, _wait_for, ping
from .natlab import B4, PORT_A, PORT_B, build_same_nat

pytestmark = pytest.mark.netns


def test_behind_one_nat_they_go_direct_over_the_lan(lab: Lab) -> None:
    a, b, ns_a, ns_n = build_same_nat(lab)
    a.start()
    b.start()
    assert ping(ns_a, B4, count=2, timeout=15), "no ping through the relay"

    def direct() -> bool:
        ping(ns_a, B4, count=1, timeout=1)
        return str(a.peer_status(b.public_key)["path"]) == "direct"

    assert _wait_for(direct, 15, interval=0.2), a.status()
    assert a.peer_status(b.public_key)["endpoint"] == f"10.0.1.3:{PORT_B}"
    assert _wait_for(lambda: b.peer_status(a.public_key)["path"] == "direct", 10, interval=0.2)
    assert b.peer_status(a.public_key)["endpoint"] == f"10.0.1.2:{PORT_A}"
    before = _hairpinned(lab, ns_n)
    assert ping(ns_a, B4, count=10, timeout=10)
    assert str(a.peer_status(b.public_key)["path"]) == "direct"
    assert _hairpinned(lab, ns_n) == before  # the overlay traffic stayed on the LAN


def _hairpinned(lab: Lab, ns_n: str) -> int:
    out = lab.run(ns_n, "nft", "list", "chain", "ip", "agtnat", "lan").stdout
    m = re.search(r"counter packets (\d+)", out)
    assert m, out
    return int(m.group(1))
