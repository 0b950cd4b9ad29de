"""The C and Python tun_read/tun_write over real TUN devices in a fresh namespace (root only).

tests/native/tun_lab.py runs inside the namespace (the layout is in its docstring): the same
traffic goes through each implementation, and every result, and every packet the kernel
forwarded from what they wrote, must be equal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from tests.integration.lab import Lab

pytest.importorskip(
    "agent._fastpath",
    reason="agent._fastpath is not built (needs gcc, python3-dev, libssl-dev; reinstall)",
)

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lb:
        yield lb


@pytest.mark.timeout(120)
def test_native_and_python_agree_on_real_tuns(lab: Lab) -> None:
    ns = lab.add_ns("tun")
    names = [lab.ifname(tag) for tag in ("in", "out", "pl", "gone")]
    res = lab.run(ns, sys.executable, "-m", "tests.native.tun_lab", *names, timeout=90)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    offload = result.pop("offload")
    assert offload[0] in ("tso+uso", "tso"), offload
    unequal = {k: v for k, v in result.items() if not v["equal"]}
    assert not unequal, json.dumps(unequal, indent=1)

    packets, runs, reads, not_ip, malformed, error = result["read_vnet"]["result"]
    assert (reads, not_ip, malformed, error) == (7 + 2 * (offload == ["tso+uso"] * 2), 0, 0, None)
    assert len(packets) > 100  # the super-packets arrived whole and were cut here
    assert len(runs) >= 4  # X4, Y4, X6 and back
    packets, runs, reads, *_ = result["read_plain"]["result"]
    assert reads == len(packets) == 15 + 1 + 9 + 1  # the kernel cut them for the plain TUN
    assert len(result["read_small_batches"]["result"]) > 2
    packets, _, reads, *_ = result["read_local_udp_gso"]["result"]
    assert len(packets) == 22
    (writes, failed), forwarded = result["write_coalesced"]["result"]
    assert failed == 2  # not IP, and empty
    assert writes < 20
    assert forwarded
    assert result["read_gone"]["result"][-1][0] == "OSError"
    assert result["write_gone"]["result"] == [30, 30]
