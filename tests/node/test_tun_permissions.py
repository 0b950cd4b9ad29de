"""Without CAP_NET_ADMIN the TUN device cannot be made: the error says so, with the capabilities.

The first packaged install failed with a bare "[Errno 1] Operation not permitted" from TUNSETIFF
(the machine's capability bounding set lacked CAP_NET_ADMIN, so the unit's ambient capability
could not grant it). Here root runs a child with CAP_NET_ADMIN dropped from its bounding set.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.netns

CHILD = """
from agent.node.tun import open_tun
try:
    open_tun("agtperm0")
except PermissionError as e:
    print(e)
else:
    print("opened")
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv missing (util-linux)")
def test_tunsetiff_without_cap_net_admin_names_the_capability() -> None:
    res = subprocess.run(
        ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--",
         sys.executable, "-c", CHILD],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    out = res.stdout.strip()
    assert "creating TUN device 'agtperm0' needs CAP_NET_ADMIN" in out, out
    assert "this process lacks it" in out, out
