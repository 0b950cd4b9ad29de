"""`agent demo`, the README's first command: relayed, then direct, then nothing left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_demo_runs_relayed_then_direct_and_leaves_nothing_behind() -> None:
    before = _namespaces()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "agent", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "Path from a to b: derp (region 900, through the relay)" in out
    assert "Path from a to b: direct (198.18.2.1:41641)" in out
    # both directions got their 3 replies (ping may need a 4th try while the session starts)
    assert len(re.findall(r"\d+ packets transmitted, 3 received", out)) == 2, out
    assert "Done: the overlay works." in out
    assert not {ns for ns in _namespaces() - before if ns.startswith("agt-demo-")}
